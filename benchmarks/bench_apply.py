"""Time `mla-seam apply` as whole processes (what a user waits for), side by side in one run.

    python benchmarks/bench_apply.py [RUNS] [RELEASE ...]

Per release: apply on a fresh release checkout, apply on a fork of it (one user commit that
shifts every hook by a line: the strict-apply-with-offsets path, plus the round-trip check),
apply with ``--series`` forced (no fingerprint) against apply selected by content (the
fingerprint of every line's files), and the fingerprint alone in-process. Each run gets its own
fresh clone (made outside the timing). Prints min / median / max seconds.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

from mla_seam import gitlayer, releases, upstream
from mla_seam.selection import fingerprint
from mla_seam.tree import MegatronTree

HOOKED = (
    "megatron/core/transformer/multi_latent_attention.py",
    "megatron/core/transformer/transformer_config.py",
    "megatron/core/models/common/language_module/language_module.py",
)


def _fork(tree: Path) -> None:
    for rel in HOOKED:
        path = tree / rel
        path.write_bytes(b"# fork header line\n" + path.read_bytes())
    gitlayer.commit_all(gitlayer.open_repo(tree), "fork: a header line", "2026-01-01T00:00:00Z")


def _apply(tree: Path, *extra: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "mla_seam", "apply", *extra, str(tree)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def _runs(release: str, runs: int, prepare: Callable[[Path], None], *extra: str) -> List[float]:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            tree = upstream.get(release, into=Path(tmp) / f"run{i}")
            prepare(tree)
            times.append(_apply(tree, *extra))
    return times


def _fmt(times: List[float]) -> str:
    return f"min {min(times):.3f} median {statistics.median(times):.3f} max {max(times):.3f}"


def main() -> None:
    """Entry point."""
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    for release in sys.argv[2:] or ["0.16.1", "0.19.2"]:
        upstream.get(release)  # warm the cache outside the timing
        line = releases.line_dir_name(releases.line_of(release))
        rows: Dict[str, List[float]] = {
            "release (by content)": _runs(release, runs, lambda t: None),
            "release (--series, no fingerprint)": _runs(
                release, runs, lambda t: None, "--series", line
            ),
            "fork, every hook shifted": _runs(release, runs, _fork),
        }
        tree = MegatronTree.resolve(upstream.get(release))
        fp = []
        for _ in range(max(runs, 20)):
            start = time.perf_counter()
            fingerprint(tree)
            fp.append(time.perf_counter() - start)
        for name, times in rows.items():
            sys.stdout.write(f"{release} apply {name}: {_fmt(times)} s\n")
        sys.stdout.write(f"{release} fingerprint in-process: {_fmt([t * 1000 for t in fp])} ms\n")


if __name__ == "__main__":
    main()
