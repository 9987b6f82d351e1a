"""Where the adapter's THD host time goes, without a GPU: ops per entry point, host reads, Python.

    python benchmarks/thd_host_cpu.py PATCHED_TREE [--tokens 1024] [--counts 1,4,16,64,256]
        [--steps 20] [--json OUT]

Real MLA layers of ``PATCHED_TREE`` (a Megatron checkout patched by ``mla-seam apply``), built
with the local spec on the CPU (the small dims of ``tests/adapter/mla_configs.py``, YaRN,
float32), forward + backward per step, every step a new ``PackedSeqParams`` over the same
offsets (as every training step has its own batch) with ``max_seqlen`` given (Megatron's data
path) or not. Per layout and sequence count it prints, per adapter entry point, per step:

* ops (``tests/adapter/host_counts.py``): aten ops dispatched, forward and backward (backward
  ops charged to the entry point whose forward op made their autograd node), the non-view ones
  (about one kernel launch each on a GPU), for one layer and for a second layer of the same
  batch; host reads (``tolist``/``item``/``equal``/...: each a device sync on a GPU);
* time: ``time.perf_counter`` around each entry point (no profiler); torch.profiler with the
  GPU bench's labels (``tests/gpu/host_profile.py``: host us, Python us, backward us per entry
  point and part, shares); cProfile's time in the adapter's own Python lines;
* H2 + H8 alone on tiny tensors (dispatch, not compute): us per batch's first layer and per
  further layer.

CPU times include the compute of each op; on a GPU a launch replaces it. The local spec's core
attention is adapter code (the whole attention of a THD batch runs in it): it is listed apart
from the THD bookkeeping. Megatron's CUDA-only calls are pointed at the CPU as the adapter
tests do (``tests/adapter/conftest.py``). Results: ``benchmarks/thd-host.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_TESTS = ROOT / "tests" / "adapter"
GPU_TESTS = ROOT / "tests" / "gpu"


def _setup(tree: Path) -> None:
    sys.path.insert(0, str(tree.resolve()))
    sys.path.insert(0, str(ADAPTER_TESTS))
    sys.path.insert(0, str(GPU_TESTS))
    import torch  # pylint: disable=import-outside-toplevel
    from megatron.core import tensor_parallel  # pylint: disable=import-outside-toplevel
    from pipeline_offsets import init_parallel_state  # pylint: disable=import-outside-toplevel

    init_parallel_state()
    torch.cuda.current_device = lambda: "cpu"
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.fork = lambda *a, **k: contextlib.nullcontext()
    torch.set_num_threads(1)


def _build(count: int = 2) -> list:
    """``count`` MLA layers of one config (the batch's work is shared by every layer)."""
    import torch  # pylint: disable=import-outside-toplevel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa
    from megatron.core.transformer.spec_utils import build_module  # noqa
    from mla_configs import SMALL, YARN, make_config  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    config = make_config(SMALL, YARN, qk_layernorm=True, add_bias_linear=False)
    spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True)
    layers = [
        build_module(spec.submodules.self_attention, config=config, layer_number=n + 1)
        for n in range(count)
    ]
    for layer in layers:
        layer.train()
    return layers


def split_tokens(tokens: int, count: int, seed: int = 0) -> List[int]:
    """``count`` varied lengths (each >= 1) summing to ``tokens`` (as the GPU bench splits)."""
    import random  # pylint: disable=import-outside-toplevel

    rng = random.Random(seed * 1000 + count)
    weights = [rng.uniform(0.5, 1.5) for _ in range(count)]
    lengths = [max(1, int(tokens * w / sum(weights))) for w in weights]
    lengths[-1] += tokens - sum(lengths)
    return lengths


def _step(layers, layout: str, tokens: int, count: int, sizes: bool) -> Callable[[], None]:
    """Forward + backward of ``layers`` in a chain, on a new batch (``PackedSeqParams``)."""
    import torch  # pylint: disable=import-outside-toplevel
    from megatron.core.packed_seq_params import PackedSeqParams  # noqa

    hidden = layers[0].config.hidden_size
    if layout == "bshd":
        seq, batch = tokens // 2, 2
        x = torch.randn(seq, batch, hidden, requires_grad=True)
        grad = torch.randn(seq, batch, hidden)
        mask = torch.ones(seq, seq, dtype=torch.bool).triu(1).view(1, 1, seq, seq)

        def bshd_step() -> None:
            out = x
            for layer in layers:
                out, _ = layer(out, mask)
            out.backward(grad)

        return bshd_step
    lengths = split_tokens(tokens, count)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    x = torch.randn(tokens, 1, hidden, requires_grad=True)
    grad = torch.randn(tokens, 1, hidden)
    longest = max(lengths) if sizes else None

    def step() -> None:
        params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
        out = x
        for layer in layers:
            out, _ = layer(out, None, packed_seq_params=params)
        out.backward(grad)

    return step


def _timed_entry_points(adapter) -> Any:
    import host_profile  # pylint: disable=import-outside-toplevel

    seconds: Dict[str, float] = {}

    def wrap(label: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

        return wrapper

    return seconds, host_profile.entry_points_wrapped(adapter, wrap)


def _count(step) -> tuple:
    import host_counts  # pylint: disable=import-outside-toplevel
    from megatron.core.transformer import mla_adapter  # pylint: disable=import-outside-toplevel

    counter = host_counts.OpCounter()
    with counter.labelled(mla_adapter), counter.counting(), host_counts.HostReads() as reads:
        step()
    return counter, reads


def measure(layers, layout: str, tokens: int, count: int, sizes: bool, steps: int) -> Dict:
    """Ops, host reads and times of one case, per step of one layer; ops of a second layer."""
    import host_profile  # pylint: disable=import-outside-toplevel
    from megatron.core.transformer import mla_adapter  # pylint: disable=import-outside-toplevel

    step = _step(layers[:1], layout, tokens, count, sizes)
    step()  # warm-up: the first batch of a shape is checked on the host once
    counter, reads = _count(step)
    both = _step(layers[:2], layout, tokens, count, sizes)
    both()  # the second layer's first call makes its RoPE table's cos/sin once
    two, _ = _count(both)
    one_table, two_table = counter.table(), two.table()
    further = {
        label: {k: two_table[label][k] - one_table.get(label, {}).get(k, 0) for k in row}
        for label, row in two_table.items()
    }
    result: Dict[str, Any] = {
        "layout": layout,
        "n_seqs": count if layout == "thd" else None,
        "sizes_given": sizes,
        "tokens": tokens,
        "ops": one_table,
        "ops_second_layer": further,
        "host_reads_per_step": reads.count,
        "host_read_kinds": dict(reads.kinds),
        "op_names": {k: dict(v) for k, v in counter.names.items() if k != "upstream"},
    }
    seconds, wrapped = _timed_entry_points(mla_adapter)
    walls = []
    with wrapped:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            walls.append(time.perf_counter() - start)
    result["step_us"] = round(statistics.median(walls) * 1e6, 1)
    result["entry_us"] = {k: round(v / steps * 1e6, 1) for k, v in seconds.items()}
    result["profiler"] = host_profile.profile_adapter(step, steps, mla_adapter)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    result["cprofile"] = _own_python(pstats.Stats(profiler), steps, mla_adapter.__file__)
    return result


def _own_python(stats: pstats.Stats, steps: int, adapter_file: str) -> Dict[str, float]:
    """Time in the adapter's own Python lines (functions of ``mla_adapter.py``, callees out)."""
    own = 0.0
    for (path, _line, _func), (_cc, _nc, tottime, _cum, _callers) in stats.stats.items():
        if os.path.exists(path) and os.path.samefile(path, adapter_file):
            own += tottime
    return {
        "step_us": round(stats.total_tt / steps * 1e6, 1),
        "adapter_python_us": round(own / steps * 1e6, 1),
        "adapter_python_share": round(own / stats.total_tt, 4),
    }


def _print(results: List[Dict]) -> None:
    print(
        "| layout | seqs | max_seqlen | entry point | calls | fwd ops (non-view) | "
        "bwd ops (non-view) | 2nd layer non-view fwd + bwd | perf_counter us | "
        "profiler host us (share of adapter) | of it Python us | its backward us |"
    )
    print("|" + "---|" * 12)
    for r in results:
        prof = r["profiler"]
        head = f"| {r['layout']} | {r['n_seqs'] or '-'} | "
        head += "given" if r["sizes_given"] else "missing"
        for label, row in r["ops"].items():
            if label == "upstream":
                continue
            more = r["ops_second_layer"].get(label, {})
            p = prof.get(label, {})
            print(
                f"{head} | {label} | {row['calls']:g} | {row['fwd_ops']:g} "
                f"({row['fwd_kernels']:g}) | {row['bwd_ops']:g} ({row['bwd_kernels']:g}) | "
                f"{more.get('fwd_kernels', 0):g} + {more.get('bwd_kernels', 0):g} | "
                f"{r['entry_us'].get(label, '-')} | {p.get('host_us', '-')} "
                f"({p.get('share_of_adapter', 0):.0%}) | {p.get('python_us', '-')} | "
                f"{p.get('bwd_host_us', '-')} |"
            )
        for label, p in prof.items():
            if label in r["ops"] or label in ("adapter", "step"):
                continue
            print(
                f"{head} | {label} (part) | {p.get('calls', 0):g} | | | | | "
                f"{p.get('host_us', '-')} ({p.get('share_of_adapter', 0):.0%}) | "
                f"{p.get('python_us', '-')} | {p.get('bwd_host_us', '-')} |"
            )
        adapter = prof.get("adapter", {})
        print(
            f"{head} | all | | host reads {r['host_reads_per_step']} {r['host_read_kinds']} | "
            f"upstream ops {r['ops']['upstream']['fwd_kernels']:g} + "
            f"{r['ops']['upstream']['bwd_kernels']:g} | | step {r['step_us']} | adapter "
            f"{adapter.get('host_us', '-')} ({adapter.get('share_of_step', 0):.1%} of the "
            f"profiled step) | cProfile: adapter Python {r['cprofile']['adapter_python_us']} "
            f"({r['cprofile']['adapter_python_share']:.1%}) | "
            f"{adapter.get('bwd_host_us', '-')} |"
        )


def entry_points_alone(count: int, reps: int) -> Dict[str, float]:
    """H2 + H8 on tiny tensors (64 tokens, or 2 per sequence; dispatch, not compute): us per
    batch's first layer (H2 prepares the batch, H8's positions) and per further layer (H8 on q
    and k), medians."""
    import types  # pylint: disable=import-outside-toplevel

    import torch  # pylint: disable=import-outside-toplevel
    from megatron.core import parallel_state  # pylint: disable=import-outside-toplevel
    from megatron.core.packed_seq_params import PackedSeqParams  # noqa
    from megatron.core.transformer import mla_adapter  # pylint: disable=import-outside-toplevel
    from mla_configs import SMALL, make_config  # pylint: disable=import-outside-toplevel

    tokens = max(64, 2 * count)
    layer = types.SimpleNamespace(config=make_config(SMALL))
    lengths = split_tokens(tokens, count)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    group = parallel_state.get_context_parallel_group()
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    angles = torch.outer(torch.arange(tokens + 1, dtype=torch.float32), inv)
    freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :]
    q, k = torch.randn(tokens, 4, 16), torch.randn(tokens, 1, 16)
    hidden = torch.zeros(tokens, 1, 128)
    kwargs = dict(cu_seqlens=cu, mscale=0.9, cp_group=group, mla_rotary_interleaved=True)

    def layer_call(params) -> None:
        apply = mla_adapter.rotary_pos_emb_fn(layer, params)
        apply(q, freqs, layer.config, **kwargs)
        apply(k, freqs, layer.config, **kwargs)

    def first() -> Any:
        params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=max(lengths),
            max_seqlen_kv=max(lengths),
        )
        params = mla_adapter.normalize_packed_seq(layer, params, hidden)
        layer_call(params)
        return params

    params = first()
    out = {}
    for name, fn in (("first_layer_us", first), ("further_layer_us", lambda: layer_call(params))):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(20):
                fn()
            times.append((time.perf_counter() - start) / 20 * 1e6)
        out[name] = round(statistics.median(times), 1)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", type=Path)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--counts", default="1,4,16,64,256")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    _setup(args.tree)
    layers = _build()
    cases = [("bshd", 0, True)] + [("thd", int(n), True) for n in args.counts.split(",")]
    cases.append(("thd", int(args.counts.split(",")[-2]), False))
    results = [
        measure(layers, case[0], args.tokens, case[1], case[2], args.steps) for case in cases
    ]
    _print(results)
    alone = {n: entry_points_alone(int(n), args.steps) for n in args.counts.split(",")}
    print("\nH2 + H8 alone, tiny tensors (us; first layer of a batch / each further layer):")
    for n, row in alone.items():
        print(f"  {n} sequences: {row['first_layer_us']} / {row['further_layer_us']}")
    results.append({"entry_points_alone": alone})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
