"""Both context-parallel layouts through the adapter on CPU process groups, against upstream.

Run by ``test_cp_layouts.py`` with 2 and 4 processes (gloo), inside a patched dev tree:

    MLA_SEAM_MEGATRON_TREE=DIR python -m torch.distributed.run --standalone \\
        --nproc-per-node N tests/adapter/cp_layouts.py OUT_DIR

Every rank is one context-parallel rank (CP = N) and writes ``OUT_DIR/rank<r>.json``:
``{check: {"ok": bool, "detail": str}}``. One packed batch (padded sequences, an empty one)
is cut for each layout as upstream's data path cuts it (``get_cp_slice_for_thd`` for
contiguous; for zigzag the segments of upstream's layout routes, checked against chunks
``r`` and ``2 N - 1 - r`` of every sequence), then:

* ``chunks``: H10's entry (``zigzag_cp_input``, upstream's converter) gives every rank the
  tokens of upstream's zigzag path, bit for bit, whatever the batch's layout; the batch says
  ``zigzag`` inside MLA and its own layout again after H10's exit;
* ``positions``: the adapter's RoPE positions of the rank (``thd_positions``) are the global
  positions of those tokens;
* ``rope``: H8's one-pass RoPE with the real CP group equals upstream's ``apply_rotary_pos_emb``
  on the zigzag chunks with the same group, and upstream's RoPE of the whole batch without CP
  (at those tokens), also with q's ``max_seqlen`` below the table (dev's separate q/kv sizes);
* ``back``/``grad``: H10's exit returns that RoPE in the batch's layout (upstream's whole-batch
  result at the rank's tokens), and gradients flow back to the rank's input the same way;
* ``mismatch-named``, ``route-kept``, ``no-route-in-capture``: a batch in another layout than
  the model's is refused with both named; a prebuilt route is used as it is; none is built
  inside a CUDA graph capture (the adapter's one question, ``_capturing``, answered yes);
* ``layer``: a real ``MLASelfAttention`` (local linear layers, the patched forward) run on the
  contiguous batch equals the same layer run on upstream's zigzag path: output (in the
  contiguous layout), input and weight gradients, bit for bit. Its core attention is a
  per-token stand-in (``TokenwiseCore``): attention across a CP group needs Transformer
  Engine on a GPU (the 2-GPU runs belong to the multi-GPU suite); the layouts, positions and
  conversions checked here do not.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

HERE = Path(__file__).resolve().parent
TREE = os.environ.get("MLA_SEAM_MEGATRON_TREE")
if TREE:
    sys.path.insert(0, str(Path(TREE).resolve()))
sys.path[:0] = [str(HERE), str(HERE.parent / "gpu" / "multigpu")]

import dist_env  # noqa: E402  pylint: disable=C0413
import torch  # noqa: E402  pylint: disable=C0413
import torch.distributed as dist  # noqa: E402  pylint: disable=C0413
from rope_calls import freqs, mla_rope_kwargs  # noqa: E402  pylint: disable=C0413

#: Padded sequence lengths in units of ``2 * CP`` (one empty), and the tokens each sequence
#: holds before its padding.
UNITS = (3, 1, 0, 5, 2, 4)
PAD = (0, 1, 0, 3, 0, 2)
HEADS, ROT = 4, 16


def _offsets(lengths: List[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


class Batch:
    """One packed batch of the run, its global tensors and each rank's share per layout."""

    def __init__(self, cp: int) -> None:
        self.cp = cp
        self.padded = [2 * cp * n for n in UNITS]
        self.lengths = [max(n - p, 0) for n, p in zip(self.padded, PAD)]
        self.cu = _offsets(self.lengths)
        self.cu_padded = _offsets(self.padded)
        self.total = int(self.cu_padded[-1])
        self.tokens = self.total // cp
        self.longest = max(self.padded)
        positions: List[int] = []
        starts: List[int] = []
        for start, n in zip(self.cu_padded.tolist(), self.padded):
            positions += list(range(n))
            starts += [start] * n
        #: Each token's position in its sequence, and from the batch's start.
        self.positions = torch.tensor(positions, dtype=torch.int32)
        self.from_start = self.positions + torch.tensor(starts, dtype=torch.int32)

    def params(self, layout: str, **sizes: Any):
        """The batch's ``PackedSeqParams`` in ``layout`` (dev's fields)."""
        from mla_build import packed_seq_params

        return packed_seq_params(
            cu=self.cu,
            cu_seqlens_q_padded=self.cu_padded,
            cu_seqlens_kv_padded=self.cu_padded,
            max_seqlen_q=sizes.get("q", self.longest),
            max_seqlen_kv=sizes.get("kv", self.longest),
            cp_partition_mode=layout,
        )

    def indices(self, layout: str, rank: int) -> torch.Tensor:
        """The global tokens rank ``rank`` holds in ``layout``, as upstream's data path cuts."""
        if layout == "contiguous":
            from megatron.core.datasets.data_schedule_utils import get_cp_slice_for_thd

            batch = {"cu_seqlens_padded": self.cu_padded, "tokens": torch.arange(self.total)}
            get_cp_slice_for_thd(batch, _Rank(self.cp, rank), ("tokens",), "contiguous")
            return batch["tokens"]
        from megatron.core.context_parallel_layout import routes

        cu = routes._compact_thd_cu_seqlens_to_list(self.cu_padded)  # pylint: disable=W0212
        segments, _ = routes._build_thd_layout_segments(  # pylint: disable=W0212
            cu, self.cp, rank, "zigzag"
        )
        return torch.cat([torch.arange(start, start + n) for start, n, _ in segments])

    def zigzag_by_hand(self, rank: int) -> torch.Tensor:
        """Chunks ``rank`` and ``2 CP - 1 - rank`` of every (padded) sequence."""
        picks = []
        for start, n in zip(self.cu_padded.tolist(), self.padded):
            chunk = n // (2 * self.cp)
            for c in (rank, 2 * self.cp - 1 - rank):
                picks.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
        return torch.cat(picks)


class _Rank:
    """A rank of a group as upstream's data path asks it (size and rank only)."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


class TokenwiseCore(torch.nn.Module):
    """Stands in for MLA's core attention: per token, the sum of its q, k and v heads.

    Attention across a context-parallel group needs Transformer Engine on a GPU; what this
    run checks (which tokens a rank holds, their RoPE positions, the conversions) does not.
    Built by MLA like any core attention (the adapter leaves a class it does not know alone).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # pylint: disable=unused-argument
        super().__init__()

    def forward(self, query, key, value, attention_mask, **kwargs):  # pylint: disable=W0613
        """``[tokens, heads, d]`` q, k, v (equal widths) -> ``[tokens, heads * d]``."""
        out = query + key + value
        return out.reshape(out.size(0), -1)


def _same(got: torch.Tensor, want: torch.Tensor) -> Dict[str, Any]:
    ok = got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
    detail = "" if ok else f"{tuple(got.shape)} vs {tuple(want.shape)}"
    if not ok and got.shape == want.shape:
        detail += f", max |diff| {(got.double() - want.double()).abs().max().item():.3g}"
    return {"ok": bool(ok), "detail": detail}


def check_layouts(ps, batch: Batch) -> Dict[str, Dict[str, Any]]:
    """Chunks, positions, RoPE, the way back and gradients for both layouts on this rank."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import mla_adapter
    from mla_configs import SMALL, make_config

    cp_group = ps.get_context_parallel_group()
    rank, cp = cp_group.rank(), batch.cp
    results: Dict[str, Dict[str, Any]] = {}
    zz = batch.indices("zigzag", rank)
    results["zigzag-is-upstream-layout"] = _same(zz, batch.zigzag_by_hand(rank))
    torch.manual_seed(7)  # the same global tensors on every rank
    x = torch.randn(batch.total, 1, HEADS * ROT)
    grad = torch.randn(batch.total, 1, HEADS * ROT)
    config = make_config(SMALL, context_parallel_size=cp)
    # MLA's table is max(max_seqlen_q, max_seqlen_kv) long: q's max_seqlen equal to it (per
    # sequence positions), or below it (dev's separate sizes: q from the batch's start).
    for variant, table_len in (("", batch.longest), ("/q-below-kv", batch.total)):
        table = freqs(table_len, dim=ROT)
        kwargs = mla_rope_kwargs(batch.longest)
        x_whole = x.clone().requires_grad_()
        whole = rope_utils.apply_rotary_pos_emb(  # upstream, the whole batch, no CP
            x_whole.view(batch.total, HEADS, ROT),
            table,
            config=config,
            cu_seqlens=batch.cu_padded,
            cp_group=_Rank(1, 0),
            **kwargs,
        ).reshape(batch.total, 1, -1)
        (whole_grad,) = torch.autograd.grad(whole, x_whole, grad)
        whole = whole.detach()
        for layout in ("zigzag", "contiguous"):
            name = layout + variant
            config.cp_partition_mode = layout  # the model's layout (see test_cp_layouts.py)
            attention = _Attention(config, ProcessGroupCollection.use_mpu_process_groups())
            own = batch.indices(layout, rank)
            x_local = x.index_select(0, own).requires_grad_()
            params = batch.params(layout, kv=table_len)
            hidden, back = mla_adapter.zigzag_cp_input(attention, x_local, params, None, None)
            results[f"{name}/chunks"] = _same(hidden.detach(), x.index_select(0, zz))
            if layout == "zigzag":
                results[f"{name}/untouched"] = {"ok": hidden is x_local and back is None}
            results[f"{name}/says-zigzag-inside"] = {"ok": params.cp_partition_mode == "zigzag"}
            rope_params = mla_adapter.normalize_packed_seq(attention, params, hidden)
            cu = rope_params.cu_seqlens_q
            from_start = bool(variant)
            at = mla_adapter.thd_positions(cu, batch.tokens, cp, rank, from_batch_start=from_start)
            want = (batch.from_start if from_start else batch.positions).index_select(0, zz)
            results[f"{name}/positions"] = _same(at, want)
            apply = mla_adapter.rotary_pos_emb_fn(attention, rope_params)
            q = hidden.view(batch.tokens, HEADS, ROT)
            ours = apply(q, table, config, cu_seqlens=cu, cp_group=cp_group, **kwargs)
            theirs = rope_utils.apply_rotary_pos_emb(
                q, table, config=config, cu_seqlens=cu, cp_group=cp_group, **kwargs
            )
            results[f"{name}/rope-vs-upstream-zigzag"] = _same(ours, theirs)
            ours = ours.reshape(batch.tokens, 1, -1)
            results[f"{name}/rope-vs-whole-batch"] = _same(ours, whole.index_select(0, zz))
            cached = mla_adapter.packed_batch(params).cached
            results[f"{name}/one-pass"] = {"ok": any(k[0] == "positions" for k in cached)}
            out = mla_adapter.cp_layout_output(attention, back, ours)
            results[f"{name}/back"] = _same(out.detach(), whole.index_select(0, own))
            results[f"{name}/says-{layout}-after"] = {"ok": params.cp_partition_mode == layout}
            (got,) = torch.autograd.grad(out, x_local, grad.index_select(0, own))
            results[f"{name}/grad"] = _same(got, whole_grad.index_select(0, own))
    return results


class _Attention:
    """What H10's entry and exit read of the MLA module: its config and process groups."""

    def __init__(self, config: Any, pg_collection: Any) -> None:
        self.config = config
        self.pg_collection = pg_collection


def check_refusals(ps, batch: Batch) -> Dict[str, Dict[str, Any]]:
    """A batch whose layout is not the model's is named; a route is built once and kept, and
    not built inside a CUDA graph capture."""
    from megatron.core.context_parallel_layout import prebuild_thd_cp_partition_routes
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import mla_adapter
    from mla_configs import SMALL, make_config

    config = make_config(SMALL, context_parallel_size=batch.cp)
    config.cp_partition_mode = "contiguous"
    attention = _Attention(config, ProcessGroupCollection.use_mpu_process_groups())
    x = torch.zeros(batch.tokens, 1, HEADS * ROT)
    results: Dict[str, Dict[str, Any]] = {}
    try:
        mla_adapter.zigzag_cp_input(attention, x, batch.params("zigzag"), None, None)
        results["mismatch-named"] = {"ok": False, "detail": "no error"}
    except mla_adapter.MLACompatibilityError as exc:
        message = str(exc)
        ok = "cp_partition_mode is 'zigzag'" in message and "'contiguous'" in message
        results["mismatch-named"] = {"ok": ok, "detail": message}
    params = batch.params("contiguous")
    prebuild_thd_cp_partition_routes(params, ps.get_context_parallel_group())
    route = params.cp_partition_route
    mla_adapter.zigzag_cp_input(attention, x, params, None, None)
    results["route-kept"] = {"ok": route is not None and params.cp_partition_route is route}
    capturing = mla_adapter._capturing  # pylint: disable=protected-access
    mla_adapter._capturing = lambda: True  # pylint: disable=protected-access
    try:
        mla_adapter.zigzag_cp_input(attention, x, batch.params("contiguous"), None, None)
        results["no-route-in-capture"] = {"ok": False, "detail": "no error"}
    except mla_adapter.MLACompatibilityError as exc:
        ok = "cp_partition_route" in str(exc) and "finalize_packed_seq_params" in str(exc)
        results["no-route-in-capture"] = {"ok": ok, "detail": str(exc)}
    finally:
        mla_adapter._capturing = capturing  # pylint: disable=protected-access
    return results


def check_layer(ps, batch: Batch) -> Dict[str, Dict[str, Any]]:
    """A real MLA layer on the contiguous batch against the same layer on the zigzag one."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from mla_configs import ROPE, SMALL, make_config

    cp_group = ps.get_context_parallel_group()
    rank, cp = cp_group.rank(), batch.cp
    torch.manual_seed(0)
    # Plain RoPE: YaRN's module cuts a table per CP rank when built, with pinned memory (CUDA).
    config = make_config(
        SMALL, ROPE, context_parallel_size=cp, qk_layernorm=True, add_bias_linear=False
    )
    spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True)
    attention_spec = spec.submodules.self_attention
    attention_spec.submodules.core_attention = TokenwiseCore
    layer = build_module(attention_spec, config=config, layer_number=1)
    dist_env.broadcast_module(layer)
    torch.manual_seed(3)
    x = torch.randn(batch.total, 1, config.hidden_size)
    grad = torch.randn(batch.total, 1, config.hidden_size)
    weights = list(layer.parameters())
    runs = {}
    for layout in ("zigzag", "contiguous"):
        config.cp_partition_mode = layout
        own = batch.indices(layout, rank)
        x_local = x.index_select(0, own).requires_grad_()
        params = batch.params(layout)
        out, _ = layer(x_local, None, packed_seq_params=params)
        grads = torch.autograd.grad(out, [x_local] + weights, grad.index_select(0, own))
        runs[layout] = (own, out.detach(), grads, params.cp_partition_mode)
    own, out, grads, said = runs["contiguous"]
    zz_own, zz_out, zz_grads, _ = runs["zigzag"]
    results = {
        "layer/forward": _same(out, _gather(zz_out, zz_own, batch).index_select(0, own)),
        "layer/input-grad": _same(
            grads[0], _gather(zz_grads[0], zz_own, batch).index_select(0, own)
        ),
        "layer/says-contiguous-after": {"ok": said == "contiguous", "detail": said},
    }
    same = [torch.equal(a, b) for a, b in zip(grads[1:], zz_grads[1:])]
    results["layer/weight-grads"] = {"ok": all(same), "detail": f"{sum(same)}/{len(same)} equal"}
    return results


def _gather(local: torch.Tensor, own: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The global tensor from every rank's zigzag share (all-gather, placed at their tokens)."""
    parts = [torch.empty_like(local) for _ in range(batch.cp)]
    dist.all_gather(parts, local.contiguous())
    owners = [torch.empty_like(own) for _ in range(batch.cp)]
    dist.all_gather(owners, own.contiguous())
    out = local.new_empty((batch.total,) + tuple(local.shape[1:]))
    for part, where in zip(parts, owners):
        out.index_copy_(0, where, part)
    return out


def _run(name: str, check: Callable[..., Dict[str, Any]], *args: Any) -> Dict[str, Any]:
    try:
        return check(*args)
    except Exception:  # pylint: disable=broad-except
        return {f"{name}/raised": {"ok": False, "detail": traceback.format_exc()[-3000:]}}


def main(argv: List[str]) -> int:
    """Run every check on this rank and write ``OUT_DIR/rank<r>.json``."""
    out_dir = Path(argv[1])
    device = dist_env.init_process("gloo")
    results: Dict[str, Any] = {}
    with dist_env.cpu_shims(), dist_env.parallel(device, cp=dist_env.world()) as ps:
        batch = Batch(dist_env.world())
        results.update(_run("layouts", check_layouts, ps, batch))
        results.update(_run("refusals", check_refusals, ps, batch))
        results.update(_run("layer", check_layer, ps, batch))
    path = out_dir / f"rank{dist_env.rank()}.json"
    path.write_text(json.dumps(results, indent=1, sort_keys=True), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
