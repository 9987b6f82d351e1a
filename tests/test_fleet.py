"""Suite processes spread over a host's devices (``mla_seam.suite.fleet``), with real processes."""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest
from mla_seam.suite import fleet

#: A process that notes its device, its OMP threads and when it ran, then sleeps.
NOTE = textwrap.dedent("""\
    import json, os, sys, time
    start = time.time()
    time.sleep(float(sys.argv[2]))
    with open(sys.argv[1], "a") as f:
        f.write(json.dumps({"name": sys.argv[3], "dev": os.environ["CUDA_VISIBLE_DEVICES"],
                            "omp": os.environ.get("OMP_NUM_THREADS"),
                            "start": start, "end": time.time()}) + "\\n")
    """)


def _job(notes, name, seconds=0.3, **kwargs):
    return fleet.Job(name, [sys.executable, "-c", NOTE, str(notes), str(seconds), name], **kwargs)


def _read(notes):
    return {r["name"]: r for r in map(json.loads, notes.read_text().splitlines())}


def _overlap(a, b):
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_jobs_share_the_devices_one_each(tmp_path):
    notes = tmp_path / "notes.jsonl"
    jobs = [_job(notes, f"j{i}") for i in range(4)]
    done = fleet.run_jobs(jobs, [0, 1], tmp_path / "logs", poll_s=0.05)
    assert [j.outcome for j in done] == ["ran"] * 4 and {j.rc for j in done} == {0}
    seen = _read(notes)
    assert {r["dev"] for r in seen.values()} <= {"0", "1"}
    for name, row in seen.items():  # never two jobs on one device at once
        others = [o for n, o in seen.items() if n != name and o["dev"] == row["dev"]]
        assert not any(_overlap(row, o) for o in others)
    assert _overlap(seen["j0"], seen["j1"])  # two devices: two at a time
    assert all(r["omp"] for r in seen.values())
    assert all(j.log_path.is_file() for j in done)


def test_one_job_per_key_and_multi_device_jobs(tmp_path):
    notes = tmp_path / "notes.jsonl"
    jobs = [
        _job(notes, "a1", key="release-a"),
        _job(notes, "a2", key="release-a"),
        _job(notes, "pair", gpus=2),
    ]
    fleet.run_jobs(jobs, [0, 1, 2], tmp_path / "logs", poll_s=0.05)
    seen = _read(notes)
    assert not _overlap(seen["a1"], seen["a2"])  # one writer per results file
    assert seen["pair"]["dev"] in ("1,2", "0,2", "0,1") and jobs[2].devices == (1, 2)


def test_deadline_leaves_and_kills(tmp_path):
    notes = tmp_path / "notes.jsonl"
    long = _job(notes, "long", seconds=30)
    late = _job(notes, "late", estimate=600)
    start = time.monotonic()
    fleet.run_jobs([long, late], [0], tmp_path / "logs", deadline_s=1.0, poll_s=0.05)
    assert time.monotonic() - start < 10
    assert long.outcome == fleet.KILLED and long.rc is None
    assert late.outcome == fleet.LEFT and late.log_path is None
    assert not notes.exists()


def test_failing_job_keeps_its_status_and_output(tmp_path):
    job = fleet.Job("bad", [sys.executable, "-c", "import sys; print('why it broke'); sys.exit(3)"])
    fleet.run_jobs([job], [0], tmp_path / "logs", poll_s=0.05)
    assert job.rc == 3 and job.outcome == "ran" and job.tail() == "why it broke"


def test_no_device_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one device"):
        fleet.run_jobs([], [], tmp_path)
