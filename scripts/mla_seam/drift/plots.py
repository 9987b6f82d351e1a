"""The report's figures (matplotlib, the ``plot`` extra; each function returns ``False`` without it).

* ``drift.png``: one row per tag (readable at 30+ tags), one column per hook of the serving
  series (and of ``--baseline``'s series), contract changes, GPU verdict, verdict, and the first
  reason written out beside the row;
* ``drift-perf.png``: per tag, every performance finding of the GPU verdict as a ratio to the
  base release (vanilla and patched), log scale: upstream's drift and what the adapter absorbs;
* ``drift-golden.png``: the golden loss and grad-norm curves of each tag (patched solid,
  vanilla dashed).

The figures carry no timestamps or software names, so the same report gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from mla_seam.drift.render import _COLORS, _GPU_COLORS, _cell, _hooks
from mla_seam.drift.sweep import SUPPORTED

_REASON_CHARS = 110


def _pyplot():
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=100, metadata={"Software": None})


def matrix(doc: Mapping[str, Any], path: Path) -> bool:
    """``drift.png``: tags x (hooks, contracts, GPU, verdict) and the first reason per tag."""
    plt = _pyplot()
    if plt is None:
        return False
    from matplotlib.patches import Patch, Rectangle  # pylint: disable=import-outside-toplevel

    entries: List[Mapping[str, Any]] = doc["tags"]
    hooks = _hooks(entries)
    base_hooks = _hooks(entries, True) if doc.get("baseline") else []
    columns = (
        [(h, False) for h in hooks]
        + [(h, True) for h in base_hooks]
        + [("contracts", None), ("GPU", None), ("verdict", None)]
    )
    width = 0.8 * len(columns) + 9.0
    fig, ax = plt.subplots(figsize=(width, 1.6 + 0.34 * len(entries)))

    def box(x: int, y: int, color: str, text: str) -> None:
        ax.add_patch(Rectangle((x, y), 1, 1, facecolor=color, edgecolor="white"))
        ax.text(x + 0.5, y + 0.5, text, ha="center", va="center", fontsize=6.5)

    for y, e in enumerate(entries):
        for x, (name, base) in enumerate(columns):
            if base is not None:
                cls, text = _cell(e, name, base)
                box(x, y, _COLORS[cls], text.replace("offset ", ""))
            elif name == "contracts":
                count = len(e["contract_changes"])
                box(x, y, "#ffe0b2" if count else "#f5f5f5", str(count))
            elif name == "GPU":
                verdict = (e.get("gpu") or {}).get("verdict")
                box(x, y, _GPU_COLORS.get(verdict, "#ffffff"), _short_gpu(verdict))
            else:
                good = e["verdict"] == SUPPORTED
                box(x, y, "#c8e6c9" if good else "#ffcdd2", "ok" if good else "work")
        reason = (e["reasons"] or [""])[0]
        if len(reason) > _REASON_CHARS:
            reason = reason[: _REASON_CHARS - 3] + "..."
        ax.text(len(columns) + 0.2, y + 0.5, reason, ha="left", va="center", fontsize=6.5)
    ax.set_xlim(0, len(columns) + 0.2 + width * 0.0)
    ax.set_ylim(len(entries), 0)
    ax.set_xticks([x + 0.5 for x in range(len(columns))])
    labels = [f"{n}\n({doc['baseline']})" if b else n for n, b in columns]
    ax.set_xticklabels(labels, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([y + 0.5 for y in range(len(entries))])
    ax.set_yticklabels([str(e["tag"]) for e in entries], fontsize=7)
    for side in ("right", "bottom"):
        ax.spines[side].set_visible(False)
    legend = [Patch(color=c, label=k or "not in series") for k, c in _COLORS.items()]
    legend += [Patch(color=c, label=f"GPU {k}") for k, c in _GPU_COLORS.items()]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=6, fontsize=7)
    ax.set_title(f"mla-seam drift {doc['range']}: patch class per hook, GPU verdict, first reason")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def _short_gpu(verdict: Any) -> str:
    return {
        "pass": "pass",
        "upstream_changed": "upstream",
        "overlay_broke": "OVERLAY",
        "incomplete": "partial",
    }.get(verdict, "-")


def _ratios(entries: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{role: {subject: {tag: ratio to base}}}`` of every performance finding."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {"vanilla": {}, "patched": {}}
    for e in entries:
        for f in (e.get("gpu") or {}).get("performance") or []:
            values = f["values"]
            base = values.get("base") or values.get("vanilla")
            for role in out:
                if values.get(role) and base and (role != "vanilla" or values.get("base")):
                    out[role].setdefault(f["subject"], {})[e["tag"]] = values[role] / base
    return out


def performance(doc: Mapping[str, Any], path: Path) -> bool:
    """``drift-perf.png``; ``False`` without matplotlib or without performance findings."""
    entries = [e for e in doc["tags"] if (e.get("gpu") or {}).get("performance")]
    plt = _pyplot() if entries else None
    if plt is None:
        return False
    ratios = _ratios(entries)
    tags = [e["tag"] for e in entries]
    fig, axes = plt.subplots(2, 1, figsize=(3 + 0.6 * len(tags) + 5, 8), sharex=True)
    titles = {
        "vanilla": "vanilla / base release (upstream's drift)",
        "patched": "patched / base release (what users get; 1 = absorbed)",
    }
    for ax, role in zip(axes, ("vanilla", "patched")):
        for subject, per_tag in sorted(ratios[role].items()):
            xs = [i for i, t in enumerate(tags) if t in per_tag]
            ax.plot(xs, [per_tag[tags[i]] for i in xs], marker="o", label=_label(subject))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(titles[role], fontsize=9)
        ax.set_ylabel("ms ratio")
    axes[1].set_xticks(range(len(tags)))
    axes[1].set_xticklabels(tags, rotation=45, fontsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=6)
    fig.suptitle("mla-seam: performance per tag against the base release (GPU suite)")
    fig.tight_layout(rect=(0, 0, 0.7, 1))
    _save(fig, path)
    plt.close(fig)
    return True


def _label(subject: str) -> str:
    return subject.replace("bench_thd_sweep ", "THD ").replace("bench_layer ", "layer ")


def golden(doc: Mapping[str, Any], path: Path) -> bool:
    """``drift-golden.png``; ``False`` without matplotlib or without golden curves."""
    entries = [e for e in doc["tags"] if (e.get("gpu") or {}).get("golden")]
    plt = _pyplot() if entries else None
    if plt is None:
        return False
    metrics = sorted({m for e in entries for c in e["gpu"]["golden"].values() for m in c})
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics) + 2, 4.5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, metric in zip(axes[0], metrics):
        for k, e in enumerate(entries):
            for role, style in (("patched", "-"), ("vanilla", "--")):
                values = e["gpu"]["golden"].get(role, {}).get(metric)
                if values:
                    ax.plot(
                        range(1, len(values) + 1),
                        values,
                        style,
                        color=cmap(k % 20),
                        label=f"{e['tag']} {role}",
                    )
        ax.set_title(metric)
        ax.set_xlabel("step")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=6)
    fig.suptitle("mla-seam golden values per tag (patched solid, vanilla dashed)")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    _save(fig, path)
    plt.close(fig)
    return True
