"""The multi-GPU phase as pytest tests: one test per case, on every visible GPU (2 or more).

    MLA_SEAM_MEGATRON_TREE=PATCHED [MLA_SEAM_BASELINE_TREE=VANILLA] pytest -m multigpu \\
        tests/gpu/multigpu

Runs :func:`mla_seam.suite.dist.run_multigpu` once (torchrun + NCCL, every case in the patched
tree and, when given, the vanilla tree) and asserts each case of the patched tree; results go
to ``MLA_SEAM_MULTIGPU_OUT`` (default: a temporary folder). ``mla-seam suite --nproc N`` is
the same run with the results kept under ``results/``.
"""

from __future__ import annotations

import os

import pytest
import torch

TREE = os.environ.get("MLA_SEAM_MEGATRON_TREE")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
NPROC = int(os.environ.get("MLA_SEAM_NPROC") or (GPUS - GPUS % 2 if GPUS >= 2 else 2))


def _cases():
    from mla_seam.suite import dist as suite_dist  # pylint: disable=C0415

    try:
        return [c.name for c in suite_dist.default_cases(NPROC)]
    except Exception:  # pylint: disable=broad-except
        return []


@pytest.fixture(scope="module")
def multigpu_run(tmp_path_factory):
    """Every case of :func:`default_cases` on ``NPROC`` GPUs (both trees when given)."""
    if not TREE:
        pytest.skip("needs MLA_SEAM_MEGATRON_TREE (a patched Megatron checkout)")
    if GPUS < NPROC:
        pytest.skip(f"needs {NPROC} CUDA devices with NCCL; this machine has {GPUS}")
    from mla_seam.suite import dist as suite_dist  # pylint: disable=C0415

    out = os.environ.get("MLA_SEAM_MULTIGPU_OUT") or str(tmp_path_factory.mktemp("multigpu"))
    return suite_dist.run_multigpu(
        TREE, os.environ.get("MLA_SEAM_BASELINE_TREE"), out, NPROC, fresh=True
    )


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("name", _cases())
def test_case_on_every_rank(multigpu_run, name):
    record = next(
        r for r in multigpu_run["records"] if r["name"] == name and r["side"] == "patched"
    )
    if record["outcome"] == "skipped":
        pytest.skip(record["message"])
    failed = sorted(k for k, ok in (record.get("checks") or {}).items() if not ok)
    assert record["ok"], f"{record['outcome']}: {failed} {record.get('max_rel')} " + (
        record.get("message") or ""
    )


@pytest.mark.gpu
@pytest.mark.multigpu
def test_golden_values_hold(multigpu_run):
    mismatched = {k: v for k, v in multigpu_run["golden"].items() if v["status"] == "mismatch"}
    assert not mismatched, mismatched
