"""Process plumbing of the multi-GPU cases: process group, parallel state, weights, comparisons.

Runs inside every rank that ``torchrun`` starts (see ``dist_worker.py``), inside one Megatron
tree. On CUDA it uses NCCL, one device per local rank; without CUDA it uses gloo on the CPU
with :func:`cpu_shims`, so the TP and PP cases of the local spec run on a CPU machine too.

Weights move between layouts by Megatron's own parameter attributes, never by name lists:
a parameter with ``tensor_model_parallel`` is split along ``partition_dim`` in
``partition_stride`` pieces, as Megatron's ``_initialize_affine_weight_cpu`` splits a master
weight; a parameter marked ``sequence_parallel`` (norms, TE's duplicated down projections) holds
a partial gradient under sequence parallelism and is summed over the TP group, as Megatron's
``finalize_model_grads`` does.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence
from unittest import mock

import torch
import torch.distributed as dist

#: Seconds a collective may wait before the process group gives up (a hung case fails).
COLLECTIVE_TIMEOUT_S = int(os.environ.get("MLA_SEAM_DIST_TIMEOUT_S", "180"))


def init_process(backend: Optional[str] = None) -> str:
    """Join the ``torchrun`` process group; returns the device (``"cuda"`` or ``"cpu"``).

    Args:
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (NCCL where CUDA is visible, else gloo).
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return "cuda" if backend == "nccl" else "cpu"


def rank() -> int:
    """Global rank."""
    return dist.get_rank()


def world() -> int:
    """World size."""
    return dist.get_world_size()


@contextlib.contextmanager
def cpu_shims() -> Iterator[None]:
    """Let Megatron's CUDA-only calls run on a CPU build of torch (as ``tests/gpu/conftest.py``).

    ``torch.cuda.current_device()`` answers ``"cpu"`` (Megatron allocates buffers and pipeline
    messages there), ``torch.cuda.synchronize`` is a no-op, the CUDA RNG tracker's fork is a
    no-op (every case runs with dropout 0), activation checkpointing saves the CPU generator,
    and the pipeline schedules' token counter (``torch.zeros(..., device="cuda")``) lives on
    the CPU. Nothing about attention, communication or pipelining is replaced.
    """
    from megatron.core import tensor_parallel  # pylint: disable=C0415
    from megatron.core.pipeline_parallel import schedules  # pylint: disable=C0415
    from megatron.core.tensor_parallel import random as mrandom  # pylint: disable=C0415

    tracker = tensor_parallel.get_cuda_rng_tracker()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: "cpu"))
        stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None))
        stack.enter_context(
            mock.patch.object(tracker, "fork", lambda *a, **k: contextlib.nullcontext())
        )
        stack.enter_context(
            mock.patch.object(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
        )
        stack.enter_context(mock.patch.object(mrandom, "_set_cuda_rng_state", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(schedules, "torch", _CpuTorch()))
        yield


class _CpuTorch:
    """``torch`` as the pipeline schedules see it on a CPU machine: ``device="cuda"`` -> CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        """``torch.zeros`` with a CUDA device moved to the CPU."""
        if device is not None and str(device).startswith("cuda"):
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)


@contextlib.contextmanager
def parallel(
    dev: str, tp: int = 1, pp: int = 1, vp: Optional[int] = None, cp: int = 1, seed: int = 1234
) -> Iterator[Any]:
    """Megatron's parallel state for one layout (the rest of the world is data parallel).

    Yields ``megatron.core.parallel_state``; destroys the groups on exit.
    """
    from megatron.core import parallel_state  # pylint: disable=C0415

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        context_parallel_size=cp,
    )
    torch.manual_seed(seed)
    if dev == "cuda":
        from megatron.core.tensor_parallel.random import (  # pylint: disable=C0415
            model_parallel_cuda_manual_seed,
        )

        torch.cuda.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    try:
        yield parallel_state
    finally:
        parallel_state.destroy_model_parallel()


# --- weights ---------------------------------------------------------------------------------


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's copy of a (non-parallel) module equal to rank ``src``'s."""
    with torch.no_grad():
        for param in module.parameters():
            dist.broadcast(param.data, src=src)


def full_params(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A detached copy of every parameter of an unsplit (TP=1) module, by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _split(full: torch.Tensor, param: torch.Tensor, rank_: int, size: int) -> torch.Tensor:
    dim = int(getattr(param, "partition_dim", 0))
    stride = int(getattr(param, "partition_stride", 1) or 1)
    piece = full.size(dim) // (size * stride)
    pieces = torch.split(full, piece, dim=dim)
    return torch.cat(pieces[rank_::size], dim=dim)


#: Set by :func:`load_full` on each parameter it loaded: whether that parameter is a shard.
SPLIT_ATTR = "_mla_seam_tp_split"


def is_tp_split(param: torch.Tensor, tp: int) -> bool:
    """Whether Megatron split this parameter over the tensor-parallel ranks.

    Megatron's ``tensor_model_parallel`` flag, unless :func:`load_full` found the parameter at
    its full size (0.16's TE duplicated down projections carry the flag but are replicated).
    """
    flagged = bool(getattr(param, "tensor_model_parallel", False))
    return tp > 1 and bool(getattr(param, SPLIT_ATTR, flagged))


def load_full(
    module: torch.nn.Module, full: Dict[str, torch.Tensor], names: Optional[Dict[str, str]] = None
) -> List[str]:
    """Copy full (TP=1) weights into a possibly tensor-parallel ``module``.

    Args:
        module: The module of this rank.
        full: Full weights by the reference module's names.
        names: This module's parameter name -> the reference name (default: the same name).

    Returns:
        Reference names that were loaded (callers check nothing was left out).

    Raises:
        AssertionError: A name has no reference or a shard has the wrong shape.
    """
    from megatron.core import parallel_state  # pylint: disable=C0415

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    used = []
    with torch.no_grad():
        for name, param in module.named_parameters():
            ref_name = (names or {}).get(name, name)
            if ref_name not in full:
                raise AssertionError(f"{name}: no reference parameter {ref_name!r}")
            value = full[ref_name]
            split = is_tp_split(param, tp) and tuple(value.shape) != tuple(param.shape)
            setattr(param, SPLIT_ATTR, split)
            if split:
                value = _split(value, param, tp_rank, tp)
            if tuple(value.shape) != tuple(param.shape):
                raise AssertionError(
                    f"{name}: shard {tuple(value.shape)} does not fit {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))
            used.append(ref_name)
    return used


def param_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """``param.grad`` or Megatron's ``main_grad``."""
    grad = param.grad if param.grad is not None else getattr(param, "main_grad", None)
    return None if grad is None else grad.detach()


def reduce_sequence_parallel_grads(module: torch.nn.Module, config: Any) -> None:
    """Sum the partial gradients of ``sequence_parallel`` parameters over the TP group.

    What Megatron's ``finalize_model_grads`` does before the optimizer step.
    """
    from megatron.core import parallel_state  # pylint: disable=C0415

    if not config.sequence_parallel or parallel_state.get_tensor_model_parallel_world_size() < 2:
        return
    group = parallel_state.get_tensor_model_parallel_group()
    for param in module.parameters():
        if not getattr(param, "sequence_parallel", False):
            continue
        grad = param.grad if param.grad is not None else getattr(param, "main_grad", None)
        if grad is not None:
            dist.all_reduce(grad, group=group)


def gathered_grads(module: torch.nn.Module, names: Optional[Dict[str, str]] = None):
    """Full gradients of a tensor-parallel module, by reference name (every rank gets them).

    Split parameters are gathered over the TP group (inverse of :func:`load_full`); others
    are taken as they are (call :func:`reduce_sequence_parallel_grads` first).
    """
    from megatron.core import parallel_state  # pylint: disable=C0415

    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    out: Dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        grad = param_grad(param)
        if grad is None:
            raise AssertionError(f"{name} received no gradient")
        if is_tp_split(param, tp):
            parts = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(parts, grad.contiguous(), group=group)
            dim = int(getattr(param, "partition_dim", 0))
            stride = int(getattr(param, "partition_stride", 1) or 1)
            chunks = [torch.chunk(p, stride, dim=dim) for p in parts]
            grad = torch.cat([chunks[r][s] for s in range(stride) for r in range(tp)], dim=dim)
        out[(names or {}).get(name, name)] = grad
    return out


# --- comparisons -----------------------------------------------------------------------------


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` in float64 (the suite's metric everywhere)."""
    got, want = got.detach().double(), want.detach().double()
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    return diff / scale if scale else diff


def sharded_max_rel(got: torch.Tensor, want: torch.Tensor, group: Any = None) -> float:
    """:func:`max_rel` of a tensor split over ``group`` (each rank holds its part of both)."""
    got, want = got.detach().double(), want.detach().double()
    stats = torch.tensor(
        [(got - want).abs().max().item(), want.abs().max().item()],
        dtype=torch.float64,
        device=got.device,
    )
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    diff, scale = stats.tolist()
    return diff / scale if scale else diff


def all_ranks(value: Any) -> List[Any]:
    """``value`` of every rank, in rank order (picklable objects)."""
    out: List[Any] = [None] * world()
    dist.all_gather_object(out, value)
    return out


def worst(values: Dict[str, float], keys: Sequence[str] = ()) -> float:
    """Largest of ``values`` (restricted to ``keys`` when given); 0 for none."""
    items = [v for k, v in values.items() if not keys or k in keys]
    return max(items, default=0.0)
