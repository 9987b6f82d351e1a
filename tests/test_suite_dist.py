"""The multi-GPU phase (``mla_seam.suite.dist``) on the CPU: bad input, resume, and a real run.

Layouts that do not fit the model, N beyond the visible GPUs and a torch without NCCL are each
refused before any process group starts. The launcher's real path runs on two CPU processes
(torchrun + gloo) in a patched and a vanilla 0.19.2 tree: the local-spec cases (TP=2, PP=2
with virtual stages and uneven stages) against their one-process reference; the TE and CP
cases need GPUs and are recorded as skipped with their reason.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mla_seam import cli, suite
from mla_seam.errors import DeviceError, UsageError
from mla_seam.suite import dist as suite_dist

ROOT = Path(__file__).resolve().parents[1]


def _case(name: str):
    return next(c for c in suite_dist.default_cases(2) if c.name == name)


# --- layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nproc", [2, 4, 8])
def test_default_cases_fit_their_layouts(nproc):
    cases = suite_dist.default_cases(nproc)
    suite_dist.validate(cases, nproc)
    assert all(c.layout.world == nproc for c in cases)
    assert len({c.name for c in cases}) == len(cases)


def test_two_gpu_cases_cover_the_issue():
    slugs = {c.layout.slug for c in suite_dist.default_cases(2)}
    assert {"tp2-sp", "pp2-vpp2-first2", "cp2"} <= slugs
    kinds = {(c.kind, c.spec) for c in suite_dist.default_cases(2)}
    assert {
        ("tp_layer", "te"),
        ("tp_gpt", "te"),
        ("tp_layer", "local"),
        ("cp_sweep", "te"),
    } <= kinds
    comms = {str(c.cp_comm_type) for c in suite_dist.default_cases(2) if c.layout.cp > 1}
    assert {"p2p", "a2a", "('a2a', 'p2p')"} <= comms


@pytest.mark.parametrize("nproc", [0, 1, 3])
def test_nproc_without_layouts_is_refused(nproc):
    with pytest.raises(UsageError, match="even number"):
        suite_dist.default_cases(nproc)


@pytest.mark.parametrize(
    "name,change,problem",
    [
        ("tp2-sp/layer/te", dict(model=dict(heads=7)), "7 attention heads do not split"),
        ("tp2-sp/layer/te", dict(model=dict(seq=127)), "sequence length 127"),
        ("tp2-sp/gpt/te", dict(model=dict(vocab=511)), "vocabulary 511"),
        ("pp2-vpp2-first2/gpt/te", dict(layout=dict(first=3)), "first stage do not split"),
        ("pp2-vpp2-first2/gpt/te", dict(model=dict(layers=7)), "middle layers do not split"),
        ("pp2-vpp2-first2/gpt/te", dict(microbatches=3), "3 micro-batches"),
        ("pp2-vpp2-first4-last2/gpt/local", dict(model=dict(layers=8)), "no middle stage"),
        ("cp2/block-p2p/te", dict(model=dict(lengths=(32, 30))), "[30] are not multiples of"),
        ("cp2/block-a2a/te", dict(model=dict(heads=3)), "(a2a)"),
        ("cp2/block-per-layer/te", dict(cp_comm_type=("p2p",)), "1 entries for 2 layers"),
        ("cp2/sweep/te", dict(sweep=(3,)), "in 3 sequences"),
        ("cp2/sweep/te", dict(layout=dict(cp=4)), "CP = 1*1*4 = 4 ranks, not 2"),
    ],
)
def test_layout_that_does_not_fit_is_named(name, change, problem):
    case = _case(name)
    fields = {}
    for key, value in change.items():
        current = getattr(case, key)
        fields[key] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    bad = dataclasses.replace(case, **fields)
    with pytest.raises(UsageError) as err:
        suite_dist.validate([bad], 2)
    assert problem in str(err.value) and name in str(err.value)
    assert err.value.exit_code == 2


def test_zero_middle_stage_is_a_known_issue_of_the_vanilla_tree_only():
    """H7 absorbs it: the patched tree is judged like any other pipeline case."""
    known = _case("pp2-vpp2-first4-last2/gpt/local").known_issue
    assert known is suite_dist.ZERO_MIDDLE
    assert known["sides"] == ["vanilla"] and known["expect"] == "offset_error"
    assert known["match"] == "ZeroDivisionError"
    assert _case("tp2/layer/local").known_issue.get("sides") is None  # #1699: both trees


def test_unknown_case_lists_the_known_ones():
    with pytest.raises(UsageError, match="tp2-sp/layer/te"):
        suite_dist.select(suite_dist.default_cases(2), ["tp9"])
    chosen = suite_dist.select(suite_dist.default_cases(2), ["cp2/block"])
    assert [c.kind for c in chosen] == ["cp_block"] * 3


# --- devices ---------------------------------------------------------------------------------


def _device(**fields):
    base = dict(python="3.12", torch="2.11", cuda=True, device_count=2, name="NVIDIA H200")
    return suite.DeviceInfo(**{**base, **fields})


def test_no_cuda_is_a_device_error():
    with pytest.raises(DeviceError) as err:
        suite_dist.check_devices(_device(cuda=False, device_count=0), 2, sys.executable)
    assert err.value.exit_code == 18


def test_more_ranks_than_gpus_is_a_device_error():
    with pytest.raises(DeviceError, match="needs 4 CUDA devices; torch sees 2"):
        suite_dist.check_devices(_device(), 4, sys.executable, probe_nccl=False)


def test_torch_without_nccl_is_a_device_error():
    """This machine's CPU build of torch has no NCCL: the real probe must say so."""
    with pytest.raises(DeviceError, match="NCCL is not available"):
        suite_dist.check_devices(_device(), 2, sys.executable)


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "mla_seam.suite", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        check=False,
    )


def test_cli_refuses_bad_input_before_starting_anything(tmp_path, megatron_checkout):
    tree = str(megatron_checkout("0.19.2"))
    out = tmp_path / "out"
    odd = _cli("--megatron", tree, "--nproc", "3", "--out", str(out))
    assert odd.returncode == 2 and "even number" in odd.stderr
    unknown = _cli("--megatron", tree, "--nproc", "2", "--cases", "nope", "--out", str(out))
    assert unknown.returncode == 2 and "no multi-GPU case matches" in unknown.stderr
    gpus = _cli("--megatron", tree, "--nproc", "2", "--out", str(out))
    assert gpus.returncode == 18 and "CUDA device" in gpus.stderr
    for proc in (odd, unknown, gpus):
        assert "Traceback" not in proc.stderr
    assert not out.exists(), "nothing may be written before the checks pass"


# --- journal and goldens ---------------------------------------------------------------------


def test_resume_skips_finished_cases_and_marks_the_lost_one(tmp_path):
    cases = [_case("tp2/layer/local"), _case("tp2/gpt/local")]
    state = tmp_path / "state"
    state.mkdir()
    journal = state / "records.patched.jsonl"
    lines = [
        {"event": "start", "name": cases[0].name},
        {"event": "result", "name": cases[0].name, "outcome": "ran", "ok": True},
        {"event": "start", "name": cases[1].name},  # killed in this case
    ]
    journal.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    records = suite_dist.run_side(
        "patched", "/nonexistent", cases, nproc=2, python=sys.executable, repo=ROOT,
        state=state, backend="gloo", deadline=float("inf"),
    )  # fmt: skip
    assert [r["outcome"] for r in records] == ["ran", "crashed"]
    assert not list((state / "logs").iterdir()), "no process group was started"


def test_goldens_are_recorded_then_held_exactly(tmp_path):
    device = _device(te="2.20.2")
    folder = tmp_path / "core_v0.19.2" / "h200" / "multigpu"
    folder.mkdir(parents=True)
    record = {
        "side": "patched",
        "name": "pp2-vpp2-first2/gpt/te",
        "golden": "pp2-vpp2-first2",
        "outcome": "ran",
        "metrics": {"lm loss": [6.3, 5.1], "grad norm": [7.2, 6.3]},
    }

    def settle(rec):
        return suite_dist.settle_goldens([rec], folder, tmp_path, "core_v0.19.2", device, False)

    first = settle(record)["pp2-vpp2-first2"]
    assert first["status"] == "recorded"
    assert first["file"] == "golden_values_h200_te2.20.2_pp2-vpp2-first2.json"
    doc = suite.read_golden(folder / first["file"])
    assert doc["lm loss"]["values"] == {"1": 6.3, "2": 5.1}
    assert settle(record)["pp2-vpp2-first2"]["status"] == "matched"
    moved = dict(record, metrics={"lm loss": [6.3, 5.1000001], "grad norm": [7.2, 6.3]})
    third = settle(moved)["pp2-vpp2-first2"]
    assert third["status"] == "mismatch" and "lm loss step 2" in third["problems"][0]
    assert (folder / first["file"].replace(".json", ".observed.json")).is_file()
    shaky = settle(dict(record, deterministic=False))["pp2-vpp2-first2"]
    assert shaky["status"] == "nondeterministic"


# --- a real run on two CPU processes ---------------------------------------------------------

CPU_CASES = ["tp2/layer/local", "pp2-vpp2-first2/gpt/local", "pp2-vpp2-first4-last2", "cp2/sweep"]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, fresh_checkout):
    """patched and vanilla 0.19.2 through the launcher on 2 gloo processes (~40 s)."""
    work = tmp_path_factory.mktemp("dist")
    patched = fresh_checkout("0.19.2", work / "patched")
    vanilla = fresh_checkout("0.19.2", work / "vanilla")
    assert cli.main(["apply", str(patched)]) == 0
    results = suite_dist.run_multigpu(
        patched, vanilla, work / "out", 2, CPU_CASES, backend="gloo", time_budget_s=600
    )
    return results


def _record(results, name, side="patched"):
    return next(r for r in results["records"] if r["name"] == name and r["side"] == side)


@pytest.mark.slow
def test_cpu_tp2_matches_one_process_and_reproduces_upstream_1699(cpu_run):
    rec = _record(cpu_run, "tp2/layer/local")
    assert rec["outcome"] == "ran" and rec["world_size"] == 2
    assert rec["max_rel"]["out"] <= suite_dist.TOL_FP32[0]
    assert rec["checks"]["known_issue_reproduced"], rec["max_rel"]
    assert rec["max_rel"]["worst_grad"] == "grad:linear_kv_down_proj.weight"
    vanilla = _record(cpu_run, "tp2/layer/local", "vanilla")
    assert vanilla["outcome"] == "build_error" and "k_channels" in vanilla["message"]


@pytest.mark.slow
def test_cpu_pipeline_with_virtual_stages_equals_one_stage(cpu_run):
    rec = _record(cpu_run, "pp2-vpp2-first2/gpt/local")
    assert rec["outcome"] == "ran", rec["message"]
    checks = rec["checks"]
    for name in (
        "every_weight_placed_once",
        "layer_numbers_as_counted",
        "adapter_offset_as_counted",
        "upstream_offset_as_counted",
    ):
        assert checks[name], name
    assert rec["max_rel"]["loss"] <= suite_dist.TOL_FP32[0]
    assert rec["max_rel"]["grad_norm"] <= suite_dist.TOL_FP32[1]
    numbers = {(r["pp_rank"], r["vp_stage"]): r["layer_numbers"] for r in rec["offsets"]["table"]}
    assert numbers == {(0, 0): [1], (1, 0): [2, 3], (0, 1): [4], (1, 1): [5, 6]}


@pytest.mark.slow
def test_cpu_zero_middle_stage_layout_runs_patched_and_fails_vanilla(cpu_run):
    """PP=2 + VPP=2 with first 4 and last 2 layers: upstream's offset divides by zero middle
    stages on pipeline rank 1. The patched tree asks the adapter first (H7) and trains like
    PP=1; the vanilla tree still shows upstream's error in its offset table."""
    rec = _record(cpu_run, "pp2-vpp2-first4-last2/gpt/local")
    assert rec["outcome"] == "ran", rec["message"]
    assert rec["known_issue"] is None and "known_issue_reproduced" not in rec["checks"]
    for name in (
        "every_weight_placed_once",
        "layer_numbers_as_counted",
        "adapter_offset_as_counted",
        "upstream_offset_as_counted",
    ):
        assert rec["checks"][name], name
    assert rec["max_rel"]["loss"] <= suite_dist.TOL_FP32[0]
    assert rec["max_rel"]["grad_norm"] <= suite_dist.TOL_FP32[1]
    table = {(r["pp_rank"], r["vp_stage"]): r for r in rec["offsets"]["table"]}
    assert {k: r["layer_numbers"] for k, r in table.items()} == {
        (0, 0): [1, 2],
        (1, 0): [3],
        (0, 1): [4, 5],
        (1, 1): [6],
    }
    assert all(r["upstream_error"] is None for r in table.values())
    assert rec["ok"] is True
    vanilla = _record(cpu_run, "pp2-vpp2-first4-last2/gpt/local", "vanilla")
    assert vanilla["outcome"] == "build_error" and vanilla["known_issue"]["sides"] == ["vanilla"]
    errors = {
        (r["pp_rank"], r["vp_stage"]): r["upstream_error"] for r in vanilla["offsets"]["table"]
    }
    assert errors[(0, 0)] is None and errors[(0, 1)] is None
    assert "ZeroDivisionError" in errors[(1, 0)] and "ZeroDivisionError" in errors[(1, 1)]
    assert vanilla["checks"]["known_issue_reproduced"] and vanilla["ok"] is True
    row = next(r for r in cpu_run["cases"] if r["name"] == "pp2-vpp2-first4-last2/gpt/local")
    assert row["known_issue_sides"] == ["vanilla"] and row["patched"]["ok"] is True


@pytest.mark.slow
def test_cpu_backend_decision_and_summary_identical_on_every_rank(cpu_run):
    rec = _record(cpu_run, "tp2/layer/local")
    assert rec["checks"]["decision_identical_on_every_rank"]
    assert rec["checks"]["summary_identical_on_every_rank"]
    assert rec["adapter"]["summary"].startswith("mla-seam: k_channels=48 v_channels=40")


@pytest.mark.slow
def test_cpu_summary_logged_once_across_ranks(cpu_run):
    rec = _record(cpu_run, "tp2/layer/local")
    assert rec["adapter"]["logged_per_rank"] == [1, 0]


@pytest.mark.slow
def test_cpu_results_document(cpu_run):
    assert cpu_run["kind"] == suite_dist.KIND
    assert cpu_run["parallel"]["world_size"] == 2
    slugs = {x["slug"] for x in cpu_run["parallel"]["layouts"]}
    assert slugs == {"tp2", "pp2-vpp2-first2", "pp2-vpp2-first4-last2", "cp2"}
    sweep = next(r for r in cpu_run["cases"] if r["name"] == "cp2/sweep/te")
    assert sweep["patched"]["outcome"] == "skipped"
    assert "CUDA" in _record(cpu_run, "cp2/sweep/te")["message"]
    folder = Path(cpu_run["folder"])
    assert (folder / "results.md").read_text(encoding="utf-8").count("| pp2-vpp2") == 2
    assert json.loads((folder / "results.json").read_text(encoding="utf-8"))["tag"] == (
        "core_v0.19.2"
    )


@pytest.mark.slow
def test_cpu_context_parallel_code_path_at_cp1(tmp_path, cpu_run):
    """The CP cases' own code (THD references, per-sequence bshd, partitioning, reductions,
    training twice, the sweep) on two data-parallel CPU ranks at CP=1 with the local spec:
    CP itself needs TE on GPUs, everything around it must already hold here (exactly)."""
    tree = Path(cpu_run["megatron"]["path"])
    plan = []
    for name in ("cp2/block-per-layer/te", "cp2/sweep/te"):
        case = _case(name)
        case = dataclasses.replace(
            case,
            name=name.replace("cp2", "dp2-cp1"),
            layout=dataclasses.replace(case.layout, cp=1),
            model=dataclasses.replace(case.model, tokens=256),
            spec="local",
            backend="local",
            dtype="fp32",
            cp_comm_type=None,
            sweep=(1, 4),
            needs=(),
            golden="cp1",
        )
        plan.append(case.plan())
    (tmp_path / "plan.json").write_text(json.dumps({"cases": plan}), encoding="utf-8")
    records = tmp_path / "records.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / suite_dist.WORKER), "--plan", str(tmp_path / "plan.json"),
         "--records", str(records), "--backend", "gloo"],
        env={**__import__("os").environ, "MLA_SEAM_MEGATRON_TREE": str(tree)},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    done, open_case = suite_dist.read_journal(records)
    assert open_case is None and len(done) == 2
    block, sweep = done["dp2-cp1/block-per-layer/te"], done["dp2-cp1/sweep/te"]
    assert block["outcome"] == sweep["outcome"] == "ran", (block["message"], sweep["message"])
    assert block["max_rel"]["out"] == 0.0 and block["max_rel"]["grads"] == 0.0
    assert block["max_rel"]["thd_vs_bshd_cp1"] <= 1e-5
    assert block["deterministic"] is True
    assert [row["sequences"] for row in sweep["sweep"]] == [1, 4]
    assert all(row["out"] == 0.0 for row in sweep["sweep"])
