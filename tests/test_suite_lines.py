"""The suite's driver of several lines (``mla_seam.suite.lines``) on the CPU: specs, chunks,
resume, deadlines, the results folder each line names, and the command line's refusals.

The suite processes themselves need a GPU; here the deadline leaves every chunk unstarted, and
the nightly's test (tests/test_nightly.py) runs real suite processes that exit 18 without one.
"""

from __future__ import annotations

import json
import sys

import pytest
from mla_seam import cli, suite
from mla_seam.suite import fleet, lines

H200 = suite.DeviceInfo(python="3.12", torch="2.11", cuda=True, device_count=2, name="NVIDIA H200")


def test_specs_name_what_its_base_and_its_units():
    assert lines.parse_spec("0.18.2:0.16.1") == ("0.18.2", "0.16.1", None)
    assert lines.parse_spec("0.16.1:none") == ("0.16.1", None, None)
    assert lines.parse_spec("0.19.2:0.16.1=parity,bench") == (
        "0.19.2",
        "0.16.1",
        {"parity", "bench"},
    )
    assert lines.parse_spec(".device/dev.tar.gz:0.19.2") == (".device/dev.tar.gz", "0.19.2", None)
    assert lines.parse_spec("0.19") == ("0.19", None, None)


def _results(folder, phases):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"phases": phases}))


def test_chunks_skip_what_is_done_and_a_release_that_is_its_own_base(tmp_path):
    trees = {r: tmp_path / r for r in ("patched", "vanilla", "base")}
    line = lines.Line("core_v0.19.2", trees, tmp_path / "out")
    folder = tmp_path / "out" / "core_v0.19.2" / "h200"
    _results(folder, [{"name": "matrix"}, {"name": "oracles", "timed_out": True}])
    jobs = lines.line_jobs(line, folder, "py")
    names = [j.name for j in jobs]
    assert names[0] == "core_v0.19.2:oracles"  # matrix is done; a timed-out unit is not
    assert not any("matrix" in n for n in names) and not any("local-vs-te" in n for n in names)
    assert names[-1] == "core_v0.19.2:bench+bench@vanilla+bench@base"
    assert all(j.key == "core_v0.19.2" for j in jobs)
    argv = jobs[0].argv
    assert argv[:3] == ["py", "-m", "mla_seam.suite"] and argv[-2:] == ["--only", "oracles"]
    assert argv[argv.index("--base-megatron") + 1] == str(trees["base"])
    assert jobs[0].estimate == lines.START_S + lines.ESTIMATE["oracles"]

    again = lines.Line("core_v0.19.2", trees, tmp_path / "out", units={"matrix", "local-vs-te"})
    assert [j.name for j in lines.line_jobs(again, folder, "py")] == [
        "core_v0.19.2:matrix",  # named units run again even when done
        "core_v0.19.2:local-vs-te",
    ]
    own = lines.Line("x", dict(trees, base=trees["patched"]), tmp_path / "out")
    assert not any("@base" in j.name for j in lines.line_jobs(own, tmp_path / "none", "py"))
    whole = lines.Line("main", trees, tmp_path / "out", whole=True)
    (job,) = lines.line_jobs(whole, folder, "py")
    assert "--only" not in job.argv and job.estimate == lines.WHOLE_S


def test_each_line_names_its_folder_and_the_deadline_starts_nothing_late(
    megatron_checkout, tmp_path
):
    tree = megatron_checkout("0.19.2")
    out = tmp_path / "out"
    line = lines.Line("core_v0.19.2", {"patched": tree, "vanilla": tree}, out)
    folder = out / "core_v0.19.2" / "h200"
    _results(folder, [{"name": "smoke"}, {"name": "smoke@vanilla"}])
    verdict = {"tag": "core_v0.19.2", "verdict": "pass", "counts": {"unchanged": 3}}
    (folder / "verdict.json").write_text(json.dumps(verdict))
    said = []
    (outcome,) = lines.run_lines(
        [line], [0, 1], tmp_path / "logs", H200, deadline_s=0, say=said.append
    )
    assert outcome.folder == folder and outcome.verdict == verdict
    assert outcome.done == ["smoke", "smoke@vanilla"]
    assert outcome.jobs and all(j.outcome == fleet.LEFT and j.rc is None for j in outcome.jobs)
    assert said[0].endswith("GPU-s estimated") and len(said) == 1 + len(outcome.jobs)
    assert not list((tmp_path / "logs").glob("*.log"))  # nothing started
    summary = lines.write_summary([outcome], out)
    assert summary == {"core_v0.19.2": ["smoke", "smoke@vanilla"]}
    assert json.loads((out / lines.SUMMARY_NAME).read_text()) == summary


def test_a_line_without_results_has_no_verdict(tmp_path):
    outcome = lines.LineOutcome(lines.Line("k", {}, tmp_path), tmp_path / "none", [], [])
    assert outcome.verdict is None


@pytest.fixture
def no_gpu(monkeypatch):
    nogpu = suite.DeviceInfo(python="3.11", torch="2.13.0+cpu", cuda=False)
    monkeypatch.setattr(suite.device, "probe_device", lambda python: nogpu)


def test_several_lines_without_a_gpu_stage_nothing(no_gpu, tmp_path, caplog):
    work = tmp_path / "trees"
    argv = ["suite", "--release", "0.19.2:none", "--release", "0.16.1:none", "--work", str(work)]
    assert cli.main(argv + ["--out", str(tmp_path / "out")]) == 18
    assert not work.exists() and "needs a CUDA device" in caplog.text


def test_the_command_line_refuses_mixed_modes_and_bad_gpus(tmp_path, monkeypatch, caplog):
    argv = ["suite", "--megatron", str(tmp_path), "--target", "dev.tar.gz:none"]
    assert cli.main(argv) == 2
    assert "--megatron runs one set of trees" in caplog.text
    monkeypatch.setattr(suite.device, "probe_device", lambda python: H200)
    work = tmp_path / "w"
    for gpus in ("0,a", ",", "-1"):
        argv = [
            "suite",
            "--release",
            "0.19",
            "--gpus",
            gpus,
            "--work",
            str(work),
            "--out",
            str(work),
        ]
        assert cli.main(argv) == 2
        assert f"--gpus {gpus}: not a comma-separated list" in caplog.text and not work.exists()


def test_python_m_suite_runs_the_driver(tmp_path):
    """The entry point GPU machines use takes the driver's options (no GPU here: exit 18)."""
    import subprocess  # pylint: disable=import-outside-toplevel

    proc = subprocess.run(
        [sys.executable, "-m", "mla_seam.suite", "--release", "0.19.2:none", "--deadline-s", "60",
         "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 18, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()
