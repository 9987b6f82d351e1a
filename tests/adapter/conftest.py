"""Adapter tests run INSIDE a patched Megatron tree, one release line per pytest process.

``tests/test_adapter_lines.py`` applies the series to a checkout of each supported release and
runs this folder in a subprocess with ``MLA_SEAM_MEGATRON_TREE`` pointing at it (one Megatron
per interpreter: ``megatron.core`` cannot be imported twice). Run directly:

    MLA_SEAM_MEGATRON_TREE=/path/to/patched/checkout pytest tests/adapter
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

TREE = os.environ.get("MLA_SEAM_MEGATRON_TREE")
if not TREE:
    collect_ignore_glob = ["test_*.py"]  # collected only through test_adapter_lines.py
else:
    sys.path.insert(0, str(Path(TREE).resolve()))
    # tests/gpu's helpers: the one PackedSeqParams builder (mla_build.packed_seq_params)
    sys.path.append(str(Path(__file__).resolve().parents[1] / "gpu"))


def pytest_report_header(config):
    return f"megatron tree: {TREE or '(none: adapter tests not collected)'}"


@pytest.fixture(scope="session")
def megatron_version() -> tuple:
    from megatron.core import package_info

    return (package_info.MAJOR, package_info.MINOR, package_info.PATCH)


@pytest.fixture(scope="session")
def parallel_state():
    """A one-process gloo group and Megatron's parallel state (TP=PP=CP=1) on the CPU."""
    from megatron.core import parallel_state as ps
    from pipeline_offsets import init_parallel_state

    init_parallel_state()
    yield ps


@pytest.fixture
def cpu_device(monkeypatch, parallel_state):
    """Let Megatron's CUDA-only calls run on the CPU build of torch.

    Megatron asks ``torch.cuda.current_device()`` for the device of RoPE buffers and its
    global matmul buffer, and forks the CUDA RNG tracker around attention dropout. On a CPU
    machine the device becomes ``"cpu"`` and the fork a no-op (every test here runs with
    dropout 0, so the RNG stream is never drawn from). Nothing about attention is replaced.
    """
    import torch
    from megatron.core import tensor_parallel

    if torch.cuda.is_available():
        yield "cuda"
        return
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    tracker = tensor_parallel.get_cuda_rng_tracker()
    monkeypatch.setattr(tracker, "fork", lambda *a, **k: contextlib.nullcontext())
    yield "cpu"
