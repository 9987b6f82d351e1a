"""``torchrun`` entry of the multi-GPU cases: one process per rank, inside one Megatron tree.

    MLA_SEAM_MEGATRON_TREE=DIR torchrun --nproc-per-node N tests/gpu/multigpu/dist_worker.py \\
        --plan PLAN.json --records OUT.jsonl [--cases NAME,NAME] [--backend nccl|gloo]

``mla-seam suite --nproc N`` (:mod:`mla_seam.suite.dist`) writes the plan (cases, layouts,
model sizes, tolerances: it validates them before any process starts) and runs this once per
tree; the cases run one after another in this process group, each re-initializing Megatron's
parallel state. Rank 0 appends one ``{"event": "start"}`` line before each case and one
``{"event": "result"}`` line after it, so the launcher knows which case a killed run was in
and resumes after it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREE = os.environ.get("MLA_SEAM_MEGATRON_TREE")
if TREE:
    sys.path.insert(0, str(Path(TREE).resolve()))
sys.path[:0] = [str(HERE.parent), str(HERE)]
_SCRIPTS = HERE.parents[2] / "scripts"  # mla_seam.deepseek for oracles.py, from the repository
if (_SCRIPTS / "mla_seam").is_dir() and str(_SCRIPTS) not in sys.path:
    sys.path.append(str(_SCRIPTS))

import dist_cases  # noqa: E402  pylint: disable=C0413
import dist_env  # noqa: E402  pylint: disable=C0413
import torch.distributed as dist  # noqa: E402  pylint: disable=C0413


def _append(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _record(case: dict, side: str, dev: str, result: dict) -> dict:
    return {
        "event": "result",
        "case": "multigpu",
        "side": side,
        "device": dev,
        "world_size": dist_env.world(),
        **{k: case.get(k) for k in ("name", "kind", "layout", "spec", "backend", "dtype")},
        **{k: case.get(k) for k in ("tolerance", "golden", "known_issue")},
        **result,
    }


def _desync(exc: Exception) -> dict:
    return {"outcome": "desync", "message": str(exc), "checks": {}, "ok": False, "seconds": None}


def main(argv=None) -> int:
    """Run the plan's cases; rank 0 writes the records. Exit 0 when the process group held."""
    parser = argparse.ArgumentParser(prog="dist_worker.py")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--records", required=True)
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None)
    args = parser.parse_args(argv)
    if not TREE:
        sys.stderr.write("dist_worker.py: set MLA_SEAM_MEGATRON_TREE to a Megatron checkout\n")
        return 2
    plan = json.loads(Path(args.plan).read_text(encoding="utf-8"))
    wanted = [n for n in args.cases.split(",") if n]
    cases = [c for c in plan["cases"] if not wanted or c["name"] in wanted]
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    dev = dist_env.init_process(args.backend)
    side = os.environ.get("MLA_SEAM_SIDE", "patched")
    shims = dist_env.cpu_shims() if dev == "cpu" else contextlib.nullcontext()
    with shims:
        for case in (dist_cases.for_side(c, side) for c in cases):
            if dist_env.rank() == 0:
                _append(args.records, {"event": "start", "name": case["name"], "side": side})
            try:
                result = dist_cases.run_case(case, dev)
            except dist_cases.Desync as exc:
                if dist_env.rank() == 0:
                    _append(args.records, _record(case, side, dev, _desync(exc)))
                sys.stderr.write(f"dist_worker.py: {exc}\n")
                sys.stderr.flush()
                os._exit(3)  # pylint: disable=protected-access
            if dist_env.rank() == 0:
                _append(args.records, _record(case, side, dev, result))
            dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
