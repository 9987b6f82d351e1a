"""The issue-8 performance tables, from GPU suite records (pure functions).

Records are the JSON lines the GPU tests append to ``$MLA_SEAM_RESULTS`` (``tests/gpu``), from
any number of trees and runs; every record names its tree's ``version`` and ``side``
(``patched`` or ``vanilla``). Four tables, each a dict (for ``results.json``) and markdown:

* :func:`sequence_table` (``bench_thd_sweep``): one MLA layer forward+backward on 8192 THD
  tokens packed as 1..256 sequences, rope fusion off and on, per release and side; goals: the
  patched layer at 256 sequences within 1.15x of itself at 16, and within 1.1x of patched
  0.16.1 at every count (same fusion setting).
* :func:`parity_table` (``parity_hf``): Megatron against HF's ``DeepseekV3Attention``;
  goals: TE fp32 <= 1e-3, local fp32 <= 1e-5, at input RMS 1 and 3, with and without q_lora.
* :func:`kernel_table` (``kernel_counts``): kernel launches, host-device syncs and copies per
  training step, patched against vanilla, and the overhead bound (adapter host time per layer
  per step over the step time); goals: no more kernels or syncs than vanilla, bound <= 0.5%.
* :func:`local_table` (``bench_local_vs_te``): the local spec against TE unfused and fused;
  goal: local <= 1.2x TE unfused (bshd).

``python -m mla_seam.perf_tables RESULTS.jsonl...`` prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from mla_seam.output import emit
from mla_seam.releases import version_key
from mla_seam.suite.render import fmt_short, markdown_table

SEQUENCE_COUNTS = (1, 4, 16, 64, 256)
FLAT_GOAL = 1.15  # patched at 256 sequences / patched at 16
LINE_GOAL = 1.10  # patched on a line / patched 0.16.1, same count and fusion
REFERENCE_VERSION = "0.16.1"
PARITY_GOALS = {("te", "fp32"): 1e-3, ("local", "fp32"): 1e-5}
BOUND_GOAL = 0.005
LOCAL_GOAL = 1.2

Record = Mapping[str, Any]


def read_records(paths: Iterable[Any]) -> List[Dict[str, Any]]:
    """Every JSON object of the given JSON-lines files (blank lines skipped).

    Args:
        paths: Files written through ``$MLA_SEAM_RESULTS``.

    Returns:
        The records, in file order.
    """
    records = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


def _of(records: Iterable[Record], case: str) -> List[Record]:
    return [r for r in records if r.get("case") == case and r.get("ms_median", 0) != -1]


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or not den:
        return None
    return round(num / den, 3)


def sequence_table(records: Iterable[Record], reference: str = REFERENCE_VERSION) -> Dict[str, Any]:
    """The sequence-count table: ms per step by packed sequences, fusion off and on.

    Args:
        records: ``bench_thd_sweep`` records (others are ignored).
        reference: The release every line is compared with (patched side).

    Returns:
        ``{"counts": [...], "rows": [{fusion, version, side, ms: {count: ms}}],
        "goals": [{fusion, version, goal, value, limit, met}]}``.
    """
    cells: Dict[Tuple[bool, str, str], Dict[int, float]] = {}
    for rec in _of(records, "bench_thd_sweep"):
        key = (bool(rec["rope_fusion"]), str(rec["version"]), str(rec.get("side", "patched")))
        cells.setdefault(key, {})[int(rec["n_seqs"])] = float(rec["ms_median"])
    counts = sorted({n for row in cells.values() for n in row}) or list(SEQUENCE_COUNTS)
    rows = [
        {"fusion": fusion, "version": version, "side": side, "ms": dict(sorted(ms.items()))}
        for (fusion, version, side), ms in sorted(
            cells.items(),
            key=lambda kv: (kv[0][0], version_key(str(kv[0][1])), kv[0][2] != "patched"),
        )
    ]
    goals = []
    for (fusion, version, side), ms in sorted(cells.items(), key=lambda kv: kv[0]):
        if side != "patched":
            continue
        flat = _ratio(ms.get(256), ms.get(16))
        if flat is not None:
            goals.append(_goal(fusion, version, "256 vs 16 sequences", flat, FLAT_GOAL))
        ref = cells.get((fusion, reference, "patched"))
        if ref is not None and version != reference:
            ratios = [_ratio(ms[n], ref[n]) for n in sorted(ms) if n in ref]
            ratios = [r for r in ratios if r is not None]
            if ratios:
                goals.append(
                    _goal(fusion, version, f"vs patched {reference}", max(ratios), LINE_GOAL)
                )
    return {"counts": counts, "rows": rows, "goals": goals}


def _goal(fusion: bool, version: str, goal: str, value: float, limit: float) -> Dict[str, Any]:
    return {
        "fusion": fusion,
        "version": version,
        "goal": goal,
        "value": value,
        "limit": limit,
        "met": value <= limit,
    }


def parity_table(records: Iterable[Record]) -> Dict[str, Any]:
    """HF parity per release, spec, dtype, query LoRA and input RMS.

    Args:
        records: ``parity_hf`` records.

    Returns:
        ``{"rows": [...], "all_met": bool}``; each row carries the goal that applies to it.
    """
    rows = []
    for rec in records:
        if rec.get("case") != "parity_hf":
            continue
        goal = PARITY_GOALS.get((rec.get("spec"), rec.get("dtype")))
        rel = rec.get("rel_err")
        rows.append(
            {
                "version": str(rec.get("version")),
                "side": rec.get("side", "patched"),
                "spec": rec.get("spec"),
                "dtype": rec.get("dtype"),
                "q_lora_rank": rec.get("q_lora_rank"),
                "input_rms": rec.get("input_rms"),
                "rel_err": rel,
                "params_consumed": rec.get("params_consumed"),
                "goal": goal,
                "met": None if goal is None or rel is None else rel <= goal,
            }
        )
    rows.sort(
        key=lambda r: (
            version_key(str(r["version"])),
            str(r["side"]),
            str(r["spec"]),
            str(r["dtype"]),
            str(r["q_lora_rank"]),
            float(r["input_rms"] or 0),
        )
    )
    judged = [r["met"] for r in rows if r["side"] == "patched" and r["met"] is not None]
    return {"rows": rows, "all_met": bool(judged) and all(judged)}


def kernel_table(records: Iterable[Record]) -> Dict[str, Any]:
    """Kernels, syncs and copies per step, patched against vanilla, and the overhead bound.

    Args:
        records: ``kernel_counts`` records.

    Returns:
        ``{"rows": [{version, layout, backend, patched: {...}, vanilla: {...},
        fewer_or_equal: bool|None, bound, bound_met}]}``.
    """
    sides: Dict[Tuple[str, str, str], Dict[str, Record]] = {}
    for rec in records:
        if rec.get("case") != "kernel_counts":
            continue
        key = (str(rec["version"]), str(rec["layout"]), str(rec.get("backend")))
        sides.setdefault(key, {})[str(rec.get("side", "patched"))] = rec
    fields = (
        "kernels_per_step",
        "syncs_per_step",
        "memcpy_h2d_per_step",
        "memcpy_d2h_per_step",
        "step_ms",
    )
    rows = []
    for (version, layout, backend), pair in sorted(
        sides.items(), key=lambda kv: (version_key(str(kv[0][0])), kv[0][1], kv[0][2])
    ):
        patched, vanilla = pair.get("patched"), pair.get("vanilla")
        row: Dict[str, Any] = {"version": version, "layout": layout, "backend": backend}
        for name, rec in (("patched", patched), ("vanilla", vanilla)):
            row[name] = {f: rec.get(f) for f in fields} if rec else None
        fewer = None
        if patched and vanilla:
            fewer = all(
                (patched.get(f) or 0) <= (vanilla.get(f) or 0)
                for f in ("kernels_per_step", "syncs_per_step")
            )
        bound = patched.get("overhead_bound") if patched else None
        row.update(
            fewer_or_equal=fewer,
            adapter_host_us_per_layer=patched.get("adapter_host_us_per_layer") if patched else None,
            bound=bound,
            bound_met=None if bound is None else bound <= BOUND_GOAL,
        )
        rows.append(row)
    return {"rows": rows, "goal": BOUND_GOAL}


def local_table(records: Iterable[Record]) -> Dict[str, Any]:
    """The local spec against TE unfused and fused, per release and layout.

    Args:
        records: ``bench_local_vs_te`` records (patched side).

    Returns:
        ``{"rows": [{version, layout, local, te_unfused, te_fused, local_vs_unfused,
        local_vs_fused, met}]}``; ``met`` judges bshd rows only.
    """
    cells: Dict[Tuple[str, str], Dict[str, float]] = {}
    for rec in _of(records, "bench_local_vs_te"):
        if rec.get("side", "patched") != "patched":
            continue
        key = (str(rec["version"]), str(rec["layout"]))
        cells.setdefault(key, {})[str(rec["impl"])] = float(rec["ms_median"])
    rows = []
    for (version, layout), ms in sorted(
        cells.items(), key=lambda kv: (version_key(str(kv[0][0])), kv[0][1])
    ):
        vs_unfused = _ratio(ms.get("local"), ms.get("te_unfused"))
        rows.append(
            {
                "version": version,
                "layout": layout,
                "local": ms.get("local"),
                "te_unfused": ms.get("te_unfused"),
                "te_fused": ms.get("te_fused"),
                "local_vs_unfused": vs_unfused,
                "local_vs_fused": _ratio(ms.get("local"), ms.get("te_fused")),
                "met": None if layout != "bshd" or vs_unfused is None else vs_unfused <= LOCAL_GOAL,
            }
        )
    return {"rows": rows, "goal": LOCAL_GOAL}


def tables(records: Sequence[Record], reference: str = REFERENCE_VERSION) -> Dict[str, Any]:
    """All four tables.

    Args:
        records: Records of any case; each table takes its own.
        reference: See :func:`sequence_table`.

    Returns:
        ``{"sequences": ..., "parity": ..., "kernels": ..., "local_vs_te": ...}``.
    """
    return {
        "sequences": sequence_table(records, reference),
        "parity": parity_table(records),
        "kernels": kernel_table(records),
        "local_vs_te": local_table(records),
    }


def _md(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    return markdown_table(headers, rows, fmt_short)


def render_markdown(doc: Mapping[str, Any], card: str = "") -> str:
    """The four tables as markdown (empty tables are left out).

    Args:
        doc: :func:`tables`' result.
        card: Names the machine in the headings (for example ``"H200, TE 2.20.2"``).

    Returns:
        Markdown text.
    """
    on = f" ({card})" if card else ""
    out: List[str] = []
    seq = doc.get("sequences") or {}
    if seq.get("rows"):
        counts = seq["counts"]
        out += [f"### THD: ms per layer step by packed sequences, 8192 tokens{on}", ""]
        out += _md(
            ["packed sequences"] + [str(n) for n in counts],
            (
                [f"fusion {'on' if r['fusion'] else 'off'}: {r['side']} {r['version']}"]
                + [r["ms"].get(n) for n in counts]
                for r in seq["rows"]
            ),
        )
        if seq.get("goals"):
            out += [""] + _md(
                ["fusion", "release", "goal", "ratio", "limit", "met"],
                (
                    [
                        "on" if g["fusion"] else "off",
                        g["version"],
                        g["goal"],
                        g["value"],
                        g["limit"],
                        g["met"],
                    ]
                    for g in seq["goals"]
                ),
            )
        out.append("")
    par = doc.get("parity") or {}
    if par.get("rows"):
        out += [f"### HF DeepseekV3Attention parity{on}", ""]
        out += _md(
            [
                "release",
                "side",
                "spec",
                "dtype",
                "q_lora_rank",
                "input RMS",
                "rel err",
                "goal",
                "met",
            ],
            (
                [
                    r["version"],
                    r["side"],
                    r["spec"],
                    r["dtype"],
                    r["q_lora_rank"],
                    r["input_rms"],
                    r["rel_err"],
                    r["goal"],
                    r["met"],
                ]
                for r in par["rows"]
            ),
        )
        out.append("")
    ker = doc.get("kernels") or {}
    if ker.get("rows"):
        out += [f"### Kernels and syncs per training step, patched / vanilla{on}", ""]

        def pv(row: Mapping[str, Any], field: str) -> str:
            p, v = row.get("patched") or {}, row.get("vanilla") or {}
            return f"{fmt_short(p.get(field))} / {fmt_short(v.get(field))}"

        out += _md(
            [
                "release",
                "layout",
                "backend",
                "kernels",
                "syncs",
                "H2D",
                "D2H",
                "step ms",
                "adapter us/layer",
                "bound",
                "met",
            ],
            (
                [
                    r["version"],
                    r["layout"],
                    r["backend"],
                    pv(r, "kernels_per_step"),
                    pv(r, "syncs_per_step"),
                    pv(r, "memcpy_h2d_per_step"),
                    pv(r, "memcpy_d2h_per_step"),
                    pv(r, "step_ms"),
                    r["adapter_host_us_per_layer"],
                    r["bound"],
                    r["bound_met"],
                ]
                for r in ker["rows"]
            ),
        )
        out.append("")
    loc = doc.get("local_vs_te") or {}
    if loc.get("rows"):
        out += [f"### Local spec against TE, ms per layer step{on}", ""]
        out += _md(
            [
                "release",
                "layout",
                "local",
                "TE unfused",
                "TE fused",
                "local/unfused",
                "local/fused",
                "met (<= 1.2, bshd)",
            ],
            (
                [
                    r["version"],
                    r["layout"],
                    r["local"],
                    r["te_unfused"],
                    r["te_fused"],
                    r["local_vs_unfused"],
                    r["local_vs_fused"],
                    r["met"],
                ]
                for r in loc["rows"]
            ),
        )
        out.append("")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mla_seam.perf_tables [--card NAME] FILE...``: the tables as markdown.

    Returns:
        0; 2 for bad arguments or a records file that cannot be read.
    """
    parser = argparse.ArgumentParser(
        prog="python -m mla_seam.perf_tables",
        description="Tabulate the issue-8 GPU records (JSON lines) as markdown.",
    )
    parser.add_argument("--card", default="", help="the card and software, for the heading")
    parser.add_argument("files", nargs="+", metavar="RESULTS.jsonl")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage
        return int(exc.code or 0)
    try:
        records = read_records(args.files)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"perf_tables: cannot read the records: {exc}\n")
        return 2
    emit(render_markdown(tables(records), args.card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
