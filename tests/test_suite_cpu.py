"""CPU-side tests of ``mla-seam suite``: golden values, aggregation, rendering, no-GPU refusal.

The GPU phases themselves are exercised on a GPU machine; here the suite runs with a stand-in
phase runner (and once with a real pytest subprocess on a tiny generated test file).
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest
from mla_seam import cli, suite
from mla_seam.errors import DeviceError, UsageError
from mla_seam.suite import attribution
from support import GPU
from support import fake_tree as _tree

# --- golden values -------------------------------------------------------------------------------


def test_golden_document_follows_megatron_schema():
    doc = suite.golden_document({"lm loss": [10.5, 10.25, 9.875], "grad norm": [1.0, 2.0, 3.0]})
    assert doc["lm loss"] == {
        "start_step": 1,
        "end_step": 3,
        "step_interval": 1,
        "values": {"1": 10.5, "2": 10.25, "3": 9.875},
    }
    suite.validate_golden(doc)
    spaced = suite.golden_document({"lm loss": [1.0, 2.0]}, start_step=5, step_interval=5)
    assert spaced["lm loss"]["end_step"] == 10 and list(spaced["lm loss"]["values"]) == ["5", "10"]


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"lm loss": [1.0]},
        {"lm loss": {"start_step": 1, "end_step": 2, "step_interval": 1, "values": {"1": 1.0}}},
        {"lm loss": {"start_step": 1, "end_step": 1, "step_interval": 1, "values": {"1": "x"}}},
        {"lm loss": {"start_step": 1, "end_step": 1, "values": {"1": 1.0}}},
    ],
)
def test_validate_golden_rejects_malformed(bad):
    with pytest.raises(ValueError):
        suite.validate_golden(bad)


def test_golden_roundtrip_is_bit_exact_and_numerically_ordered(tmp_path):
    values = [math.pi / (i + 1) + 1e-17 * i for i in range(12)]
    doc = suite.golden_document({"lm loss": values, "grad norm": values[::-1]})
    path = tmp_path / "g.json"
    suite.write_golden(path, doc)
    back = suite.read_golden(path)
    assert suite.compare_golden_exact(back, doc) == []
    assert [float(v) for v in back["lm loss"]["values"].values()] == values
    assert list(back["lm loss"]["values"]) == [str(i) for i in range(1, 13)]
    assert list(json.loads(path.read_text())) == ["grad norm", "lm loss"]


def test_compare_golden_exact_reports_every_difference():
    ref = suite.golden_document({"lm loss": [3.0, 2.0, float("nan")], "grad norm": [1.0] * 3})
    same = suite.golden_document({"lm loss": [3.0, 2.0, float("nan")], "grad norm": [1.0] * 3})
    assert suite.compare_golden_exact(same, ref) == []
    off = suite.golden_document({"lm loss": [3.0, 2.0 + 2**-40, float("nan")]})
    problems = suite.compare_golden_exact(off, ref)
    assert any("lm loss step 2" in p for p in problems)
    assert any("grad norm: only in reference" in p for p in problems)
    short = suite.golden_document({"lm loss": [3.0], "grad norm": [1.0]})
    assert any("steps differ" in p for p in suite.compare_golden_exact(short, ref))


def test_compare_golden_cross_summarizes_tag_differences():
    ours = suite.golden_document({"lm loss": [4.0, 3.0, 2.5], "grad norm": [1.0, 1.0, 1.0]})
    theirs = suite.golden_document({"lm loss": [4.0, 3.5, 2.0, 1.0], "grad norm": [1.0] * 3})
    summary = suite.compare_golden_cross(ours, theirs)
    loss = summary["lm loss"]
    assert loss["steps_compared"] == 3 and not loss["identical"]
    assert loss["first_different_step"] == 2
    assert loss["max_abs_diff"] == pytest.approx(0.5)
    assert loss["max_rel_diff"] == pytest.approx(0.25)
    assert (
        summary["grad norm"]["identical"] and summary["grad norm"]["first_different_step"] is None
    )


def test_golden_filename_and_card_slug():
    assert suite.golden_filename("h100", "2.20.2") == "golden_values_h100_te2.20.2.json"
    assert suite.golden_filename("h200", None) == "golden_values_h200_te-none.json"
    assert (
        suite.golden_filename("h100", "2.9.0+abc/def") == "golden_values_h100_te2.9.0+abc_def.json"
    )
    assert suite.card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert suite.card_slug("NVIDIA H200") == "h200"
    assert suite.card_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert suite.card_slug("Some GPU") == "some-gpu"


# --- records, JUnit, benchmarks ------------------------------------------------------------------


def test_read_records_tags_phase_and_keeps_bad_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"case": "matrix", "ms": 1.5}\nnot json\n\n{"case": "golden"}\n')
    records = suite.read_records(path, "matrix")
    assert [r["case"] for r in records] == ["matrix", "unreadable_record", "golden"]
    assert all(r["phase"] == "matrix" for r in records)
    assert suite.read_records(tmp_path / "missing.jsonl", "x") == []


def test_parse_junit_counts_outcomes(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(textwrap.dedent("""\
            <testsuites><testsuite name="pytest">
              <testcase classname="a" name="ok"/>
              <testcase classname="a" name="bad"><failure message="x"/></testcase>
              <testcase classname="a" name="err"><error message="x"/></testcase>
              <testcase classname="a" name="skip"><skipped type="pytest.skip" message="no"/></testcase>
              <testcase classname="a" name="xf"><skipped type="pytest.xfail" message="drift"/></testcase>
            </testsuite></testsuites>
            """))
    assert suite.parse_junit(xml) == {
        "passed": 1,
        "failed": 1,
        "errors": 1,
        "skipped": 1,
        "xfailed": 1,
    }
    assert suite.parse_junit(tmp_path / "none.xml")["passed"] == 0


def _layer(side, spec, backend, layout, ms, tflops=None):
    return dict(
        case="bench_layer",
        side=side,
        spec=spec,
        backend=backend,
        layout=layout,
        dims="v2lite",
        ms_median=ms,
        tflops=tflops,
        decided=backend if side == "patched" else None,
    )


BENCH = [
    {"case": "bench_matmul", "tflops": 700.0, "side": "patched"},
    {"case": "bench_matmul", "tflops": 690.0, "side": "vanilla"},
    _layer("patched", "te", "fused", "bshd", 10.04, 350.0),
    _layer("vanilla", "te", "fused", "bshd", 10.0),
    _layer("patched", "te", "unfused", "bshd", 20.0, 175.0),
    _layer("vanilla", "te", "unfused", "bshd", 20.0),
    _layer("patched", "te", "fused", "thd", 5.9, 300.0),
    _layer("vanilla", "te", "fused", "thd", 10.5),
    _layer("patched", "local", "local", "bshd", 22.0, 160.0),
    {"case": "bench_layer", "side": "vanilla", "spec": "local", "outcome": "build_error"},
]


def test_summarize_bench_pairs_sides_and_checks_goals():
    summary = suite.summarize_bench(BENCH, "0.19.2")
    assert summary["matmul_tflops"] == 700.0
    overhead = {r["backend"]: r for r in summary["adapter_overhead"]}
    assert overhead["fused"]["ratio"] == pytest.approx(1.004) and overhead["fused"]["met"]
    assert overhead["unfused"]["ratio"] == 1.0
    (thd,) = summary["thd_patched_vs_vanilla"]
    assert thd["ratio"] == pytest.approx(5.9 / 10.5, abs=1e-4) and thd["met"] and thd["goal"] == 0.6
    (local,) = summary["local_vs_te_unfused"]
    assert local["ratio"] == pytest.approx(1.1) and local["met"]
    table = {(r["spec"], r["backend"], r["layout"]): r for r in summary["backend_table"]}
    assert table[("te", "fused", "bshd")]["fraction_of_matmul"] == 0.5
    assert len(table) == 4


def test_thd_goal_applies_from_0_18_only():
    old = suite.summarize_bench(BENCH, "0.16.1")
    (thd,) = old["thd_patched_vs_vanilla"]
    assert thd["goal"] is None and thd["met"] is None and not old["thd_goal_applies"]
    assert suite.summarize_bench(BENCH, "0.18.0")["thd_goal_applies"]
    assert suite.summarize_bench([], "0.19.2")["adapter_overhead"] == []


# --- the whole run with a stand-in runner --------------------------------------------------------


class FakeRunner:
    """Plays the units: records per phase and role, a golden file where the suite asks for one."""

    def __init__(self, loss: List[float], fail: str = "", ms: Dict[str, float] = None) -> None:
        self.loss = loss
        self.fail = fail
        self.ms = ms or {}
        self.calls: List[Dict[str, Any]] = []

    def __call__(self, unit, tree, python, tests_dir, work, extra_env=None, pytest_args=()):
        extra_env = dict(extra_env or {})
        phase, role = unit.phase, unit.role
        self.calls.append(dict(phase=unit.name, tree=tree.path, env=extra_env))
        records: List[Dict[str, Any]] = []
        if phase.name == "golden":
            doc = suite.golden_document({"lm loss": self.loss, "grad norm": [1.0] * len(self.loss)})
            suite.write_golden(extra_env["MLA_SEAM_GOLDEN_OUT"], doc)
            records.append({"case": "golden"})
        elif phase.name == "matrix":
            records.append(
                {
                    "case": "matrix",
                    "spec": "te",
                    "backend": "fused",
                    "layout": "thd",
                    "dims": "v2lite",
                    "rope": "yarn",
                    "recompute": "none",
                    "outcome": "ran",
                    "decided": "fused",
                    "max_rel_vs_reference": {"out": 0.004, "grad_x": 0.01},
                    "thd_vs_bshd": {"out": 0.001},
                    "checks": {"reference_out": True},
                    "notes": ["upstream builds an extra query-input RMSNorm"],
                }
            )
        elif phase.name == "oracles":
            records.append(
                {
                    "case": "oracle_megatron",
                    "spec": "local",
                    "dims": "qlora",
                    "rope": "yarn",
                    "dtype": "float64",
                    "max_rel_vs_reference": {"out": 1e-7, "grad_x": 2e-7},
                    "max_rel_vs_hf": {"out": 3e-7, "grad_x": 4e-7},
                }
            )
        elif phase.name == "bench":
            side = "vanilla" if role == "vanilla" else "patched"
            records += [dict(r) for r in BENCH if r.get("side") == side]
            if role in self.ms:
                for r in records:
                    if r.get("ms_median"):
                        r["ms_median"] = self.ms[role]
        code = 1 if unit.name == self.fail else 0
        counts = {"passed": 1, "failed": int(bool(code)), "errors": 0, "skipped": 0, "xfailed": 0}
        tests = {f"test_{phase.name}::test_one": "failed" if code else "passed"}
        for r in records:
            r.update(phase=phase.name, role=role)
        result = suite.PhaseResult(
            unit.name, tree.tag, code, 0.1, counts, role=role, phase=phase.name, tests=tests
        )
        return result, records


CORE = ["smoke", "smoke@vanilla", "oracles", "matrix", "golden", "golden@vanilla", "bench",
        "bench@vanilla"]  # fmt: skip


def _run(tmp_path, **kwargs):
    """``run_suite`` with the stand-in device and an empty GPU tests folder (optional phases
    are then skipped as absent)."""
    tests = tmp_path / "gpu-tests"
    tests.mkdir(exist_ok=True)
    kwargs.setdefault("device", GPU)
    return suite.run_suite(tests_dir=tests, **kwargs)


def test_run_suite_writes_results_golden_and_bench(tmp_path):
    patched = _tree(tmp_path / "patched")
    vanilla = _tree(tmp_path / "vanilla", patched=False)
    out = tmp_path / "results"
    runner = FakeRunner([5.0, 4.0, 3.0])
    results, folder = _run(tmp_path, megatron=patched, vanilla=vanilla, out=out, runner=runner)
    assert folder == out / "core_v0.19.2" / "h100"
    assert [c["phase"] for c in runner.calls] == CORE
    assert runner.calls[-1]["tree"] == str(vanilla.resolve())
    skipped = {p["name"]: p["skipped_reason"] for p in results["phases"] if p["skipped_reason"]}
    assert set(skipped) == {"thd-sweep", "thd-sweep@vanilla", "parity", "parity@vanilla",
                            "kernels", "kernels@vanilla", "local-vs-te", "graphs",
                            "graphs@vanilla"}  # fmt: skip
    assert "bench_issue8.py is not in" in skipped["thd-sweep"]
    assert "MLA_SEAM_GOLDEN_REF" not in runner.calls[4]["env"]
    assert results["ok"] and results["golden"]["patched"]["status"] == "recorded"
    assert results["golden"]["vanilla"]["status"] == "recorded"
    assert results["schema_version"] == suite.SCHEMA_VERSION == 2
    assert results["environment"]["transformer_engine"] == "2.20.2"
    assert results["parallel"]["world_size"] == 1
    assert set(results["trees"]) == {"patched", "vanilla"}
    assert results["summary"]["upstream_drift"] == ["upstream builds an extra query-input RMSNorm"]
    saved = json.loads((folder / "results.json").read_text())
    assert saved["tag"] == "core_v0.19.2" and len(saved["records"]) == len(results["records"])
    bench = json.loads((folder / "bench.json").read_text())
    assert bench["summary"]["adapter_overhead"] and bench["environment"]["card_slug"] == "h100"
    assert all(r["case"].startswith("bench") for r in bench["records"])
    verdict = json.loads((folder / "verdict.json").read_text())
    attribution.validate(verdict)
    assert verdict["trees"]["vanilla"]["ran"] and "base" not in verdict["trees"]
    golden = folder / "golden_values_h100_te2.20.2.json"
    assert suite.read_golden(golden)["lm loss"]["values"]["3"] == 3.0
    assert (folder / "golden_values_h100_te2.20.2.vanilla.json").is_file()
    md = (folder / "results.md").read_text()
    for needle in (
        "PASS",
        "core_v0.19.2",
        "H100",
        "2.20.2",
        "## Verdict",
        "## Matrix",
        "## Oracles",
        "Adapter overhead",
        "recorded",
        "extra query-input RMSNorm",
    ):
        assert needle in md, needle

    # Same tag again: the committed golden is the reference, and it matches.
    again = FakeRunner([5.0, 4.0, 3.0])
    results, _ = _run(tmp_path, megatron=patched, out=out, runner=again)
    assert again.calls[3]["env"]["MLA_SEAM_GOLDEN_REF"] == str(golden)
    assert results["golden"]["patched"]["status"] == "matched" and results["ok"]
    assert not any("@" in c["phase"] for c in again.calls)
    assert results["verdict"]["verdict"] == "incomplete"  # no vanilla tree: cannot attribute

    # A different value: mismatch, observed file written beside, committed one untouched.
    drift = FakeRunner([5.0, 4.0, 3.0000001])
    results, _ = _run(tmp_path, megatron=patched, out=out, runner=drift)
    assert results["golden"]["patched"]["status"] == "mismatch" and not results["ok"]
    assert (folder / "golden_values_h100_te2.20.2.observed.json").is_file()
    assert suite.read_golden(golden)["lm loss"]["values"]["3"] == 3.0
    assert "FAIL" in (folder / "results.md").read_text()

    # --update-goldens replaces it.
    results, _ = _run(
        tmp_path,
        megatron=patched,
        out=out,
        runner=FakeRunner([5.0, 4.0, 3.5]),
        update_goldens=True,
        only=["golden"],
    )
    assert results["golden"]["patched"]["status"] == "updated"
    assert suite.read_golden(golden)["lm loss"]["values"]["3"] == 3.5


def test_only_runs_merge_into_the_previous_results(tmp_path):
    """The device allows 10 minutes per command: ``--only`` runs add up in one results.json."""
    patched = _tree(tmp_path / "p")
    vanilla = _tree(tmp_path / "v", patched=False)
    out = tmp_path / "r"
    first, folder = _run(
        tmp_path,
        megatron=patched,
        vanilla=vanilla,
        out=out,
        runner=FakeRunner([3.0, 2.0]),
        only=["smoke", "oracles", "matrix"],
    )
    assert [p["name"] for p in first["phases"]] == ["smoke", "smoke@vanilla", "oracles", "matrix"]
    second, _ = _run(
        tmp_path,
        megatron=patched,
        vanilla=vanilla,
        out=out,
        runner=FakeRunner([3.0, 2.0], fail="bench"),
        only=["golden", "bench", "bench-baseline"],  # the schema-1 name of bench@vanilla
    )
    names = [p["name"] for p in second["phases"]]
    assert names == ["smoke", "smoke@vanilla", "oracles", "matrix", "golden", "golden@vanilla",
                     "bench", "bench@vanilla"]  # fmt: skip
    assert second["merged_from"] == first["started"]
    cases = {r["case"] for r in second["records"]}
    assert {"matrix", "oracle_megatron", "golden", "bench_layer"} <= cases
    assert second["bench_summary"]["adapter_overhead"] and not second["ok"]
    # Repeating a unit replaces its records instead of adding to them.
    third, _ = _run(
        tmp_path,
        megatron=patched,
        vanilla=vanilla,
        out=out,
        runner=FakeRunner([3.0, 2.0]),
        only=["matrix"],
    )
    assert sum(r["case"] == "matrix" for r in third["records"]) == 1
    assert third["golden"]["patched"]["status"] == "recorded"
    # Another TE version is not merged (and overwrites the folder of this card).
    other = suite.DeviceInfo(**{**GPU.__dict__, "te": "2.21.0"})
    fourth, _ = _run(
        tmp_path, megatron=patched, out=out, device=other, runner=FakeRunner([1.0]), only=["matrix"]
    )
    assert [p["name"] for p in fourth["phases"]] == ["matrix"] and fourth["merged_from"] is None
    saved = json.loads((folder / "results.json").read_text())
    assert saved["environment"]["transformer_engine"] == "2.21.0"


def test_run_suite_compares_goldens_across_tags(tmp_path):
    out = tmp_path / "results"
    old = _tree(tmp_path / "old", version=(0, 16, 1))
    new = _tree(tmp_path / "new", version=(0, 19, 2))
    _run(tmp_path, megatron=old, out=out, runner=FakeRunner([5.0, 4.0, 3.0]), only=["golden"])
    results, _ = _run(
        tmp_path, megatron=new, out=out, runner=FakeRunner([5.0, 4.5, 3.0]), only=["golden"]
    )
    cross = results["golden"]["patched"]["cross_tag"]["core_v0.16.1"]["lm loss"]
    assert cross["first_different_step"] == 2 and cross["max_abs_diff"] == pytest.approx(0.5)
    assert results["ok"], "cross-tag differences are reported, not failed"
    assert "vs core_v0.16.1" in suite.render_markdown(results)


def test_failed_phase_fails_the_run_and_shows_its_output(tmp_path):
    patched = _tree(tmp_path / "p")
    results, folder = _run(
        tmp_path,
        megatron=patched,
        out=tmp_path / "r",
        runner=FakeRunner([1.0], fail="matrix"),
        only=["matrix"],
    )
    assert not results["ok"]
    assert "## Failed phases" in (folder / "results.md").read_text()


def test_run_suite_refuses_bad_arguments(tmp_path):
    patched = _tree(tmp_path / "p")
    vanilla = _tree(tmp_path / "v", patched=False)
    with pytest.raises(UsageError, match="carries the adapter"):
        _run(tmp_path, megatron=patched, vanilla=patched, runner=FakeRunner([1.0]))
    with pytest.raises(UsageError, match="is not patched"):
        _run(tmp_path, megatron=patched, base=vanilla, runner=FakeRunner([1.0]))
    with pytest.raises(UsageError, match="unknown phase"):
        _run(tmp_path, megatron=patched, only=["nope"], runner=FakeRunner([1.0]))
    nogpu = suite.DeviceInfo(python="3.11", torch="2.13.0+cpu", cuda=False)
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        _run(tmp_path, megatron=patched, device=nogpu, runner=FakeRunner([1.0]))


# --- the CLI and a real pytest phase -------------------------------------------------------------


def test_cli_exits_18_without_a_gpu(tmp_path, monkeypatch, caplog):
    patched = _tree(tmp_path / "p")
    nogpu = suite.DeviceInfo(python="3.11", torch="2.13.0+cpu", cuda=False, cuda_build=None)
    monkeypatch.setattr(suite.device, "probe_device", lambda python: nogpu)
    code = cli.main(["suite", "--megatron", str(patched), "--out", str(tmp_path / "r")])
    assert code == DeviceError.exit_code == 18
    assert "needs a CUDA device" in caplog.text
    assert not (tmp_path / "r").exists()


def test_cli_probe_on_this_machine(tmp_path):
    """The real probe: on a machine without a GPU the verb exits 18."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    patched = _tree(tmp_path / "p")
    assert cli.main(["suite", "--megatron", str(patched), "--out", str(tmp_path / "r")]) == 18


def test_cli_rejects_a_missing_tree(tmp_path):
    assert cli.main(["suite", "--megatron", str(tmp_path / "nope")]) == 3
    (tmp_path / "empty").mkdir()
    assert cli.main(["suite", "--megatron", str(tmp_path / "empty")]) == 4


def test_run_phase_runs_pytest_and_collects_records(tmp_path):
    repo = tmp_path / "repo"
    (repo / "t").mkdir(parents=True)
    (repo / "t" / "test_x.py").write_text(textwrap.dedent("""\
            import json, os, pytest

            def test_writes():
                with open(os.environ["MLA_SEAM_RESULTS"], "a") as f:
                    f.write(json.dumps({"case": "x", "tree": os.environ["MLA_SEAM_MEGATRON_TREE"],
                                        "side": os.environ["MLA_SEAM_SIDE"],
                                        "tf32": os.environ.get("NVIDIA_TF32_OVERRIDE")}) + "\\n")

            def test_skips():
                pytest.skip("no")

            @pytest.mark.xfail(reason="drift")
            def test_xfails():
                assert False
            """))
    tree = suite.TreeInfo(str(tmp_path), "0.19.2", "core_v0.19.2", True)
    phase = suite.Phase(
        "demo", "test_x.py", ("vanilla",), 120, env=(("NVIDIA_TF32_OVERRIDE", "0"),)
    )
    unit = suite.Unit(phase, "vanilla")
    work = tmp_path / "work"
    work.mkdir()
    import sys  # pylint: disable=import-outside-toplevel

    result, records = suite.run_phase(unit, tree, sys.executable, repo / "t", work)
    assert result.ok, result.output_tail
    assert result.counts == {"passed": 1, "failed": 0, "errors": 0, "skipped": 1, "xfailed": 1}
    assert records == [
        {"case": "x", "tree": str(tmp_path), "side": "vanilla", "tf32": "0", "phase": "demo",
         "role": "vanilla"}
    ]  # fmt: skip
    assert result.name == "demo@vanilla" and result.role == "vanilla"
    assert result.tests == {
        "test_x::test_writes": "passed",
        "test_x::test_skips": "skipped",
        "test_x::test_xfails": "xfailed",
    }


def test_suite_needs_no_gitpython(tmp_path):
    """The GPU machine may lack GitPython: ``python -m mla_seam.suite`` must not import it."""
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel

    patched = _tree(tmp_path / "p")
    code = (
        "import sys; sys.modules['git'] = None\n"
        "from mla_seam import suite\n"
        "suite.device.probe_device = lambda python: suite.DeviceInfo(python='x', torch=None, cuda=False)\n"
        f"raise SystemExit(suite.main(['--megatron', {str(patched)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 18, proc.stderr
    assert "needs a CUDA device" in proc.stderr


def test_cli_refuses_an_unpatched_tree_with_a_usage_error_not_18(tmp_path, monkeypatch, caplog):
    """An unpatched --megatron is a usage error (exit 2) that says what to do, before the GPU
    check: no GPU is not the problem."""
    vanilla = _tree(tmp_path / "v", patched=False)
    nogpu = suite.DeviceInfo(python="3.11", torch="2.13.0+cpu", cuda=False, cuda_build=None)
    monkeypatch.setattr(suite.device, "probe_device", lambda python: nogpu)
    code = cli.main(["suite", "--megatron", str(vanilla), "--out", str(tmp_path / "r")])
    assert code == UsageError.exit_code == 2
    assert "is not patched" in caplog.text and "mla-seam apply" in caplog.text
    assert "CUDA" not in caplog.text and not (tmp_path / "r").exists()


def test_reattribute_with_out_leaves_the_stored_run_alone(tmp_path, capsys):
    patched = _tree(tmp_path / "patched")
    vanilla = _tree(tmp_path / "vanilla", patched=False)
    _, folder = _run(
        tmp_path, megatron=patched, vanilla=vanilla, out=tmp_path / "results",
        runner=FakeRunner([5.0, 4.0, 3.0]),
    )  # fmt: skip
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    out = tmp_path / "again"
    assert cli.main(["suite", "--reattribute", str(folder), "--out", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    moved = out / folder.parent.name / folder.name
    results = json.loads((moved / "results.json").read_text())
    assert results["reattributed"]["mla_seam_version"] and (moved / "verdict.json").is_file()
    assert {p.name for p in moved.iterdir()} >= set(before)  # golden values come along
    assert "core_v0.19.2: " in capsys.readouterr().out
