"""perf_tables: the issue-8 tables from synthetic GPU records (no GPU, no Megatron)."""

from __future__ import annotations

import json

from mla_seam import perf_tables


def _sweep(version, side, fusion, values):
    return [
        dict(
            case="bench_thd_sweep",
            version=version,
            side=side,
            rope_fusion=fusion,
            n_seqs=n,
            tokens=8192,
            backend="auto",
            ms_median=ms,
            ms_p10=ms * 0.9,
            ms_p90=ms * 1.1,
        )
        for n, ms in zip(perf_tables.SEQUENCE_COUNTS, values)
    ]


def test_sequence_table_rows_and_goals():
    records = (
        _sweep("0.16.1", "patched", False, [6.5, 4.8, 4.8, 4.8, 5.0])
        + _sweep("0.19.2", "patched", False, [6.6, 5.0, 4.9, 5.0, 5.2])
        + _sweep("0.19.2", "vanilla", False, [9.3, 7.7, 17.1, 62.1, 229.2])
        + _sweep("0.19.2", "patched", True, [5.4, 4.2, 3.8, 4.6, 4.6])
        + [dict(case="bench_layer", ms_median=1.0)]
    )
    doc = perf_tables.sequence_table(records)
    assert doc["counts"] == [1, 4, 16, 64, 256]
    labels = [(r["fusion"], r["version"], r["side"]) for r in doc["rows"]]
    assert labels == [
        (False, "0.16.1", "patched"),
        (False, "0.19.2", "patched"),
        (False, "0.19.2", "vanilla"),
        (True, "0.19.2", "patched"),
    ]
    goals = {(g["fusion"], g["version"], g["goal"]): g for g in doc["goals"]}
    assert goals[(False, "0.19.2", "256 vs 16 sequences")]["value"] == round(5.2 / 4.9, 3)
    assert goals[(False, "0.19.2", "256 vs 16 sequences")]["met"]
    assert goals[(False, "0.19.2", "vs patched 0.16.1")]["value"] == round(5.0 / 4.8, 3)
    assert goals[(True, "0.19.2", "256 vs 16 sequences")]["met"] is False  # 4.6 / 3.8
    assert (True, "0.19.2", "vs patched 0.16.1") not in goals  # no fused 0.16.1 row
    assert not any(g["version"] == "0.19.2" and "vanilla" in g["goal"] for g in doc["goals"])


def test_parity_table_applies_the_goal_per_spec_and_dtype():
    records = [
        dict(
            case="parity_hf",
            version="0.19.2",
            spec="te",
            dtype="fp32",
            q_lora_rank=None,
            input_rms=3.0,
            rel_err=4e-4,
            params_consumed=True,
        ),
        dict(
            case="parity_hf",
            version="0.19.2",
            spec="local",
            dtype="fp32",
            q_lora_rank=None,
            input_rms=1.0,
            rel_err=2e-5,
            params_consumed=True,
        ),
        dict(
            case="parity_hf",
            version="0.19.2",
            spec="te",
            dtype="bf16",
            q_lora_rank=384,
            input_rms=1.0,
            rel_err=3e-2,
            params_consumed=True,
        ),
    ]
    doc = perf_tables.parity_table(records)
    met = {(r["spec"], r["dtype"]): r["met"] for r in doc["rows"]}
    assert met == {("te", "fp32"): True, ("local", "fp32"): False, ("te", "bf16"): None}
    assert doc["all_met"] is False


def test_kernel_table_pairs_sides_and_judges_the_bound():
    base = dict(case="kernel_counts", version="0.19.2", layout="thd", backend="auto")
    records = [
        dict(
            base,
            side="patched",
            kernels_per_step=400,
            syncs_per_step=2,
            memcpy_h2d_per_step=2,
            memcpy_d2h_per_step=1,
            step_ms=5.0,
            adapter_host_us_per_layer=12.0,
            overhead_bound=0.0024,
        ),
        dict(
            base,
            side="vanilla",
            kernels_per_step=1900,
            syncs_per_step=33,
            memcpy_h2d_per_step=20,
            memcpy_d2h_per_step=13,
            step_ms=17.0,
        ),
        dict(
            base,
            layout="bshd",
            side="patched",
            kernels_per_step=300,
            syncs_per_step=0,
            step_ms=4.0,
            overhead_bound=0.009,
        ),
        dict(
            base, layout="bshd", side="vanilla", kernels_per_step=290, syncs_per_step=0, step_ms=4.0
        ),
    ]
    rows = {r["layout"]: r for r in perf_tables.kernel_table(records)["rows"]}
    assert rows["thd"]["fewer_or_equal"] is True and rows["thd"]["bound_met"] is True
    assert rows["bshd"]["fewer_or_equal"] is False and rows["bshd"]["bound_met"] is False
    assert rows["thd"]["vanilla"]["syncs_per_step"] == 33


def test_local_table_ratios():
    records = [
        dict(case="bench_local_vs_te", version="0.16.1", layout="bshd", impl=impl, ms_median=ms)
        for impl, ms in (("local", 9.0), ("te_unfused", 8.4), ("te_fused", 4.2))
    ]
    (row,) = perf_tables.local_table(records)["rows"]
    assert row["local_vs_unfused"] == round(9.0 / 8.4, 3) and row["met"] is True
    assert row["local_vs_fused"] == round(9.0 / 4.2, 3)


def test_markdown_and_cli(tmp_path, capsys):
    records = _sweep("0.19.2", "patched", False, [6.6, 5.0, 4.9, 5.0, 5.2])
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert perf_tables.read_records([path]) == records
    assert perf_tables.main(["--card", "H200", str(path)]) == 0
    text = capsys.readouterr().out
    assert "THD: ms per layer step by packed sequences, 8192 tokens (H200)" in text
    assert "| fusion off: patched 0.19.2 | 6.60 | 5.00 | 4.90 | 5.00 | 5.20 |" in text
    assert perf_tables.main([]) == 2
