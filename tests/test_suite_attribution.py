"""Three-tree attribution of the GPU suite, its verdict document, and staging the trees.

The rules are checked on literal values (each row a case the issue names: 0.19's THD cost growing
with the number of packed sequences, with and without the adapter absorbing it; a local-spec
build that fails on vanilla; a golden curve that moves); a whole three-tree run goes through the
suite with a stand-in phase runner; staging materializes real trees from the PyPI sdists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
from mla_seam import suite
from mla_seam.suite import attribution
from mla_seam.suite.attribution import attribute, good_or_bad, identical, lower_is_better
from support import GPU
from support import fake_tree as _tree

PERF = lower_is_better(attribution.PERF_TOLERANCE)


@pytest.mark.parametrize(
    "values,expected",
    [
        # 0.19 THD, rope fusion off, 256 sequences: vanilla 229 ms, base 0.16.1 6.1 ms.
        ({"vanilla": 229.2, "patched": 240.2, "base": 6.1}, ("upstream changed", True)),
        ({"vanilla": 229.2, "patched": 6.5, "base": 6.1}, ("absorbed", False)),
        # Patched slower than vanilla of the same release beyond the noise: the overlay's doing.
        ({"vanilla": 5.0, "patched": 9.0, "base": 5.0}, ("overlay broke", True)),
        ({"vanilla": 5.0, "patched": 5.6, "base": 5.2}, ("unchanged", False)),
        # Fastest samples of one run on 4 x H200 (0.16.1 te/fused/bshd: patched 6.18 ms,
        # vanilla 4.69): 1.32x is inside the spread of identical code across processes.
        ({"vanilla": 4.69, "patched": 6.18}, ("unchanged", False)),
        # Upstream got faster and patched with it.
        ({"vanilla": 2.0, "patched": 2.1, "base": 5.0}, ("upstream changed", False)),
        # No base tree (base == release): only patched against vanilla.
        ({"vanilla": 10.5, "patched": 5.9}, ("absorbed", False)),
        ({"vanilla": 5.9, "patched": 10.5}, ("overlay broke", True)),
        # No vanilla measurement: patched moved off the base, nobody can say why.
        ({"patched": 20.0, "base": 5.0}, ("unattributed", True)),
        ({"patched": 5.0}, ("unchanged", False)),
    ],
)
def test_performance_attribution(values, expected):
    assert attribute(values, PERF) == expected


@pytest.mark.parametrize(
    "values,expected",
    [
        # Local spec build: vanilla fails (TypeError, issue #1589), patched passes.
        ({"vanilla": False, "patched": True}, ("absorbed", False)),
        ({"vanilla": True, "patched": False}, ("overlay broke", True)),
        # Fails alike on vanilla, no base measured: nobody can say whether that is new.
        ({"vanilla": False, "patched": False}, ("unattributed", True)),
        # Fails alike on all three trees: a standing failure, nothing moved.
        ({"vanilla": False, "patched": False, "base": False}, ("unchanged", False)),
        # Fails on both trees of the release, passes on the base: upstream moved.
        ({"vanilla": False, "patched": False, "base": True}, ("upstream changed", True)),
        ({"vanilla": True, "patched": True, "base": True}, ("unchanged", False)),
        ({"patched": False}, ("unattributed", True)),
    ],
)
def test_pass_fail_attribution(values, expected):
    assert attribute(values, good_or_bad, lambda v: v is False) == expected


@pytest.mark.parametrize(
    "values,expected",
    [
        ({"vanilla": (1, 2), "patched": (1, 2), "base": (1, 2)}, ("unchanged", False)),
        ({"vanilla": (1, 3), "patched": (1, 2), "base": (1, 2)}, ("absorbed", False)),
        ({"vanilla": (1, 3), "patched": (1, 3), "base": (1, 2)}, ("upstream changed", True)),
        ({"vanilla": (1, 2), "patched": (1, 3), "base": (1, 2)}, ("overlay broke", True)),
        ({"patched": (1, 3), "base": (1, 2)}, ("unattributed", True)),
        ({"vanilla": (1, 3), "patched": (1, 2)}, ("unattributed", False)),
    ],
)
def test_golden_attribution(values, expected):
    assert attribute(values, identical) == expected


def test_kernel_counts_allow_no_extra_sync():
    syncs = lower_is_better(1.0)
    assert attribute({"vanilla": 4, "patched": 5}, syncs) == ("overlay broke", True)
    assert attribute({"vanilla": 33, "patched": 4, "base": 4}, syncs) == ("absorbed", False)


# --- a whole three-tree run -------------------------------------------------------------------

SWEEP = {  # ms per role at (rope_fusion, n_seqs): the table, rounded
    (False, 1): {"vanilla": 9.3, "patched": 6.6, "base": 6.5},
    (False, 256): {"vanilla": 229.2, "patched": 240.2, "base": 6.1},
    (True, 256): {"vanilla": 9.5, "patched": 4.6, "base": 3.9},
}


class ThreeTrees:
    """Stand-in runner: smoke fails on vanilla's local spec, the THD sweep of the issue."""

    def __init__(self, tests_dir: Path) -> None:
        self.calls: List[str] = []
        (tests_dir / "bench_issue8.py").write_text("# present: the phase runs\n")

    def __call__(self, unit, tree, python, tests_dir, work, extra_env=None, pytest_args=()):
        self.calls.append(unit.name)
        role, phase = unit.role, unit.phase.name
        records: List[Dict[str, Any]] = []
        tests = {}
        if phase == "smoke":
            tests = {
                "test_smoke::test_te_builds": "passed",
                "test_smoke::test_local_builds": "failed" if role == "vanilla" else "passed",
            }
        elif phase == "golden":
            values = [4.0, 3.0] if role == "vanilla" else [4.0, 2.5]  # vanilla's scale differs
            doc = suite.golden_document({"lm loss": values, "grad norm": [1.0, 1.0]})
            suite.write_golden(extra_env["MLA_SEAM_GOLDEN_OUT"], doc)
            tests = {"test_golden::test_golden_values": "passed"}
        elif phase == "thd-sweep":
            for (fusion, n), ms in SWEEP.items():
                records.append(
                    dict(case="bench_thd_sweep", backend="auto", rope_fusion=fusion, n_seqs=n,
                         tokens=8192, ms_median=ms[role], side=suite.trees.SIDE[role])
                )  # fmt: skip
        for r in records:
            r.update(phase=phase, role=role)
        failed = sum(v == "failed" for v in tests.values())
        counts = {"passed": len(tests) - failed, "failed": failed, "errors": 0, "skipped": 0,
                  "xfailed": 0}  # fmt: skip
        result = suite.PhaseResult(
            unit.name, tree.tag, int(bool(failed)), 0.1, counts, role=role, phase=phase, tests=tests
        )
        return result, records


def test_three_tree_run_attributes_and_validates(tmp_path):
    patched = _tree(tmp_path / "patched", version=(0, 19, 2))
    vanilla = _tree(tmp_path / "vanilla", version=(0, 19, 2), patched=False)
    base = _tree(tmp_path / "base", version=(0, 16, 1))
    out = tmp_path / "results"
    tests = tmp_path / "gpu-tests"
    tests.mkdir()
    runner = ThreeTrees(tests)
    results, folder = suite.run_suite(
        megatron=patched,
        vanilla=vanilla,
        base=base,
        out=out,
        only=["smoke", "golden", "thd-sweep"],
        device=GPU,
        runner=runner,
        tests_dir=tests,
    )
    assert runner.calls == ["smoke", "smoke@vanilla", "golden", "golden@vanilla", "golden@base",
                            "thd-sweep", "thd-sweep@vanilla", "thd-sweep@base"]  # fmt: skip
    verdict = json.loads((folder / "verdict.json").read_text())
    attribution.validate(verdict)
    assert verdict == results["verdict"]
    assert verdict["trees"] == {
        "patched": {"tag": "core_v0.19.2", "version": "0.19.2", "ran": True},
        "vanilla": {"tag": "core_v0.19.2", "version": "0.19.2", "ran": True},
        "base": {"tag": "core_v0.16.1", "version": "0.16.1", "ran": True},
    }
    by_subject = {(f["subject"], f["metric"]): f for f in verdict["findings"]}
    off = by_subject[
        ("bench_thd_sweep backend=auto rope_fusion=False n_seqs=256 tokens=8192", "ms_fastest")
    ]
    assert off["attribution"] == "upstream changed" and off["regressed"]
    assert "vanilla/base 37.57x" in off["cause"]
    on = by_subject[
        ("bench_thd_sweep backend=auto rope_fusion=True n_seqs=256 tokens=8192", "ms_fastest")
    ]
    # vanilla 9.5 is 2.4x the base; patched 4.6 is within the noise of it (1.18x): absorbed
    assert on["attribution"] == "absorbed" and not on["regressed"]
    local = by_subject[("smoke: test_smoke::test_local_builds", "passed")]
    assert local["attribution"] == "absorbed" and local["category"] == "correctness"
    loss = by_subject[("golden values", "lm loss")]
    assert loss["attribution"] == "absorbed" and loss["category"] == "golden"
    assert results["golden"]["base"]["status"] == "observed"  # no committed base file: read-only
    assert not (out / "core_v0.16.1").exists()
    assert verdict["verdict"] == "upstream_changed"
    assert any("n_seqs=256" in r for r in verdict["reasons"])
    md = (folder / "results.md").read_text()
    assert "## Verdict: **upstream_changed**" in md and "THD sequence-count sweep" in md


def test_the_base_release_is_run_once_and_read_as_its_own_base(tmp_path):
    """``--base-megatron`` the patched tree itself (the base release): no base units run;
    the verdict compares vanilla with the patched tree as the base."""
    patched = _tree(tmp_path / "patched", version=(0, 16, 1))
    vanilla = _tree(tmp_path / "vanilla", version=(0, 16, 1), patched=False)
    tests = tmp_path / "gpu-tests"
    tests.mkdir()
    runner = ThreeTrees(tests)
    results, _ = suite.run_suite(
        megatron=patched, vanilla=vanilla, base=patched, out=tmp_path / "results",
        only=["smoke", "thd-sweep"], device=GPU, runner=runner, tests_dir=tests,
    )  # fmt: skip
    assert runner.calls == ["smoke", "smoke@vanilla", "thd-sweep", "thd-sweep@vanilla"]
    assert results["trees"]["base"]["path"] == results["trees"]["patched"]["path"]
    assert results["verdict"]["trees"]["base"]["ran"]  # its patched tree is its base
    by_subject = {(f["subject"], f["metric"]): f for f in results["verdict"]["findings"]}
    local = by_subject[("smoke: test_smoke::test_local_builds", "passed")]
    assert local["values"] == {"vanilla": False, "patched": True, "base": True}
    assert local["attribution"] == "absorbed"
    off = by_subject[
        ("bench_thd_sweep backend=auto rope_fusion=False n_seqs=256 tokens=8192", "ms_fastest")
    ]
    # Vanilla 229 ms against the base (= patched) 240 ms: both measured, nothing regressed.
    assert off["values"]["base"] == off["values"]["patched"] and not off["regressed"]


def test_verdict_schema_rejects_unknown_attribution(tmp_path):
    patched = _tree(tmp_path / "p")
    tests = tmp_path / "gpu-tests"
    tests.mkdir()
    results, _ = suite.run_suite(
        megatron=patched, out=tmp_path / "r", only=["smoke"], device=GPU,
        runner=ThreeTrees(tests), tests_dir=tests,
    )  # fmt: skip
    doc = results["verdict"]
    attribution.validate(doc)
    doc["findings"].append(dict(doc["findings"][0] if doc["findings"] else {}, attribution="x"))
    jsonschema = pytest.importorskip("jsonschema")
    with pytest.raises(jsonschema.ValidationError):
        attribution.validate(doc)


# --- choosing and staging the trees -----------------------------------------------------------


def _report(*tags):
    return {"tags": [dict(tag=f"core_v{v}", version=v, verdict=verdict, gpu=gpu)
                     for v, verdict, gpu in tags]}  # fmt: skip


def test_base_is_the_last_release_marked_good():
    report = _report(
        ("0.16.1", "supported", {"verdict": "pass"}),
        ("0.17.1", "supported", None),
        ("0.18.2", "supported", {"verdict": "upstream_changed"}),
        ("0.19.2", "needs_work", None),
        ("0.19.3rc0", "supported", None),
    )
    assert suite.base_from_report(report, "0.19.2") == "0.16.1"  # a GPU pass wins
    report["tags"][0]["gpu"] = None
    assert suite.base_from_report(report, "0.19.2") == "0.17.1"  # else the newest supported
    assert suite.base_from_report(report, "0.17.1") == "0.16.1"
    assert suite.base_from_report(None, "0.19.2") is None


@pytest.mark.slow
def test_stage_materializes_three_trees(tmp_path, seam_cache, monkeypatch):
    """Real staging: vanilla and patched 0.19.2, patched 0.16.1, from the cached sdists."""
    monkeypatch.setenv("MLA_SEAM_CACHE", str(seam_cache))
    trees = suite.stage("0.19", "0.16.1", tmp_path / "w")
    info = {role: suite.inspect_tree(path, role) for role, path in trees.items()}
    assert {r: (i.version, i.patched) for r, i in info.items()} == {
        "patched": ("0.19.2", True),
        "vanilla": ("0.19.2", False),
        "base": ("0.16.1", True),
    }
    again = suite.stage("0.19", "0.16.1", tmp_path / "w")  # reused, not rebuilt
    assert again == trees
    itself = suite.stage("0.19.2", "0.19.2", tmp_path / "w")  # its own base: the patched tree
    assert itself["base"] == itself["patched"]


def test_release_without_a_gpu_stages_nothing(tmp_path, monkeypatch, caplog):
    from mla_seam import cli  # pylint: disable=import-outside-toplevel

    nogpu = suite.DeviceInfo(python="3.11", torch="2.13.0+cpu", cuda=False)
    monkeypatch.setattr(suite.device, "probe_device", lambda python: nogpu)
    work = tmp_path / "trees"
    assert cli.main(["suite", "--release", "0.19", "--work", str(work)]) == 18
    assert not work.exists() and "needs a CUDA device" in caplog.text
    assert cli.main(["suite"]) == 2  # neither --release nor --megatron


def test_unattributed_regressions_leave_the_verdict_incomplete():
    """A failure vanilla shares, with no base measured, blames neither side."""
    shared = attribution.Finding("correctness", "parity", "passed", {"vanilla": False,
                                 "patched": False}, "unattributed", True, "parity te rms 3")  # fmt: skip
    moved = attribution.Finding("performance", "thd", "ms_fastest", {}, "upstream changed", True,
                                "thd 256")  # fmt: skip
    phases = [{"name": "parity", "role": "patched", "ok": True}, {"name": "parity@vanilla",
              "role": "vanilla", "ok": True}]  # fmt: skip
    verdict, reasons = attribution.verdict_of([shared], {"phases": phases})
    assert verdict == "incomplete" and reasons == ["unattributed: parity te rms 3"]
    assert attribution.verdict_of([shared, moved], {"phases": phases})[0] == "upstream_changed"


def test_timings_compare_their_fastest_sample():
    assert attribution.fastest_ms({"ms_all": [7.1, 6.2, 9.0], "ms_median": 7.1}) == 6.2
    assert attribution.fastest_ms({"ms_median": 7.1}) == 7.1  # records before ms_all
    assert attribution.fastest_ms({"ms_all": [], "ms_median": None}) is None


def test_failure_messages_reach_the_cause(tmp_path):
    """Why a test failed travels with the finding: from JUnit, or a stored run's summary lines."""
    from mla_seam.suite import phases  # pylint: disable=import-outside-toplevel

    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="tests.gpu.bench_issue8" '
        'name="test_thd_sweep[fusion-on-1]"><failure message="megatron.core.utils.'
        'ExperimentalNotEnabledError: Flag config.ENABLE_EXPERIMENTAL not enabled.&#10;more">'
        "tb</failure></testcase><testcase classname=\"tests.gpu.bench_issue8\" "
        'name="test_thd_sweep[fusion-off-1]"/></testsuite></testsuites>'
    )
    failures = phases.parse_junit_failures(junit)
    key = "tests.gpu.bench_issue8::test_thd_sweep[fusion-on-1]"
    assert failures == {
        key: "megatron.core.utils.ExperimentalNotEnabledError: Flag config.ENABLE_EXPERIMENTAL"
        " not enabled."
    }
    stored = {  # a run recorded before "failures" existed: pytest's summary line, cut short
        "tests": {key: "failed"},
        "output_tail": "FAILED bench_issue8.py::test_thd_sweep[fusion-on-1] - megatron.core.utils.Exp...",
    }
    assert phases.failure_messages(stored) == {key: "megatron.core.utils.Exp..."}
    runs = [
        {"name": "thd-sweep", "role": "patched", "tests": {key: "failed"}, "failures": failures},
        {"name": "thd-sweep@vanilla", "phase": "thd-sweep", "role": "vanilla",
         "tests": {key: "failed"}, "failures": failures},
        {"name": "thd-sweep@base", "phase": "thd-sweep", "role": "base", "tests": {key: "passed"}},
    ]  # fmt: skip
    (found,) = attribution.test_findings(runs)
    assert found.attribution == "upstream changed"
    assert found.cause.endswith(
        "(vanilla, patched: megatron.core.utils.ExperimentalNotEnabledError: Flag "
        "config.ENABLE_EXPERIMENTAL not enabled.)"
    )


def _results(phases: List[Dict[str, Any]], records=(), golden=None, base_path="/t/p-0.16.1"):
    trees = {
        "patched": {"path": "/t/p-0.16.1", "version": "0.16.1", "patched": True},
        "vanilla": {"path": "/t/v-0.16.1", "version": "0.16.1", "patched": False},
        "base": {"path": base_path, "version": "0.16.1", "patched": True},
    }
    return {"trees": trees, "phases": phases, "records": list(records), "golden": golden or {}}


def test_a_release_that_is_its_own_base_reads_its_patched_tree_as_the_base():
    """The base release: a failure vanilla shares is standing; vanilla failing alone absorbed."""
    test = "tests.gpu.test_parity::test_hf_parity[te-none-3.0]"
    other = "tests.gpu.test_smoke::test_local_builds"
    phases = [
        {"name": "parity", "role": "patched", "ok": False, "exit_code": 1,
         "tests": {test: "failed", other: "passed"}},
        {"name": "parity@vanilla", "phase": "parity", "role": "vanilla", "ok": False,
         "exit_code": 1, "tests": {test: "failed", other: "failed"}},
    ]  # fmt: skip
    records = [
        {"case": "parity_hf", "spec": "te", "dtype": "fp32", "q_lora_rank": None,
         "input_rms": 3.0, "passed": False, "rel_err": 1.41e-3, "role": role}
        for role in ("patched", "vanilla")
    ]  # fmt: skip
    itself = _results(phases, records)
    assert attribution.base_is_patched(itself)
    found = {f.subject: f for f in attribution.findings_of(itself)}
    assert found[f"parity: {other}"].attribution == "absorbed"
    assert f"parity: {test}" not in found  # unchanged and not regressed: not listed
    parity = next(f for s, f in found.items() if s.startswith("parity_hf"))
    assert (parity.attribution, parity.regressed) == ("unchanged", False)
    # A unit whose tests failed measured what it should: not a breakdown of the phase.
    assert attribution.verdict_of(list(found.values()), itself) == ("pass", [])
    # Without the base the same failure is unattributed, and the verdict is left open.
    two = _results(phases, records, base_path="")
    del two["trees"]["base"]
    assert not attribution.base_is_patched(two)
    assert attribution.verdict_of(attribution.findings_of(two), two)[0] == "incomplete"


def test_a_phase_breaks_down_only_when_it_did_not_measure():
    failed = {"ok": False, "exit_code": 1, "tests": {"t": "failed"}}
    assert not attribution.broke_down(failed)
    assert attribution.broke_down({"ok": False, "exit_code": 1, "tests": {"t": "passed"}})
    assert attribution.broke_down({"ok": False, "exit_code": 2, "tests": {}})
    assert attribution.broke_down(dict(failed, timed_out=True))
    assert not attribution.broke_down({"ok": False, "skipped_reason": "needs 2 GPUs"})


def _golden(curve):
    return {"observed": {"lm loss": {"values": {str(i + 1): v for i, v in enumerate(curve)}}}}


@pytest.mark.parametrize(
    "fixed_patched,expected",
    [
        # 0.13.1 on H200: native curve off the base's (its spec forks the model-parallel RNG
        # for the down projections), the fixed-weights curve identical: initialization only.
        ([6.33, 5.2, 4.1], ("upstream changed", False)),
        # The fixed-weights curve moved too: what the model computes changed; nobody measured
        # vanilla, so it stays unattributed.
        ([6.33, 5.2, 4.2], ("unattributed", True)),
    ],
)
def test_golden_moves_from_initialization_only_are_upstream_and_not_regressions(
    fixed_patched, expected
):
    golden = {"patched": _golden([6.29, 1.9, 1.2]), "base": _golden([6.33, 2.1, 0.9])}
    records = [
        {"case": "golden_fixed", "spec": "te", "backend": "unfused", "role": role,
         "values": {"lm loss": curve, "grad norm": [1.0, 2.0, 3.0]}}
        for role, curve in (("patched", fixed_patched), ("base", [6.33, 5.2, 4.1]))
    ]  # fmt: skip
    results = _results([], records, golden, base_path="/t/p-0.16.1-base")
    found = {f.subject: f for f in attribution.findings_of(results)}
    native = found["golden values"]
    assert (native.attribution, native.regressed) == expected
    if not expected[1]:
        assert "initializes the model differently" in native.cause


# --- the folder's verdict: the multi-GPU run beside the suite run -----------------------------

_RESULTS = Path(__file__).resolve().parents[1] / "results"


def _case(name: str, patched: bool, vanilla: bool, checks=("grads<=0.005",)) -> Dict[str, Any]:
    def side(ok: bool) -> Dict[str, Any]:
        return {"ok": ok, "outcome": "ran", "failed_checks": [] if ok else list(checks)}

    return {"name": name, "patched": side(patched), "vanilla": side(vanilla)}


def _multigpu(tag: str, started: str, *cases: Dict[str, Any]) -> Dict[str, Any]:
    return {"tag": tag, "started": started, "parallel": {"world_size": 2}, "cases": list(cases)}


def test_multigpu_cases_are_findings_of_the_folder_verdict(tmp_path):
    """A multi-GPU case failing on the patched tree decides the tag as a failing test would."""
    from mla_seam.suite.runner import MULTIGPU_RESULTS, folder_verdict  # noqa: PLC0415

    results = json.loads((_RESULTS / "core_v0.14.0" / "h200" / "results.json").read_text())
    assert results["trees"]["base"]["tag"] == "core_v0.16.1"
    folder = tmp_path / "core_v0.14.0" / "h200"
    base = tmp_path / "core_v0.16.1" / "h200"
    alone = folder_verdict(results, folder)
    assert alone["verdict"] == "pass" and "multigpu" not in alone

    def put(where: Path, doc: Dict[str, Any]) -> None:
        (where / MULTIGPU_RESULTS).parent.mkdir(parents=True, exist_ok=True)
        (where / MULTIGPU_RESULTS).write_text(json.dumps(doc))

    # fails alike on vanilla, no base run on 2 GPUs: nobody to blame yet
    put(folder, _multigpu("core_v0.14.0", "T1", _case("tp2-sp/layer/te", False, False)))
    undecided = folder_verdict(results, folder)
    attribution.validate(undecided)
    assert undecided["verdict"] == "incomplete"
    assert undecided["multigpu"] == {"world_size": 2, "started": "T1", "base_started": None}
    assert undecided["reasons"][0].startswith("unattributed: 2 GPUs: tp2-sp/layer/te passed: ")
    # the base release passes it on 2 GPUs: upstream moved and the adapter does not absorb it
    put(base, _multigpu("core_v0.16.1", "T0", _case("tp2-sp/layer/te", True, True)))
    moved = folder_verdict(results, folder)
    assert moved["verdict"] == "upstream_changed" and moved["multigpu"]["base_started"] == "T0"
    assert "(vanilla, patched: grads<=0.005)" in moved["reasons"][0]
    # vanilla passes where patched fails: the overlay broke it
    put(folder, _multigpu("core_v0.14.0", "T2", _case("cp2/sweep/te", False, True, ["out<=0.02"])))
    broke = folder_verdict(results, folder)
    assert broke["verdict"] == "overlay_broke"
    assert broke["reasons"] == [
        "2 GPUs: cp2/sweep/te passed: vanilla True, patched False (patched: out<=0.02)"
    ]
    # a run of another tag in the folder is not read as this one's
    put(folder, _multigpu("core_v0.19.2", "T3", _case("cp2/sweep/te", False, True)))
    assert folder_verdict(results, folder) == alone
