"""CUDA graphs: an MLA layer's forward + backward captured whole, replayed, equal to eager.

Issue 20, item 3. One MLA layer (DeepSeek-V2-Lite attention dims, YaRN, bf16), the TE spec with
``--attention-backend fused`` and the local spec, bshd (1024 x 2) and THD (2048 tokens in 4
sequences, ``max_seqlen`` 1024 given, the offsets a static device buffer). The whole step
(forward, then backward of a fixed output gradient) is captured once with
``torch.cuda.CUDAGraph`` after warm-up steps on a side stream (PyTorch's whole-network recipe),
with Megatron's RNG tracker in its graph-safe form (``use_cudagraphable_rng``, as a user
capturing graphs sets it). Every call builds a new ``PackedSeqParams`` over the buffer, as every
training step has its own batch (``pad_between_seqs=False`` where the class has the field,
as a data path that packs without padding says).

* Replays equal eager runs on the same inputs: output, input gradient and every parameter
  gradient, for the split the graph was captured with and for a second split of the same tokens
  and sequence count written into the buffer before the replay (nothing the adapter made from
  the first split's offsets may be a constant of the graph). Bit for bit where eager itself is
  reproducible (same kernels, deterministic); otherwise to bf16 rounding, and recorded so.
* Graphed vs eager step times are recorded (``graph_step``), never asserted.

Where the capture fails outside the adapter (upstream Megatron or TE reading the device, or an
operation a capture does not allow), the test skips with the exception and the file and line
that raised it: that line cannot be captured there. A failure inside the adapter fails the test.
On a vanilla tree (the suite runs this file there too) the same skips say where upstream's own
MLA cannot be captured.
"""

from __future__ import annotations

import inspect
import os
import statistics
import traceback
from typing import Dict, List, Tuple

import pytest
import torch
from bench import time_ms
from mla_build import NO_CUDA, NO_TE, build_attention, have_adapter, have_te, packed_seq_params
from oracles import V2_LITE, make_input, max_rel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

CASES = [("te", "fused"), ("local", "local")]
BSHD = (1024, 2)
#: Two splits of the same 2048 tokens into 4 sequences; the graph is captured with the first.
SPLITS = ([512, 256, 1024, 256], [128, 1024, 640, 256])
#: Covers both splits; 4 x 1024 = 2 x 2048 slots, so the local spec runs its one-call THD
#: layout in eager too (the same kernels as in the graph).
MAX_SEQLEN = 1024
WARMUP = 3
REPS = int(os.environ.get("MLA_SEAM_BENCH_REPS", "10"))


@pytest.fixture(scope="module")
def graph_safe_rng(megatron_env):
    """Megatron's CUDA RNG tracker, graph-safe, for this module; the default one after."""
    from megatron.core.tensor_parallel import random as mrandom  # pylint: disable=C0415

    seed = inspect.signature(mrandom.model_parallel_cuda_manual_seed).parameters
    if "use_cudagraphable_rng" not in seed or not hasattr(mrandom, "initialize_rng_tracker"):
        pytest.skip("this Megatron has no graph-safe RNG tracker (use_cudagraphable_rng)")
    mrandom.initialize_rng_tracker(use_cudagraphable_rng=True, force_reset=True)
    mrandom.model_parallel_cuda_manual_seed(1234, use_cudagraphable_rng=True)
    yield
    mrandom.initialize_rng_tracker(force_reset=True)
    mrandom.model_parallel_cuda_manual_seed(1234)


def _offsets(lengths: List[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device="cuda")


class Step:
    """Forward + backward of one layer on static inputs (THD: a static offsets buffer)."""

    def __init__(self, built, layout: str) -> None:
        hidden = built.hyper.hidden_size
        self.built = built
        shape = (*BSHD, hidden) if layout == "bshd" else (sum(SPLITS[0]), 1, hidden)
        self.x = make_input(shape, device="cuda").bfloat16().requires_grad_(True)
        gen = torch.Generator(device="cuda").manual_seed(7)
        self.grad = torch.randn(shape, device="cuda", generator=gen).bfloat16()
        self.mask = None
        if built.spec == "local" and layout == "bshd":
            seq = shape[0]
            self.mask = torch.ones(seq, seq, dtype=torch.bool, device="cuda").triu(1)[None, None]
        self.cu = _offsets(SPLITS[0]) if layout == "thd" else None

    def use(self, split: int) -> None:
        """Write split ``split``'s offsets into the static buffer (THD)."""
        if self.cu is not None:
            self.cu.copy_(_offsets(SPLITS[split]))

    def params(self):
        """A new batch over the static buffer, sizes given (Megatron's data path); where the
        class has ``pad_between_seqs`` (0.19+) it says there is none, so TE need not compare
        offsets to find out."""
        return packed_seq_params(cu=self.cu, max_seqlen=MAX_SEQLEN, pad_between_seqs=False)

    def __call__(self) -> torch.Tensor:
        kwargs = {} if self.cu is None else {"packed_seq_params": self.params()}
        out, bias = self.built.module(self.x, self.mask, **kwargs)
        if bias is not None:
            out = out + bias
        out.backward(self.grad)
        return out

    def clear_grads(self) -> None:
        """Gradients to ``None``: the next backward writes fresh ones (a capture: its own)."""
        self.built.module.zero_grad(set_to_none=True)
        self.x.grad = None

    def grads(self) -> List[Tuple[str, torch.Tensor]]:
        """The input gradient and every parameter gradient, by name."""
        out = [("input", self.x.grad)]
        for name, param in self.built.module.named_parameters():
            grad = param.grad if param.grad is not None else getattr(param, "main_grad", None)
            if grad is not None:
                out.append((name, grad))
        return out

    def eager(self, split: int) -> Dict[str, torch.Tensor]:
        """Output and gradients of one eager step on split ``split``, copied."""
        self.use(split)
        self.clear_grads()
        out = self()
        torch.cuda.synchronize()
        return {"output": out.detach().clone(), **{n: g.clone() for n, g in self.grads()}}


def _raised_at(exc: BaseException) -> Tuple[BaseException, str, bool]:
    """The first exception of the chain, where it was raised outside torch, and whether that
    is the adapter (``mla_adapter.py``)."""
    while exc.__context__ is not None:
        exc = exc.__context__
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.startswith(torch_dir) or frame.filename == __file__:
            continue
        where = f"{_short(frame.filename)}:{frame.lineno} ({frame.name})"
        return exc, where, frame.filename.endswith("mla_adapter.py")
    return exc, "inside torch", False


def _short(path: str) -> str:
    for anchor in ("megatron/", "transformer_engine/"):
        if anchor in path:
            return path[path.index(anchor) :]
    return path


def _capture(step: Step) -> Tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm up on a side stream, then capture one step (PyTorch's whole-network recipe)."""
    step.use(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            step.clear_grads()
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    step.clear_grads()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def _compare(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> Tuple[bool, float]:
    """Whether every tensor is bit-equal, and the worst relative difference."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    equal = all(torch.equal(got[k], want[k]) for k in want)
    return equal, max(max_rel(got[k].float(), want[k].float()) for k in want)


@pytest.mark.parametrize("layout", ["bshd", "thd"])
@pytest.mark.parametrize("spec,backend", CASES, ids=[f"{s}-{b}" for s, b in CASES])
def test_graph_replay_equals_eager(spec, backend, layout, graph_safe_rng, megatron_version, record):
    side = os.environ.get("MLA_SEAM_SIDE", "patched")
    if spec == "te" and not have_te():
        pytest.skip(NO_TE)
    try:
        built = build_attention(V2_LITE, spec, torch.bfloat16, backend=backend)
    except Exception as exc:  # pylint: disable=broad-except
        pytest.skip(f"{side} tree cannot build {spec}/{backend}: {type(exc).__name__}: {exc}"[:300])
    step = Step(built, layout)
    splits = range(len(SPLITS)) if layout == "thd" else range(1)
    eager = {i: step.eager(i) for i in splits}
    deterministic, _ = _compare(step.eager(0), eager[0])
    try:
        graph, static_out = _capture(step)
    except Exception as exc:  # pylint: disable=broad-except
        first, where, ours = _raised_at(exc)
        message = f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}"
        record(case="graph_capture_error", spec=spec, layout=layout, error=message, at=where)
        if ours:
            pytest.fail(f"the adapter is not capturable: {message} at {where}")
        pytest.skip(
            f"{side} MLA ({spec}/{backend}, {layout}) cannot be captured here: {message} "
            f"at {where}"[:400]
        )
    results = {}
    for i in splits:
        step.use(i)
        graph.replay()
        torch.cuda.synchronize()
        replayed = {"output": static_out.detach().clone()}
        replayed.update({n: g.clone() for n, g in step.grads()})
        results[i] = _compare(replayed, eager[i])
    if layout == "thd":  # the second split really is another batch
        assert not torch.equal(eager[0]["output"], eager[1]["output"])
    graphed_ms, eager_ms = _times(step, graph, splits)
    record(
        case="graph_step",
        version=".".join(map(str, megatron_version)),
        spec=spec,
        backend=backend,
        decided=getattr(built.decision, "backend", None),
        layout=layout,
        tokens=step.x.size(0) * step.x.size(1),
        n_seqs=len(SPLITS[0]) if layout == "thd" else None,
        adapter=have_adapter(),
        eager_reproducible=deterministic,
        bit_equal={str(i): results[i][0] for i in splits},
        max_rel={str(i): results[i][1] for i in splits},
        eager_ms=round(statistics.median(eager_ms), 4),
        graphed_ms=round(statistics.median(graphed_ms), 4),
        eager_ms_all=[round(t, 4) for t in eager_ms],
        graphed_ms_all=[round(t, 4) for t in graphed_ms],
    )
    for i in splits:
        equal, worst = results[i]
        if deterministic:
            assert equal, f"split {i}: graph replay differs from eager (max rel {worst:.3g})"
        else:  # eager itself differs run to run (nondeterministic kernels): bf16 rounding
            assert worst < 2e-2, f"split {i}: graph replay off eager by {worst:.3g}"


def _times(step: Step, graph, splits) -> Tuple[List[float], List[float]]:
    """Step milliseconds, graphed (replay, offsets written first) and eager (a new batch)."""
    order = [i % len(splits) for i in range(REPS + WARMUP)]
    calls = iter(order * 2)

    def replay() -> None:
        step.use(next(calls))
        graph.replay()

    def eager() -> None:
        step.use(next(calls))
        step.clear_grads()
        step()

    graphed = time_ms(replay, WARMUP, REPS)
    calls = iter(order * 2)
    return graphed, time_ms(eager, WARMUP, REPS)
