"""Benchmark summaries: patched against vanilla side by side, and the per-role tables.

Everything here is recorded, never asserted: the goals of :data:`GOALS` are carried with
each comparison and whether it was met. Records come from ``tests/gpu/bench.py``
(``bench_layer``, ``bench_matmul``) and the single-GPU measurement files of issue #8
(``bench_thd_sweep``, ``kernel_counts``, ``bench_local_vs_te``); each carries the tree ``role``
it was measured on (older records only ``side``).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Tuple

from mla_seam.releases import line_at_least

#: Goals of issue #4 (recorded against, never asserted).
GOALS = {
    "adapter_overhead": 1.005,  # patched / vanilla, same backend, bshd
    "thd_patched_vs_vanilla": 0.6,  # patched / vanilla THD, release lines 0.18+
    "local_vs_te_unfused": 1.2,  # local spec / TE unfused
}
THD_GOAL_FROM = "0.18"  # the first release line the THD goal applies to


def role_of(record: Mapping[str, Any]) -> str:
    """The tree role of a record (``role``; records without one: their ``side``)."""
    return str(record.get("role") or record.get("side") or "patched")


def _key(record: Mapping[str, Any]) -> Tuple[str, str, str, str]:
    return (
        str(record.get("spec")),
        str(record.get("backend")),
        str(record.get("layout")),
        str(record.get("dims", "v2lite")),
    )


def summarize_bench(records: Iterable[Mapping[str, Any]], version: str) -> Dict[str, Any]:
    """Side-by-side ratios and the backend table from ``bench_layer`` / ``bench_matmul`` records.

    Args:
        records: All records of the run.
        version: The patched tree's megatron-core version (the THD goal applies from 0.18).

    Returns:
        ``{"matmul_tflops", "adapter_overhead", "thd_patched_vs_vanilla", "backend_table",
        "local_vs_te_unfused"}``; each comparison carries its goal and whether it was met.
    """
    records = list(records)
    layers = [r for r in records if r.get("case") == "bench_layer" and r.get("ms_median")]
    matmul = [
        r
        for r in records
        if r.get("case") == "bench_matmul" and r.get("tflops") and role_of(r) == "patched"
    ]
    patched = {_key(r): r for r in layers if role_of(r) == "patched"}
    vanilla = {_key(r): r for r in layers if role_of(r) == "vanilla"}
    peak = max((float(r["tflops"]) for r in matmul), default=None)

    def pair(key, goal_name, goal_applies=True):
        ours, theirs = patched[key], vanilla[key]
        ratio = ours["ms_median"] / theirs["ms_median"]
        goal = GOALS[goal_name]
        return {
            "spec": key[0],
            "backend": key[1],
            "layout": key[2],
            "dims": key[3],
            "patched_ms": ours["ms_median"],
            "vanilla_ms": theirs["ms_median"],
            "ratio": round(ratio, 4),
            "goal": goal if goal_applies else None,
            "met": (ratio <= goal) if goal_applies else None,
        }

    common = sorted(set(patched) & set(vanilla))
    thd_applies = line_at_least(version, THD_GOAL_FROM)
    overhead = [pair(k, "adapter_overhead") for k in common if k[2] == "bshd"]
    thd = [pair(k, "thd_patched_vs_vanilla", thd_applies) for k in common if k[2] != "bshd"]
    table = []
    for key in sorted(patched):
        r = patched[key]
        tflops = r.get("tflops")
        table.append(
            {
                "spec": key[0],
                "backend": key[1],
                "layout": key[2],
                "dims": key[3],
                "decided": r.get("decided"),
                "ms": r["ms_median"],
                "tflops": tflops,
                "fraction_of_matmul": (round(tflops / peak, 4) if tflops and peak else None),
            }
        )
    local_vs_te = []
    for key, r in sorted(patched.items()):
        if key[0] != "local":
            continue
        te_key = ("te", "unfused", key[2], key[3])
        if te_key in patched:
            ratio = r["ms_median"] / patched[te_key]["ms_median"]
            goal = GOALS["local_vs_te_unfused"]
            local_vs_te.append(
                {
                    "layout": key[2],
                    "dims": key[3],
                    "local_ms": r["ms_median"],
                    "te_unfused_ms": patched[te_key]["ms_median"],
                    "ratio": round(ratio, 4),
                    "goal": goal,
                    "met": ratio <= goal,
                }
            )
    return {
        "matmul_tflops": peak,
        "adapter_overhead": overhead,
        "thd_patched_vs_vanilla": thd,
        "thd_goal_applies": thd_applies,
        "backend_table": table,
        "local_vs_te_unfused": local_vs_te,
        "thd_sweep": summarize_thd_sweep(records),
        "kernels": summarize_kernels(records),
        "local_vs_te": summarize_local_vs_te(records),
    }


def _by_role(
    records: Iterable[Mapping[str, Any]], case: str, key_fields: Tuple[str, ...]
) -> Dict[Tuple[Any, ...], Dict[str, Mapping[str, Any]]]:
    table: Dict[Tuple[Any, ...], Dict[str, Mapping[str, Any]]] = {}
    for r in records:
        if r.get("case") == case:
            key = tuple(r.get(f) for f in key_fields)
            table.setdefault(key, {})[role_of(r)] = r
    return table


def _ratio(a: Any, b: Any) -> Any:
    try:
        return round(float(a) / float(b), 4) if a is not None and b else None
    except (TypeError, ValueError):
        return None


THD_SWEEP_KEY = ("backend", "rope_fusion", "n_seqs", "tokens")
KERNEL_KEY = ("layout", "backend")


def summarize_thd_sweep(records: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """``bench_thd_sweep`` per (backend, rope fusion, sequences, tokens): ms per role and ratios.

    ``vanilla_vs_base`` and ``patched_vs_base`` say how far the release moved from the base
    release; ``patched_vs_vanilla`` what the adapter changes on this release.
    """
    rows = []
    for key, roles in sorted(_by_role(records, "bench_thd_sweep", THD_SWEEP_KEY).items(), key=str):
        ms = {role: r.get("ms_median") for role, r in roles.items()}
        rows.append(
            dict(
                zip(THD_SWEEP_KEY, key),
                ms=ms,
                vanilla_vs_base=_ratio(ms.get("vanilla"), ms.get("base")),
                patched_vs_base=_ratio(ms.get("patched"), ms.get("base")),
                patched_vs_vanilla=_ratio(ms.get("patched"), ms.get("vanilla")),
            )
        )
    return rows


def summarize_kernels(records: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """``kernel_counts`` per (layout, backend): launches, syncs and the overhead bound per role."""
    rows = []
    for key, roles in sorted(_by_role(records, "kernel_counts", KERNEL_KEY).items(), key=str):
        row: Dict[str, Any] = dict(zip(KERNEL_KEY, key))
        for field in ("kernels_per_step", "syncs_per_step", "step_ms"):
            row[field] = {role: r.get(field) for role, r in roles.items()}
        patched = roles.get("patched") or {}
        row["adapter_host_us_per_layer"] = patched.get("adapter_host_us_per_layer")
        row["overhead_bound"] = patched.get("overhead_bound")
        rows.append(row)
    return rows


def summarize_local_vs_te(records: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """``bench_local_vs_te`` of the patched tree: ms per (layout, impl) and local / TE ratios."""
    table: Dict[str, Dict[str, Any]] = {}
    for r in records:
        if r.get("case") == "bench_local_vs_te" and role_of(r) == "patched":
            table.setdefault(str(r.get("layout")), {})[str(r.get("impl"))] = r.get("ms_median")
    rows = []
    for layout, impls in sorted(table.items()):
        rows.append(
            {
                "layout": layout,
                "ms": impls,
                "local_vs_te_unfused": _ratio(impls.get("local"), impls.get("te_unfused")),
                "local_vs_te_fused": _ratio(impls.get("local"), impls.get("te_fused")),
                "goal": GOALS["local_vs_te_unfused"],
            }
        )
    return rows


def summarize_cases(records: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    """Counts per record case and the distinct upstream-drift notes."""
    counts: Dict[str, int] = {}
    notes: Dict[str, int] = {}
    for record in records:
        case = str(record.get("case", "?"))
        counts[case] = counts.get(case, 0) + 1
        for note in record.get("notes") or record.get("drift") or []:
            notes[note] = notes.get(note, 0) + 1
    return {"record_counts": counts, "upstream_drift": sorted(notes)}
