"""Time `mla-seam apply` on fresh checkouts, as whole processes (what a user waits for).

    python benchmarks/bench_apply.py [RUNS] [RELEASE ...]

Each run gets its own fresh clone (made outside the timing) and times one `python -m mla_seam
apply DIR` process, start to exit. Prints min / median / max wall seconds per release.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mla_seam import upstream


def time_apply(release: str, runs: int) -> list:
    """Wall seconds of ``runs`` apply processes, each on a fresh clone of ``release``."""
    upstream.get(release)  # warm the cache outside the timing
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            tree = upstream.get(release, into=Path(tmp) / f"run{i}")
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "mla_seam", "apply", str(tree)],
                check=True,
                capture_output=True,
            )
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    """Entry point."""
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    for release in sys.argv[2:] or ["0.16.1", "0.19.2"]:
        times = time_apply(release, runs)
        sys.stdout.write(
            f"{release}: apply wall s over {runs} fresh checkouts: min {min(times):.3f} "
            f"median {statistics.median(times):.3f} max {max(times):.3f}\n"
        )


if __name__ == "__main__":
    main()
