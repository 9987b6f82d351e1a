"""Benchmarks of the MLA layer (forward + backward), recorded and never asserted.

Not collected by a plain ``pytest`` run (the file name does not match ``test_*.py``): run it
explicitly, once per tree, as ``mla-seam suite`` does (patched tree, then the vanilla baseline
of the same release, one after the other on the same card):

    MLA_SEAM_MEGATRON_TREE=<tree> MLA_SEAM_SIDE=patched|vanilla pytest tests/gpu/bench.py

Cases (DeepSeek-V2-Lite attention dims, YaRN, bf16, 8192 tokens): layouts bshd (4096 x 2) and
THD (4 packed sequences of 1024/2048/3072/2048 tokens); TE spec with backends auto, fused and
unfused, and the local spec. Timing: CUDA events around forward + backward (input gradient
included), ``MLA_SEAM_BENCH_WARMUP`` (3) warm-up iterations, median of ``MLA_SEAM_BENCH_REPS``
(10). Model FLOPs per layer: 3x the forward matmul FLOPs (linear layers and causal attention,
QK^T over 192 and PV over 128 per head), so TFLOP/s compare across backends and with the card's
bf16 matmul rate measured here (8192^3 GEMM).

``mla-seam suite`` pairs the two sides' records: adapter overhead (patched / vanilla, bshd, same
backend; goal <= 1.005), THD patched / vanilla (goal <= 0.6 on the 0.18+ lines, where upstream
pads V for every THD call), local spec / TE unfused (goal <= 1.2), and the backend table.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, List, Optional, Sequence

import pytest
import torch
from mla_build import NO_CUDA, NO_TE, build_attention, cpu_blocker, have_te, packed_seq_params
from oracles import V2_LITE, MLAHyper, make_input

#: ``MLA_SEAM_BENCH_CPU=1`` runs every code path on a CPU at small shapes (timings
#: meaningless; for checking the benchmark itself without a GPU).
CPU_CHECK = os.environ.get("MLA_SEAM_BENCH_CPU") == "1" and not torch.cuda.is_available()
pytestmark = [
    pytest.mark.bench,
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or CPU_CHECK), reason=NO_CUDA),
]

BSHD = (96, 2) if CPU_CHECK else (4096, 2)
THD = [16, 40, 72, 8] if CPU_CHECK else [1024, 2048, 3072, 2048]
DEV = "cpu" if CPU_CHECK else "cuda"
CASES = [
    ("te", "auto"),
    ("te", "fused"),
    ("te", "unfused"),
    ("local", "local"),
]


def _reps() -> int:
    return int(os.environ.get("MLA_SEAM_BENCH_REPS", "10"))


def _warmup() -> int:
    return int(os.environ.get("MLA_SEAM_BENCH_WARMUP", "3"))


def time_ms(fn: Callable[[], None], warmup: int, reps: int) -> List[float]:
    """Milliseconds of ``fn`` per call, CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if CPU_CHECK:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def layer_flops(hyper: MLAHyper, lengths: Sequence[int]) -> float:
    """Model FLOPs of one MLA layer, forward + backward (3x forward), causal attention."""
    tokens = sum(lengths)
    h, n = hyper.hidden_size, hyper.num_heads
    qk, v = hyper.qk_head_dim, hyper.v_head_dim
    if hyper.q_lora_rank is None:
        q = h * n * qk
    else:
        q = h * hyper.q_lora_rank + hyper.q_lora_rank * n * qk
    kv = h * (hyper.kv_lora_rank + hyper.qk_rope_head_dim)
    kv += hyper.kv_lora_rank * n * (hyper.qk_nope_head_dim + v)
    proj = n * v * h
    linear = 2 * tokens * (q + kv + proj)
    attention = sum(2 * s * s * n * (qk + v) / 2 for s in lengths)
    return 3 * (linear + attention)


def test_matmul_rate(record):
    """The card's bf16 GEMM rate, the yardstick of the backend table."""
    n = 256 if CPU_CHECK else 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    times = time_ms(lambda: torch.matmul(a, b), warmup=2 if CPU_CHECK else 5, reps=20)
    ms = statistics.median(times)
    record(case="bench_matmul", dtype="bfloat16", m=n, n=n, k=n, ms=ms, tflops=2 * n**3 / ms / 1e9)


@pytest.mark.parametrize("layout", ["bshd", "thd"])
@pytest.mark.parametrize("spec,backend", CASES, ids=[f"{s}-{b}" for s, b in CASES])
def test_layer_fwd_bwd(spec, backend, layout, megatron_env, record):
    side = os.environ.get("MLA_SEAM_SIDE", "patched")
    if spec == "te" and not have_te():
        pytest.skip(NO_TE)
    if megatron_env == "cpu":
        if cpu_blocker():
            pytest.skip(cpu_blocker())
    hyper = V2_LITE
    fields = dict(case="bench_layer", spec=spec, backend=backend, layout=layout, dims="v2lite")
    try:
        built = build_attention(hyper, spec, torch.bfloat16, backend=backend)
    except Exception as exc:  # pylint: disable=broad-except
        # Vanilla trees cannot build MLA with the local spec (#1589): recorded, not failed.
        record(outcome="build_error", error=f"{type(exc).__name__}: {str(exc)[:300]}", **fields)
        pytest.skip(f"{side} tree cannot build {spec}/{backend}: {type(exc).__name__}")
    if layout == "bshd":
        seq, batch = BSHD
        lengths = [seq] * batch
        x = make_input((seq, batch, hyper.hidden_size), device=DEV).bfloat16()
        packed = None
    else:
        lengths = THD
        x = make_input((sum(THD), 1, hyper.hidden_size), device=DEV).bfloat16()
        packed = packed_seq_params(THD, dev=DEV)
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    mask: Optional[torch.Tensor] = None
    if spec == "local" and packed is None:
        mask = torch.ones(x.size(0), x.size(0), dtype=torch.bool, device=DEV).triu(1)
        mask = mask.view(1, 1, x.size(0), x.size(0))
    kwargs = {"packed_seq_params": packed} if packed is not None else {}

    def step() -> None:
        out, _ = built.module(x, mask, **kwargs)
        out.backward(grad)

    times = time_ms(step, 1 if CPU_CHECK else _warmup(), 2 if CPU_CHECK else _reps())
    ms = statistics.median(times)
    flops = layer_flops(hyper, lengths)
    decision = built.decision
    record(
        outcome="ran",
        decided=getattr(decision, "backend", None),
        v_pad=getattr(decision, "pad_value", None),
        tokens=sum(lengths),
        ms_median=round(ms, 4),
        ms_min=round(min(times), 4),
        ms_all=[round(t, 4) for t in times],
        reps=len(times),
        flops=flops,
        tflops=round(flops / ms / 1e9, 2),
        notes=built.notes,
        **fields,
    )
