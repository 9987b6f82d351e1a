"""Time the nightly job's CPU phase on each clone shape CI can make of upstream.

    PYTHONPATH=scripts python benchmarks/bench_nightly.py MIRROR WORK [SHAPES]

MIRROR is a git URL or path of NVIDIA/Megatron-LM with its tags (the project machine's copy:
/work/.mirror/NVIDIA+Megatron-LM/repo), WORK an empty folder, SHAPES a comma-separated subset
of ``full,blobless,treeless,shallow`` (default: all). For each shape: the clone as the workflow
would make it (only ``package_info.py`` checked out), its size, then two nights of
``python -m mla_seam.nightly --phase cpu`` (whole processes, discovery on the package index
included): the first with an empty state, the second with the first's state and nothing new
upstream. The mla-seam cache (sdists) is warm: warmed by the first shape's first night.
Prints a Markdown table and each night's step table; the numbers go to benchmarks/nightly.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from mla_seam import gitlayer

SHAPES: Dict[str, Dict[str, object]] = {
    "full": {},
    "blobless": {"filter_spec": "blob:none"},
    "treeless": {"filter_spec": "tree:0"},
    "shallow": {"depth": 1},
}
SPARSE = ["megatron/core/package_info.py"]
#: A local mirror's upload-pack does not serve filters unless told to (GitHub's does).
UPLOAD_PACK = "git -c uploadpack.allowFilter=true -c uploadpack.allowAnySHA1InWant=true upload-pack"


def _size(path: Path) -> float:
    done = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[0])


def _night(clone: Path, out: Path, state: Path) -> Dict[str, object]:
    cmd = [
        sys.executable, "-m", "mla_seam.nightly", "--phase", "cpu", "--out", str(out),
        "--megatron", str(clone), "--remote", "origin", "--state", str(state), "--no-plot",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    outcome = (
        json.loads((out / "outcome.json").read_text()) if (out / "outcome.json").is_file() else {}
    )
    return {"seconds": seconds, "exit": done.returncode, "steps": outcome.get("steps", [])}


def main() -> None:
    """Entry point."""
    mirror, work = sys.argv[1], Path(sys.argv[2])
    if not mirror.startswith(("file:", "http", "git@", "ssh:")):
        mirror = Path(mirror).resolve().as_uri()
    shapes = sys.argv[3].split(",") if len(sys.argv) > 3 else list(SHAPES)
    work.mkdir(parents=True, exist_ok=True)
    rows: List[str] = []
    tables: List[str] = []
    for shape in shapes:
        clone = work / shape / "megatron"
        start = time.perf_counter()
        gitlayer.clone(mirror, clone, sparse=SPARSE, upload_pack=UPLOAD_PACK, **SHAPES[shape])
        clone_s = time.perf_counter() - start
        size = _size(clone / ".git")
        state = work / shape / "state"
        nights = [_night(clone, work / shape / f"night{k}", state) for k in (1, 2)]
        rows.append(
            f"| {shape} | {clone_s:.1f} | {size:.0f} | {_size(clone / '.git'):.0f} | "
            f"{nights[0]['seconds']:.1f} (exit {nights[0]['exit']}) | "
            f"{nights[1]['seconds']:.1f} (exit {nights[1]['exit']}) |"
        )
        for k, night in enumerate(nights, 1):
            tables.append(
                f"\n{shape}, night {k}:\n\n| step | status | s | note |\n|---|---|---|---|"
            )
            tables += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['note']} |"
                       for s in night["steps"]]  # fmt: skip
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("\n| clone shape | clone s | .git MB after clone | .git MB after 2 nights | "
          "night 1 s (empty state) | night 2 s (nothing new) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n".join(tables))


if __name__ == "__main__":
    main()
