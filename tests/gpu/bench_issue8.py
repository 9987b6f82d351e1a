"""Issue 8 measurements: THD cost by packed sequences, kernels and syncs per step, local vs TE.

Not collected by a plain ``pytest`` run (the name does not match ``test_*.py``). Run it once per
tree, patched and vanilla of the same release, one process each, one at a time per GPU
(the suite's ``thd-sweep``, ``kernels`` and ``local-vs-te`` phases do that):

    MLA_SEAM_MEGATRON_TREE=<tree> MLA_SEAM_SIDE=patched|vanilla MLA_SEAM_RESULTS=<file.jsonl> \\
        pytest tests/gpu/bench_issue8.py

One MLA layer (DeepSeek-V2-Lite attention dims, YaRN, bf16, TE spec, ``--attention-backend
auto`` unless named), forward + backward with the input gradient. Every step gets a new
``PackedSeqParams`` (as every training step has its own batch), so per-batch work is counted.

* ``bench_thd_sweep``: 8192 tokens packed as 1, 4, 16, 64 and 256 sequences (lengths drawn
  once per count, seeded), rope fusion off and on; median, p10, p90 ms over
  ``MLA_SEAM_BENCH_REPS`` (10) steps after ``MLA_SEAM_BENCH_WARMUP`` (3).
* ``kernel_counts``: torch.profiler over ``MLA_SEAM_PROFILE_STEPS`` (5) steps, bshd (4096 x 2)
  and THD (64 sequences): GPU kernels, host-device synchronisations (``cuda*Synchronize`` and
  blocking ``cudaMemcpy`` calls), H2D and D2H copies per step. On the patched tree also the
  adapter's own host time per layer per step (:class:`AdapterHostTimer`: forward entry points
  only, see there), and the bound: that time over the step time; and a torch.profiler CPU-op
  breakdown of the adapter's share (``host_profile.py``): one ``adapter_host_profile`` record
  per entry point and part (host us, Python us between ops, ops, launches, syncs, copies, the
  host time of its backward functions, shares of the adapter and of the step).
* ``bench_local_vs_te``: the local spec (SDPA) against TE unfused and TE fused, bshd and THD
  (4 sequences), patched tree only (a vanilla tree cannot build MLA with the local spec).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import statistics
import time
from typing import Dict, Iterator, List, Optional

import pytest
import torch
from bench import time_ms
from mla_build import NO_CUDA, NO_TE, build_attention, have_adapter, have_te, packed_seq_params
from oracles import V2_LITE, make_input

pytestmark = [
    pytest.mark.bench,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA),
]

TOKENS = int(os.environ.get("MLA_SEAM_SWEEP_TOKENS", "8192"))
COUNTS = (1, 4, 16, 64, 256)
BSHD = (4096, 2)
PROFILE_THD_SEQS = 64
LOCAL_THD = [1024, 2048, 3072, 2048]
_BUILT: Dict[tuple, object] = {}


def _side() -> str:
    return os.environ.get("MLA_SEAM_SIDE", "patched")


def _reps() -> int:
    return int(os.environ.get("MLA_SEAM_BENCH_REPS", "10"))


def _warmup() -> int:
    return int(os.environ.get("MLA_SEAM_BENCH_WARMUP", "3"))


def _version(megatron_version) -> str:
    return ".".join(str(v) for v in megatron_version)


def split_tokens(tokens: int, count: int, seed: int = 0) -> List[int]:
    """``count`` sequence lengths (each >= 1, varied, seeded) that sum to ``tokens``."""
    rng = random.Random(seed * 1000 + count)
    weights = [rng.uniform(0.5, 1.5) for _ in range(count)]
    total = sum(weights)
    lengths = [max(1, int(tokens * w / total)) for w in weights]
    lengths[-1] += tokens - sum(lengths)
    assert lengths[-1] >= 1 and sum(lengths) == tokens
    return lengths


def _offsets(lengths: List[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device="cuda")


def _packed_factory(lengths: List[int]):
    """A new ``PackedSeqParams`` per call (same device offsets), as a new batch each step."""
    return functools.partial(packed_seq_params, cu=_offsets(lengths), max_seqlen=max(lengths))


def _build(spec: str, backend: str, fusion: bool = False):
    key = (spec, backend, fusion)
    if key not in _BUILT:
        if spec == "te" and not have_te():
            pytest.skip(NO_TE)
        try:
            _BUILT[key] = build_attention(
                V2_LITE, spec, torch.bfloat16, backend=backend, apply_rope_fusion=fusion
            )
        except Exception as exc:  # pylint: disable=broad-except
            pytest.skip(f"{_side()} tree cannot build {spec}/{backend}: {type(exc).__name__}")
    return _BUILT[key]


def _step_fn(built, layout: str, lengths: Optional[List[int]] = None):
    """One forward + backward of the layer on fresh-batch inputs."""
    hidden = V2_LITE.hidden_size
    if layout == "bshd":
        seq, batch = BSHD
        x = make_input((seq, batch, hidden), device="cuda").bfloat16().requires_grad_(True)
        mask = None
        if built.spec == "local":
            mask = torch.ones(seq, seq, dtype=torch.bool, device="cuda").triu(1)[None, None]

        def step() -> None:
            out, _ = built.module(x, mask)
            out.backward(grad)

    else:
        x = make_input((sum(lengths), 1, hidden), device="cuda").bfloat16().requires_grad_(True)
        make = _packed_factory(lengths)

        def step() -> None:
            out, _ = built.module(x, None, packed_seq_params=make())
            out.backward(grad)

    grad = torch.randn_like(x)
    return step


def _quantiles(times: List[float]) -> Dict[str, float]:
    cuts = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {
        "ms_median": round(statistics.median(times), 4),
        "ms_p10": round(cuts[0], 4),
        "ms_p90": round(cuts[-1], 4),
    }


@contextlib.contextmanager
def _experimental_gate(step):
    """Run ``step`` once; where the line gates what it calls behind Megatron's experimental flag,
    set the flag, as a user of that feature must (``--enable-experimental``), until the exit.

    MLA's fused YaRN RoPE is an ``experimental_fn`` on 0.13-0.15 (``ExperimentalNotEnabledError``
    without the flag); from 0.16 on it is not. Yields whether the flag had to be set.
    """
    try:
        step()
    except Exception as exc:  # pylint: disable=broad-except
        if type(exc).__name__ != "ExperimentalNotEnabledError":
            raise
    else:
        yield False
        return
    from megatron.core import config as mcore_config  # pylint: disable=import-outside-toplevel

    mcore_config.set_experimental_flag(True)
    try:
        step()
        yield True
    finally:
        mcore_config.set_experimental_flag(False)


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("fusion", [False, True], ids=["fusion-off", "fusion-on"])
def test_thd_sweep(fusion, count, megatron_env, megatron_version, record):
    built = _build("te", "auto", fusion)
    lengths = split_tokens(TOKENS, count)
    step = _step_fn(built, "thd", lengths)
    with _experimental_gate(step) as experimental:
        times = time_ms(step, _warmup(), _reps())
    record(
        experimental_flag=experimental,
        case="bench_thd_sweep",
        version=_version(megatron_version),
        n_seqs=count,
        tokens=sum(lengths),
        rope_fusion=fusion,
        backend="auto",
        spec="te",
        reps=len(times),
        ms_all=[round(t, 4) for t in times],
        **_quantiles(times),
    )


class AdapterHostTimer:
    """Host seconds spent inside the adapter's per-step entry points (test-only wrappers).

    Wraps ``normalize_packed_seq`` (H2), ``rotary_pos_emb_fn`` and the packed RoPE it returns
    (H8), ``upstream_value_pad`` (H5) and the adapter's TE core-attention ``forward`` (H1),
    minus the time spent in upstream's ``TEDotProductAttention.forward`` under it.

    What it counts: forward host time in those calls (Python and kernel launches, a blocking
    copy's own time; not the wait for earlier kernels, each span starting on an idle GPU).
    What it does not: the backward of the adapter's ops (autograd launches it on its own
    thread; ``host_profile.py`` measures it), the local spec's core attention (not wrapped),
    the build-time hooks (H1 H3 H4 H9, once), and time upstream spends because of the adapter
    outside these calls.
    """

    ENTRY_POINTS = (
        "normalize_packed_seq",
        "rotary_pos_emb_fn",
        "_packed_rotary_pos_emb",
        "upstream_value_pad",
    )

    def __init__(self) -> None:
        self.seconds = 0.0

    def _timed(self, fn, sign: float):
        """``fn`` timed into :attr:`seconds` (``sign`` -1: subtracted, for upstream's work).

        A blocking copy inside an entry point (the host copy of the offsets, once per batch)
        would wait for every kernel queued before it; that wait is counted as a sync per step,
        not as host work. So an added span starts on an idle GPU (synchronized before its
        clock starts), and a subtracted span starts its clock before synchronizing.
        """

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if sign > 0:
                torch.cuda.synchronize()
            start = time.perf_counter()
            if sign < 0:
                torch.cuda.synchronize()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += sign * (time.perf_counter() - start)

        return wrapper

    @contextlib.contextmanager
    def installed(self) -> Iterator["AdapterHostTimer"]:
        """Wrap the entry points for the duration of the ``with`` block."""
        from megatron.core.transformer import mla_adapter  # pylint: disable=C0415

        with pytest.MonkeyPatch.context() as patch:
            for name in self.ENTRY_POINTS:
                patch.setattr(mla_adapter, name, self._timed(getattr(mla_adapter, name), 1.0))
            te_cls = mla_adapter.MLATEDotProductAttention
            if te_cls is not None:
                patch.setattr(te_cls, "forward", self._timed(te_cls.forward, 1.0))
                base = te_cls.__mro__[1]
                patch.setattr(base, "forward", self._timed(base.forward, -1.0))
            yield self


SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")


def profile_counts(step, steps: int) -> Dict[str, float]:
    """Kernels, synchronisations and copies per step, from torch.profiler."""
    from torch.autograd import DeviceType  # pylint: disable=C0415
    from torch.profiler import ProfilerActivity, profile  # pylint: disable=C0415

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = syncs = h2d = d2h = 0
    for event in prof.events():
        name = event.name
        if event.device_type == DeviceType.CUDA:
            if name.startswith("Memcpy HtoD"):
                h2d += 1
            elif name.startswith("Memcpy DtoH"):
                d2h += 1
            elif not name.startswith(("Memcpy", "Memset")):
                kernels += 1
        elif name in SYNC_CALLS or name == "cudaMemcpy":
            syncs += 1
    syncs -= 1  # the profiler window's own final torch.cuda.synchronize()
    return {
        "kernels_per_step": round(kernels / steps, 2),
        "syncs_per_step": round(syncs / steps, 2),
        "memcpy_h2d_per_step": round(h2d / steps, 2),
        "memcpy_d2h_per_step": round(d2h / steps, 2),
    }


@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_kernel_counts(layout, megatron_env, megatron_version, record):
    built = _build("te", "auto")
    lengths = split_tokens(TOKENS, PROFILE_THD_SEQS) if layout == "thd" else None
    step = _step_fn(built, layout, lengths)
    steps = int(os.environ.get("MLA_SEAM_PROFILE_STEPS", "5"))
    for _ in range(_warmup()):
        step()
    counts = profile_counts(step, steps)
    step_ms = statistics.median(time_ms(step, 1, _reps()))
    fields = dict(counts, step_ms=round(step_ms, 4))
    if have_adapter():
        timer = AdapterHostTimer()
        with timer.installed():
            for _ in range(steps):
                # Start each timed step on an idle GPU: a blocking copy inside an adapter entry
                # point would otherwise wait for the previous step's kernels, and that wait
                # (which the vanilla path pays at its own sync points) is no adapter host work.
                torch.cuda.synchronize()
                step()
            torch.cuda.synchronize()
        per_layer_us = timer.seconds / steps * 1e6  # one layer
        fields.update(
            adapter_host_us_per_layer=round(per_layer_us, 2),
            overhead_bound=round(per_layer_us / (step_ms * 1e3), 5),
        )
        record_host_profile(step, steps, layout, lengths, megatron_version, record)
    record(
        case="kernel_counts",
        version=_version(megatron_version),
        layout=layout,
        backend="auto",
        n_seqs=len(lengths) if lengths else None,
        steps=steps,
        **fields,
    )


def record_host_profile(step, steps, layout, lengths, megatron_version, record) -> None:
    """One ``adapter_host_profile`` record per labelled adapter entry point and part."""
    from host_profile import profile_adapter  # pylint: disable=C0415
    from megatron.core.transformer import mla_adapter  # pylint: disable=C0415

    for entry, row in sorted(profile_adapter(step, steps, mla_adapter).items()):
        record(
            case="adapter_host_profile",
            version=_version(megatron_version),
            layout=layout,
            backend="auto",
            n_seqs=len(lengths) if lengths else None,
            steps=steps,
            entry=entry,
            **row,
        )


IMPLS = {"local": ("local", "local"), "te_unfused": ("te", "unfused"), "te_fused": ("te", "fused")}


@pytest.mark.parametrize("layout", ["bshd", "thd"])
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_local_vs_te(impl, layout, megatron_env, megatron_version, record):
    if not have_adapter():
        pytest.skip("the local spec builds MLA only through the adapter (#1589)")
    spec, backend = IMPLS[impl]
    built = _build(spec, backend)
    times = time_ms(_step_fn(built, layout, LOCAL_THD), _warmup(), _reps())
    record(
        case="bench_local_vs_te",
        version=_version(megatron_version),
        layout=layout,
        impl=impl,
        reps=len(times),
        **_quantiles(times),
    )
