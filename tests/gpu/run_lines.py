"""Three-tree suites of several release lines spread over the GPUs of one host, inside a deadline.

Device glue for committing results (issue 9): a lent machine gives at most 10 minutes a call, a
three-tree run of one release takes 10-12 minutes on one H200, and a host has 2-8 GPUs. This
script stages every tree first, then runs the suite's units in chunks (one ``mla-seam suite
--only ...`` process per chunk, merged into ``OUT/<tag>/<card>/results.json``), spread over the
GPUs by :mod:`mla_seam.suite.fleet`: one chunk per GPU at a time and one chunk per release at a
time (a release's results file has one writer). A chunk
starts only when its estimate fits before the deadline; units already in a results file are not
run again, so a second call with the same OUT (carried back) finishes what the first left.

    python3 tests/gpu/run_lines.py --out OUT --work TREES --deadline-s 540 \\
        --release 0.18.2:0.16.1 --release 0.16.1:none --release 0.19.2:0.16.1=parity,bench \\
        [--target .device/dev.tar.gz:0.19.2] [--dist 0.16.1:2] [--gpus 0,1,2,3]

``--release V:BASE[=UNITS]`` (BASE ``none``: two trees; UNITS: phase or unit names, run again
even when done; default: what is not done yet of the whole suite but ``local-vs-te``). ``--target
ARCHIVE:BASE[=UNITS]`` does the same for a moving target (main, dev) carried as a ``git archive``
of its ``megatron/`` folder (``git archive -o dev.tar.gz origin/dev megatron``): vanilla and
patched trees are unpacked from it (:func:`mla_seam.suite.trees.stage_archive`; the series is the
one the content selects) and the results go to ``OUT/<target>/<card>/``. ``--dist V:N`` also runs
the multi-GPU cases of V on N GPUs (``mla-seam suite --nproc N``). Writes ``OUT/run_lines.log``,
``OUT/run_lines.json`` and each process's output under ``OUT/logs/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

# pylint: disable=wrong-import-position
from mla_seam import releases  # noqa: E402
from mla_seam.suite import fleet  # noqa: E402
from mla_seam.suite.trees import inspect_tree, stage, stage_archive  # noqa: E402

#: Units run together in one suite process (one merge each), in the order they are started.
CHUNKS = (
    ("matrix",),
    ("oracles",),
    ("thd-sweep", "thd-sweep@vanilla", "thd-sweep@base"),
    ("smoke", "smoke@vanilla", "golden", "golden@vanilla", "golden@base"),
    ("parity", "parity@vanilla", "parity@base", "kernels", "kernels@vanilla"),
    ("graphs", "graphs@vanilla"),
    ("bench", "bench@vanilla", "bench@base", "local-vs-te"),
)
#: Seconds per unit on one H200 (core_v0.19.2, 2026-11-29; older lines are faster).
ESTIMATE = {
    "smoke": 33, "smoke@vanilla": 24, "oracles": 90, "matrix": 108, "golden": 23,
    "golden@vanilla": 19, "golden@base": 21, "thd-sweep": 45, "thd-sweep@vanilla": 40,
    "thd-sweep@base": 37, "parity": 36, "parity@vanilla": 33, "parity@base": 33, "kernels": 25,
    "kernels@vanilla": 41, "graphs": 60, "graphs@vanilla": 60, "bench": 30, "bench@vanilla": 30, "bench@base": 30, "local-vs-te": 30,
}  # fmt: skip
#: The suite process's own start (device probe, tree inspection, merge).
START_S = 12
DIST_S = 200


def _say(log, text: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {text}"
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()


def done_units(out: Path, tag: str) -> set:
    """Units already in ``OUT/<tag>/*/results.json`` (run to the end, ok or not)."""
    done = set()
    for path in out.glob(f"{tag}/*/results.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        done |= {p["name"] for p in data.get("phases", []) if not p.get("timed_out")}
    return done


def _spec(spec: str):
    """``WHAT:BASE[=UNITS]`` -> ``(what, base or None, wanted units or None)``."""
    head, _, units = spec.partition("=")
    what, _, base = head.rpartition(":") if ":" in head else (head, "", "")
    base = None if base in ("", "none") else base
    return what, base, ({u for u in units.split(",") if u} if units else None)


def release_jobs(spec: str, out: Path, work: Path, python: str) -> List[fleet.Job]:
    """The chunks still to run for ``V:BASE[=UNITS]``."""
    version, base, wanted = _spec(spec)
    trees = stage(version, base, work)
    return suite_jobs(trees, version, releases.tag_of(version), out, wanted, python)


def target_jobs(spec: str, out: Path, work: Path, python: str) -> Tuple[str, List[fleet.Job]]:
    """The results tag (``main``, ``dev``) and the chunks still to run for a moving target's
    ``ARCHIVE:BASE[=UNITS]``."""
    archive, base, wanted = _spec(spec)
    trees = stage_archive(archive, work)
    if base:
        trees["base"] = stage(base, None, work)["patched"]
    tag = inspect_tree(trees["patched"], "--megatron").tag
    return tag, suite_jobs(trees, tag, tag, out, wanted, python)


def suite_jobs(
    trees: dict, key: str, tag: str, out: Path, wanted: Optional[set], python: str
) -> List[fleet.Job]:
    """One ``mla-seam suite --only`` job per chunk of units not yet in ``OUT/<tag>``."""
    done = done_units(out, tag)
    jobs = []
    for chunk in CHUNKS:
        pick = []
        for unit in chunk:
            phase = unit.split("@")[0]
            role = unit.split("@")[1] if "@" in unit else "patched"
            if role not in trees or (unit in done and wanted is None):
                continue
            if role == "base" and trees["base"] == trees["patched"]:  # its own base: measured once
                continue
            if wanted is None and phase == "local-vs-te":
                continue
            if wanted is not None and unit not in wanted and phase not in wanted:
                continue
            pick.append(unit)
        if not pick:
            continue
        argv = [python, "-m", "mla_seam", "suite", "--megatron", str(trees["patched"])]
        argv += ["--vanilla-megatron", str(trees["vanilla"]), "--out", str(out)]
        if "base" in trees:
            argv += ["--base-megatron", str(trees["base"])]
        argv += ["--only", ",".join(pick)]
        estimate = START_S + sum(ESTIMATE.get(u, 40) for u in pick)
        jobs.append(fleet.Job(f"{key}:{'+'.join(pick)}", argv, key=key, estimate=estimate))
    return jobs


def dist_job(spec: str, out: Path, work: Path, python: str, budget: float) -> fleet.Job:
    """``V:N``: the multi-GPU cases of V on N GPUs, patched and vanilla."""
    version, _, nproc = spec.partition(":")
    trees = stage(version, None, work)
    argv = [python, "-m", "mla_seam", "suite", "--nproc", nproc or "2"]
    argv += ["--megatron", str(trees["patched"]), "--vanilla-megatron", str(trees["vanilla"])]
    argv += ["--out", str(out), "--time-budget-s", str(int(budget))]
    return fleet.Job(f"dist {version} x{nproc}", argv, gpus=int(nproc or 2), estimate=DIST_S)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--deadline-s", type=float, default=540)
    parser.add_argument("--release", action="append", default=[], metavar="V:BASE[=UNITS]")
    parser.add_argument("--target", action="append", default=[], metavar="ARCHIVE:BASE[=UNITS]")
    parser.add_argument("--dist", action="append", default=[], metavar="V:N")
    parser.add_argument("--gpus", help="comma-separated device indices (default: all visible)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.deadline_s
    import torch  # pylint: disable=import-outside-toplevel

    gpus = (
        [int(g) for g in args.gpus.split(",")]
        if args.gpus
        else list(range(torch.cuda.device_count()))
    )
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "run_lines.log", "a", encoding="utf-8") as log:
        _say(log, f"GPUs {gpus}; deadline {args.deadline_s:.0f}s")
        for spec in args.release + args.target:  # bases first: several share one base tree
            base = _spec(spec)[1]
            if base:
                stage(base, None, args.work)
        jobs: List[fleet.Job] = []
        for spec in args.dist:
            jobs.append(dist_job(spec, args.out, args.work, sys.executable, args.deadline_s / 2))
        for spec in args.release:
            jobs += release_jobs(spec, args.out, args.work, sys.executable)
        tags = [releases.tag_of(_spec(spec)[0]) for spec in args.release]  # results folders
        for spec in args.target:
            tag, found = target_jobs(spec, args.out, args.work, sys.executable)
            tags.append(tag)
            jobs += found
        _say(
            log,
            f"staged; {len(jobs)} jobs, {sum(j.estimate * j.gpus for j in jobs):.0f} GPU-s estimated",
        )
        left = deadline - time.monotonic()
        for job in fleet.run_jobs(jobs, gpus, args.out / "logs", deadline_s=left):
            done = f"rc={job.rc} {job.seconds:.0f}s" if job.outcome == "ran" else job.outcome
            _say(log, f"{done} (est {job.estimate:.0f}s) {job.name}")
        summary = {tag: sorted(done_units(args.out, tag)) for tag in tags}
        (args.out / "run_lines.json").write_text(
            json.dumps(summary, indent=1) + "\n", encoding="utf-8"
        )
        _say(log, "units done per release: " + json.dumps({k: len(v) for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
