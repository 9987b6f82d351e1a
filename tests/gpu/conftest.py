"""Shared fixtures of the GPU suite (``tests/gpu``), run INSIDE one Megatron tree per process.

``MLA_SEAM_MEGATRON_TREE`` names the tree (patched, or vanilla for the benchmark baseline); it is
put first on ``sys.path``. ``mla-seam suite`` runs each file of this folder in its own pytest
process (see :mod:`mla_seam.suite`); running the folder by hand works too:

    MLA_SEAM_MEGATRON_TREE=/path/to/patched/checkout pytest tests/gpu

Markers: ``gpu`` (needs a CUDA device; TE cases also need Transformer Engine), ``multigpu``
(2+ devices, torchrun + NCCL; none yet), ``bench`` (timings recorded, never asserted).
Without a GPU the GPU-only tests skip with that reason; the oracle comparisons of the local spec
run on the CPU too (Megatron 0.19+, see :func:`megatron_env`).

Records: a test calls the ``record`` fixture; each call appends one JSON line to the file named
by ``MLA_SEAM_RESULTS`` (nothing is written when it is unset).

No file depends on another having run first: what a test needs comes from a fixture here
(``megatron_env`` makes the process group and parallel state once per session, whichever test
asks first, and reuses one that exists).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

TREE = os.environ.get("MLA_SEAM_MEGATRON_TREE")
if TREE:
    sys.path.insert(0, str(Path(TREE).resolve()))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# mla_seam (its data modules: mla_seam.deepseek) where the suite has not put it on PYTHONPATH:
# a run by hand from the repository.
_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if (_SCRIPTS / "mla_seam").is_dir() and str(_SCRIPTS) not in sys.path:
    sys.path.append(str(_SCRIPTS))

from mla_build import NO_TREE, cpu_blocker  # noqa: E402  pylint: disable=C0413


def pytest_configure(config: pytest.Config) -> None:
    """Register the suite's markers (``gpu``/``multigpu`` are in pyproject too)."""
    config.addinivalue_line("markers", "gpu: needs a CUDA device (TE cases: Transformer Engine)")
    config.addinivalue_line("markers", "multigpu: needs 2 or more CUDA devices (torchrun + NCCL)")
    config.addinivalue_line("markers", "bench: performance benchmark; recorded, never asserted")


def pytest_report_header(config: pytest.Config) -> str:
    """Say which Megatron tree this process imports."""
    return f"megatron tree (tests/gpu): {TREE or '(none)'}"


def free_port() -> int:
    """A TCP port nothing listens on now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_env() -> Iterator[str]:
    """Megatron's parallel state (TP=PP=CP=1, world size 1); yields the device, cuda or cpu.

    GPU: NCCL process group, ``model_parallel_cuda_manual_seed(1234)``. CPU: a gloo group and
    shims that let Megatron's CUDA-only calls run on a CPU build of torch (as
    ``tests/adapter/conftest.py``): ``torch.cuda.current_device()`` answers ``"cpu"``, the CUDA
    RNG tracker's fork is a no-op (every test here runs with dropout 0), and activation
    checkpointing's save/restore of the CUDA RNG state uses the CPU generator. Nothing about
    attention is replaced.
    """
    if not TREE:
        pytest.skip(NO_TREE)
    import torch  # pylint: disable=C0415
    from megatron.core import parallel_state, tensor_parallel  # pylint: disable=C0415

    cuda = torch.cuda.is_available()
    created = False
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        if cuda:
            torch.cuda.set_device(0)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
        created = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    with pytest.MonkeyPatch.context() as patch:
        if cuda:
            from megatron.core.tensor_parallel.random import (  # pylint: disable=C0415
                model_parallel_cuda_manual_seed,
            )

            model_parallel_cuda_manual_seed(1234)
        else:
            from megatron.core.tensor_parallel import random as mrandom  # pylint: disable=C0415

            patch.setattr(torch.cuda, "current_device", lambda: "cpu")
            tracker = tensor_parallel.get_cuda_rng_tracker()
            patch.setattr(tracker, "fork", lambda *a, **k: contextlib.nullcontext())
            # Activation checkpointing saves and restores the CUDA RNG state around recompute.
            patch.setattr(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
            patch.setattr(mrandom, "_set_cuda_rng_state", lambda *a, **k: None)
        yield "cuda" if cuda else "cpu"
    if created:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@pytest.fixture
def buildable(megatron_env: str) -> str:
    """``megatron_env``, skipping where this tree cannot build MLA on this device."""
    if megatron_env == "cpu":
        reason = cpu_blocker()
        if reason:
            pytest.skip(reason)
    return megatron_env


@pytest.fixture(scope="session")
def megatron_version() -> tuple:
    """``(major, minor, patch)`` of the tree's megatron-core."""
    if not TREE:
        pytest.skip(NO_TREE)
    from megatron.core import package_info  # pylint: disable=C0415

    return (int(package_info.MAJOR), int(package_info.MINOR), int(package_info.PATCH))


def write_record(fields: dict) -> None:
    """Append one JSON line to ``$MLA_SEAM_RESULTS`` (no-op when unset)."""
    path = os.environ.get("MLA_SEAM_RESULTS")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(fields, sort_keys=True, default=str) + "\n")


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``record(case=..., **fields)``: one result line, tagged with the test id and side."""

    def write(**fields) -> None:
        fields.setdefault("test", request.node.nodeid)
        fields.setdefault("side", os.environ.get("MLA_SEAM_SIDE", "patched"))
        write_record(fields)

    return write
