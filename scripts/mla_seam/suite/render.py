"""``results.md``: a suite run for people (trees, verdict, phases, oracles, matrix, goldens,
benchmarks and the per-role performance tables)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence

from mla_seam.suite.trees import ROLES

# --- number formatting: the one home of the tool's table cells ---------------------------------


def fmt_value(value: Any) -> str:
    """A measured value for a table cell: 4 significant digits (``2.1e-05`` below 1e-3 and from
    1e5); ``None`` is ``-``, booleans ``yes``/``NO``; text loses ``|`` and line breaks."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


def fmt_short(value: Any) -> str:
    """A value for the performance tables: two decimals (3 significant digits below 0.01);
    ``None`` is ``-``, booleans ``yes``/``NO``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value else f"{value:.2f}"
    return str(value)


def markdown_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], fmt: Callable[[Any], str] = fmt_value
) -> List[str]:
    """A markdown table, each cell through ``fmt`` (default: this module's number format)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines


def _worst(diffs: Optional[Mapping[str, float]], grads: bool) -> Optional[float]:
    if not diffs:
        return None
    values = [v for k, v in diffs.items() if (k != "out") == grads]
    return max(values) if values else None


def render_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the run for people (versions, phases, oracles, matrix, golden, bench)."""
    env = results["environment"]
    lines = [
        f"# mla-seam GPU suite: {results['tag']} on {env.get('card') or '?'}",
        "",
        f"Overall: **{'PASS' if results['ok'] else 'FAIL'}** "
        f"({results['seconds']} s, started {results['started']}, schema "
        f"{results['schema_version']}).",
        "",
    ]
    trees = results.get("trees") or {}
    tree_rows = [
        [f"Megatron ({role})", f"{trees[role]['tag']} ({trees[role]['path']})"]
        for role in ROLES
        if role in trees
    ]
    world = (results.get("parallel") or {}).get("world_size", 1)
    lines += markdown_table(
        ["what", "version"],
        tree_rows
        + [
            [
                "card",
                f"{env.get('card')} sm{''.join(map(str, env.get('compute_capability') or []))}",
            ],
            ["torch / CUDA", f"{env.get('torch')} / {env.get('cuda')}"],
            ["cuDNN", env.get("cudnn")],
            ["Transformer Engine", env.get("transformer_engine")],
            ["HF transformers", env.get("transformers")],
            ["Python", env.get("python")],
            ["parallel", f"world size {world}"],
        ],
    )
    verdict = results.get("verdict")
    if verdict:
        lines += ["", f"## Verdict: **{verdict['verdict']}**", ""]
        lines.append(
            "Attribution over vanilla / patched / base trees: "
            + ", ".join(f"{n} {a}" for a, n in verdict["counts"].items() if n)
            + "."
        )
        lines += [f"- {reason}" for reason in verdict["reasons"][:20]]
        moved = [f for f in verdict["findings"] if f["attribution"] != "unchanged"]
        if moved:
            lines += ["", "### Findings that moved", ""]
            lines += markdown_table(
                ["category", "attribution", "regressed", "what"],
                [[f["category"], f["attribution"], f["regressed"], f["cause"]] for f in moved[:60]],
            )
    lines += ["", "## Phases", ""]
    lines += markdown_table(
        ["phase", "role", "tree", "ok", "passed", "failed", "errors", "skipped", "xfailed", "s"],
        [
            [
                p["name"]
                + (f" (skipped: {p['skipped_reason']})" if p.get("skipped_reason") else ""),
                p.get("role", "patched"),
                p["tree"],
                p["ok"],
                p["counts"].get("passed"),
                p["counts"].get("failed"),
                p["counts"].get("errors"),
                p["counts"].get("skipped"),
                p["counts"].get("xfailed"),
                p["seconds"],
            ]
            for p in results["phases"]
        ],
    )
    drift = results["summary"].get("upstream_drift") or []
    if drift:
        lines += ["", "## Upstream structure drift (not the adapter's)", ""]
        lines += [f"- {note}" for note in drift]
    records = results["records"]
    oracle = [r for r in records if r.get("case") in ("oracle_megatron", "oracle_thd")]
    if oracle:
        lines += ["", "## Oracles (max |diff| / max |ref|, float64 oracles)", ""]
        lines += markdown_table(
            [
                "case",
                "spec",
                "dims",
                "rope",
                "dtype",
                "out vs ref",
                "grads vs ref",
                "out vs HF",
                "grads vs HF",
            ],
            [
                [
                    r["case"],
                    r.get("spec"),
                    r.get("dims", "v2lite"),
                    r.get("rope", "yarn"),
                    r.get("dtype", "float32"),
                    (r.get("max_rel_vs_reference") or {}).get("out"),
                    _worst(r.get("max_rel_vs_reference"), True),
                    (r.get("max_rel_vs_hf") or {}).get("out"),
                    _worst(r.get("max_rel_vs_hf"), True),
                ]
                for r in oracle
            ],
        )
    matrix = [r for r in records if r.get("case") == "matrix"]
    if matrix:
        lines += ["", "## Matrix", ""]
        lines += markdown_table(
            [
                "spec",
                "backend",
                "layout",
                "dims",
                "rope",
                "recompute",
                "outcome",
                "decided",
                "out vs ref",
                "grads vs ref",
                "THD vs bshd",
                "checks",
            ],
            [
                [
                    r.get("spec"),
                    r.get("backend"),
                    r.get("layout"),
                    r.get("dims"),
                    r.get("rope"),
                    r.get("recompute"),
                    r.get("outcome"),
                    r.get("decided") or (r.get("message") or "")[:80],
                    (r.get("max_rel_vs_reference") or {}).get("out"),
                    _worst(r.get("max_rel_vs_reference"), True),
                    max((r.get("thd_vs_bshd") or {"-": None}).values(), key=lambda v: v or 0),
                    ", ".join(k for k, ok in (r.get("checks") or {}).items() if not ok) or "ok",
                ]
                for r in matrix
            ],
        )
    lines += ["", "## Golden values", ""]
    for role, golden in sorted((results.get("golden") or {}).items()):
        lines.append(f"- {role}: `{golden.get('file')}`; status: **{golden.get('status')}**")
        for problem in (golden.get("problems") or [])[:10]:
            lines.append(f"  - {problem}")
        for tag, summary in sorted((golden.get("cross_tag") or {}).items()):
            for metric, s in summary.items():
                if "identical" not in s:
                    continue
                lines.append(
                    f"  - vs {tag} `{metric}`: identical={fmt_value(s['identical'])}, first different "
                    f"step {fmt_value(s['first_different_step'])}, max abs diff "
                    f"{fmt_value(s['max_abs_diff'])}, max rel diff {fmt_value(s['max_rel_diff'])}"
                )
    bench = results.get("bench_summary") or {}
    if bench:
        lines += ["", "## Benchmarks (recorded, not asserted; median of N, CUDA events)", ""]
        lines.append(
            f"- measured bf16 matmul rate: {fmt_value(bench.get('matmul_tflops'))} TFLOP/s"
        )
        for name, title in (
            ("adapter_overhead", "Adapter overhead, patched / vanilla (goal <= 1.005)"),
            ("thd_patched_vs_vanilla", "THD patched / vanilla (goal <= 0.6 on 0.18+)"),
        ):
            rows = bench.get(name) or []
            if rows:
                lines += ["", f"### {title}", ""]
                lines += markdown_table(
                    [
                        "spec",
                        "backend",
                        "layout",
                        "patched ms",
                        "vanilla ms",
                        "ratio",
                        "goal",
                        "met",
                    ],
                    [
                        [
                            r["spec"],
                            r["backend"],
                            r["layout"],
                            r["patched_ms"],
                            r["vanilla_ms"],
                            r["ratio"],
                            r["goal"],
                            r["met"],
                        ]
                        for r in rows
                    ],
                )
        if bench.get("backend_table"):
            lines += ["", "### Backends (patched tree)", ""]
            lines += markdown_table(
                ["spec", "backend", "layout", "dims", "decided", "ms", "TFLOP/s", "of matmul"],
                [
                    [
                        r["spec"],
                        r["backend"],
                        r["layout"],
                        r["dims"],
                        r["decided"],
                        r["ms"],
                        r["tflops"],
                        r["fraction_of_matmul"],
                    ]
                    for r in bench["backend_table"]
                ],
            )
        if bench.get("local_vs_te_unfused"):
            lines += ["", "### Local spec / TE unfused (goal <= 1.2)", ""]
            lines += markdown_table(
                ["layout", "local ms", "TE unfused ms", "ratio", "met"],
                [
                    [r["layout"], r["local_ms"], r["te_unfused_ms"], r["ratio"], r["met"]]
                    for r in bench["local_vs_te_unfused"]
                ],
            )
    lines += _perf_tables(bench)
    failed = [p for p in results["phases"] if not p["ok"]]
    if failed:
        lines += ["", "## Failed phases (output tail)", ""]
        for p in failed:
            lines += [f"### {p['name']}", "", "```", p.get("output_tail", "")[-2500:], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _perf_tables(bench: Mapping[str, Any]) -> List[str]:
    """THD sequence-count sweep, kernel/sync counts and local-vs-TE, per tree role."""
    lines: List[str] = []
    sweep = bench.get("thd_sweep") or []
    if sweep:
        lines += ["", "### THD sequence-count sweep (ms per step, per tree)", ""]
        lines += markdown_table(
            [
                "backend",
                "rope fusion",
                "seqs",
                "tokens",
                "vanilla",
                "patched",
                "base",
                "vanilla/base",
                "patched/base",
                "patched/vanilla",
            ],
            [
                [
                    r["backend"],
                    r["rope_fusion"],
                    r["n_seqs"],
                    r["tokens"],
                    r["ms"].get("vanilla"),
                    r["ms"].get("patched"),
                    r["ms"].get("base"),
                    r["vanilla_vs_base"],
                    r["patched_vs_base"],
                    r["patched_vs_vanilla"],
                ]
                for r in sweep
            ],
        )
    kernels = bench.get("kernels") or []
    if kernels:
        lines += ["", "### Kernel launches and host-device syncs per step", ""]
        lines += markdown_table(
            [
                "layout",
                "backend",
                "kernels (vanilla / patched)",
                "syncs (vanilla / patched)",
                "adapter us/layer",
                "overhead bound",
            ],
            [
                [
                    r["layout"],
                    r["backend"],
                    f"{fmt_value(r['kernels_per_step'].get('vanilla'))} / "
                    f"{fmt_value(r['kernels_per_step'].get('patched'))}",
                    f"{fmt_value(r['syncs_per_step'].get('vanilla'))} / "
                    f"{fmt_value(r['syncs_per_step'].get('patched'))}",
                    r["adapter_host_us_per_layer"],
                    r["overhead_bound"],
                ]
                for r in kernels
            ],
        )
    local = bench.get("local_vs_te") or []
    if local:
        lines += ["", "### Local spec against TE (patched tree, ms)", ""]
        lines += markdown_table(
            ["layout", "local", "TE unfused", "TE fused", "local/unfused", "local/fused"],
            [
                [
                    r["layout"],
                    r["ms"].get("local"),
                    r["ms"].get("te_unfused"),
                    r["ms"].get("te_fused"),
                    r["local_vs_te_unfused"],
                    r["local_vs_te_fused"],
                ]
                for r in local
            ],
        )
    return lines
