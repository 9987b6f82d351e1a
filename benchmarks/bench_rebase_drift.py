"""Time `mla-seam rebase` (survey of one tag), `mla-seam drift` (full sweep) and `apply` per line.

    python benchmarks/bench_rebase_drift.py [RUNS]

Whole processes, start to exit (what a user waits for), with a warm mla-seam cache (every
release's sdist and checkout cached; warmed outside the timing). The checkout the tools read is
built once with every known release (`mla-seam upstream get --into`). Prints a Markdown table
(min / median / max wall seconds); results/numbers go to benchmarks/rebase-drift.md.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Sequence

from mla_seam import upstream


def _seam(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "mla_seam", *args], capture_output=True, text=True)
    if done.returncode not in (0, 16, 17):
        raise RuntimeError(f"mla-seam {' '.join(args)} exited {done.returncode}: {done.stderr}")


def _timed(runs: int, prepare: Callable[[int], Sequence[str]]) -> List[float]:
    times = []
    for k in range(runs):
        args = prepare(k)
        start = time.perf_counter()
        _seam(*args)
        times.append(time.perf_counter() - start)
    return times


def _row(label: str, times: List[float]) -> str:
    return (
        f"| {label} | {len(times)} | {min(times):.2f} | {statistics.median(times):.2f} | "
        f"{max(times):.2f} |"
    )


def main() -> None:
    """Entry point."""
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for release in upstream.RELEASES:
        upstream.get(release)  # warm cache, outside the timings
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        combo = upstream.get_many(upstream.RELEASES, Path(tmp) / "megatron")
        for onto, line in (
            ("core_v0.17.1", "0.16"),
            ("core_v0.13.1", "0.16"),
            ("core_v0.19.2", "0.19"),
        ):
            times = _timed(
                runs, lambda k: ("rebase", "--megatron", str(combo), "--onto", onto, "--from", line)
            )
            rows.append(_row(f"rebase survey: {line} line onto {onto}", times))
        times = _timed(
            max(1, runs // 2),
            lambda k: ("drift", "--megatron", str(combo), "--tags", "0.13..0.19", "--no-plot"),
        )
        rows.append(_row("drift sweep 0.13..0.19 (15 tags)", times))
        times = _timed(
            max(1, runs // 2),
            lambda k: (
                "drift",
                "--megatron",
                str(combo),
                "--tags",
                "0.13..0.19",
                "--baseline",
                "0.16",
                "--out",
                str(Path(tmp) / f"drift{k}"),
            ),
        )
        rows.append(_row("drift sweep 0.13..0.19 + baseline 0.16 + outputs (png)", times))
        for line in upstream.lines():
            release = upstream.newest_in_line(line)
            trees = [
                upstream.get(release, into=Path(tmp) / f"apply-{release}-{k}") for k in range(runs)
            ]
            times = _timed(runs, lambda k: ("apply", str(trees[k])))
            rows.append(_row(f"apply core_v{line} to a fresh {release} checkout", times))
    cpus = os.cpu_count()
    sys.stdout.write(
        f"Machine: {platform.machine()}, {cpus} CPUs, Python {platform.python_version()}, "
        f"{platform.system()}\n\n| what | runs | min s | median s | max s |\n|---|---|---|---|---|\n"
    )
    sys.stdout.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
