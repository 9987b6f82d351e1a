"""Question 2, hook H8: THD RoPE in one pass, against upstream's own per-sequence functions.

Every case runs the release's real ``rope_utils.apply_rotary_pos_emb`` (the per-sequence THD
path MLA takes with RoPE fusion off) and the adapter's packed path on the same tensors:
sequence counts up to 300 (zero- and one-token sequences included), padded offsets, context
parallelism (each rank's two chunks, at global positions), both ``rotary_interleaved`` settings,
YaRN's ``mscale``, float32 and bfloat16. Equality is bit-for-bit on the CPU (same arithmetic,
same rounding); on a GPU a 1-ulp allowance covers cos/sin kernels that may round a gathered
table differently from a sliced one.
"""

from __future__ import annotations

import functools
import inspect
import random
import types

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import mla_adapter
from mla_build import packed_seq_params
from mla_configs import SMALL, make_config


class CPGroup:
    """The two questions RoPE asks a context-parallel group (no collective is run)."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _offsets(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def _lengths(count, seed, multiple=1, longest=96):
    rng = random.Random(seed)
    picks = [rng.choice([0, 1, 2, 5, 17, 64, longest]) for _ in range(count)]
    return [max(multiple, (n + multiple - 1) // multiple * multiple) for n in picks]


def _freqs(max_len, dim=16):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def _upstream(t, freqs, config, cu, cp_group, mscale):
    kwargs = {}
    if "mla_rotary_interleaved" in inspect.signature(rope_utils.apply_rotary_pos_emb).parameters:
        kwargs["mla_rotary_interleaved"] = True
    return rope_utils.apply_rotary_pos_emb(
        t, freqs, config=config, cu_seqlens=cu, mscale=mscale, cp_group=cp_group, **kwargs
    )


def _assert_same(ours, theirs):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if torch.equal(ours, theirs):
        return
    assert ours.device.type != "cpu", "the packed path must equal upstream bit for bit on a CPU"
    ulp = torch.finfo(ours.dtype).eps * theirs.abs().clamp(min=1.0)
    worst = ((ours.float() - theirs.float()).abs() / ulp.float()).max().item()
    assert worst <= 1.0, f"differs from upstream by {worst:.2f} ulp"


def _batch_for(cu, tokens, cp_size):
    config = make_config(SMALL, context_parallel_size=1)
    params = packed_seq_params(cu=cu)
    lengths = (cu[1:] - cu[:-1]).tolist()
    params.max_seqlen_q = params.max_seqlen_kv = max(lengths)
    hidden = torch.zeros(tokens, 1, config.hidden_size)
    layer = types.SimpleNamespace(config=config)
    if cp_size == 1:
        mla_adapter.normalize_packed_seq(layer, params, hidden)
    return config, params, layer


@pytest.mark.parametrize("count", [1, 4, 16, 64, 300])
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_rope_equals_upstream_per_sequence(count, interleaved, dtype, parallel_state):
    lengths = _lengths(count, seed=count)
    cu = _offsets(lengths)
    tokens = int(cu[-1])
    config, params, layer = _batch_for(cu, tokens, 1)
    config.rotary_interleaved = interleaved
    freqs = _freqs(max(lengths) + 3)
    torch.manual_seed(count)
    q = torch.randn(tokens, 4, 16, dtype=dtype)
    k = torch.randn(tokens, 1, 16, dtype=dtype)
    group = CPGroup(1, 0)
    apply = mla_adapter.rotary_pos_emb_fn(layer, params)
    assert apply is not rope_utils.apply_rotary_pos_emb
    for t in (q, k):
        ours = apply(t, freqs, config=config, cu_seqlens=cu, mscale=0.93, cp_group=group)
        _assert_same(ours, _upstream(t, freqs, config, cu, group, 0.93))


@pytest.mark.parametrize("cp_size", [2, 4])
def test_packed_rope_under_context_parallelism(cp_size, parallel_state):
    lengths = _lengths(24, seed=cp_size, multiple=2 * cp_size)
    cu = _offsets(lengths)
    freqs = _freqs(max(lengths))
    config = make_config(SMALL)
    for rank in range(cp_size):
        tokens = int(cu[-1]) // cp_size
        t = torch.randn(tokens, 4, 16)
        group = CPGroup(cp_size, rank)
        positions = mla_adapter.thd_positions(cu, tokens, cp_size, rank)
        ours = mla_adapter.apply_rotary_packed(t, freqs, positions, mla_rotary_interleaved=True)
        _assert_same(ours, _upstream(t, freqs, config, cu, group, 1.0))


def test_positions_restart_per_sequence_and_cover_cp_chunks():
    cu = _offsets([4, 0, 8])
    assert mla_adapter.thd_positions(cu, 12).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]
    # CP 2, rank 0 holds chunks 0 and 3 of each sequence; rank 1 chunks 1 and 2.
    assert mla_adapter.thd_positions(cu, 6, 2, 0).tolist() == [0, 3, 0, 1, 6, 7]
    assert mla_adapter.thd_positions(cu, 6, 2, 1).tolist() == [1, 2, 2, 3, 4, 5]


def test_padded_offsets_rotate_at_the_padded_starts(parallel_state):
    lengths, padded = [3, 37, 20], [8, 40, 24]
    config = make_config(SMALL)
    params = packed_seq_params(lengths, padded, with_max=False, dev="cpu")
    layer = types.SimpleNamespace(config=config)
    rope_params = mla_adapter.normalize_packed_seq(layer, params, torch.zeros(72, 1, 128))
    assert torch.equal(rope_params.cu_seqlens_q, params.cu_seqlens_q_padded)
    freqs = _freqs(40)
    t = torch.randn(72, 4, 16)
    apply = mla_adapter.rotary_pos_emb_fn(layer, rope_params)
    ours = apply(t, freqs, config, cu_seqlens=rope_params.cu_seqlens_q, cp_group=CPGroup(1, 0))
    start = 0
    for n, p in zip(lengths, padded):
        alone = _upstream(t[start : start + n], freqs, config, _offsets([n]), CPGroup(1, 0), 1.0)
        _assert_same(ours[start : start + n], alone)
        start += p


def test_positions_are_computed_once_per_batch(parallel_state):
    cu = _offsets([5, 7])
    config, params, layer = _batch_for(cu, 12, 1)
    apply = mla_adapter.rotary_pos_emb_fn(layer, params)
    t, freqs = torch.randn(12, 2, 16), _freqs(8)
    apply(t, freqs, config, cu_seqlens=cu, cp_group=CPGroup(1, 0))
    cached = dict(mla_adapter.packed_batch(params).cached)
    again = mla_adapter.rotary_pos_emb_fn(layer, params)
    again(t, freqs, config, cu_seqlens=cu, cp_group=CPGroup(1, 0))
    assert mla_adapter.packed_batch(params).cached == cached and len(cached) == 1
    assert next(iter(cached))[0] == "positions"


def test_bshd_fusion_and_unnormalized_calls_get_upstream(parallel_state):
    config = make_config(SMALL)
    layer = types.SimpleNamespace(config=config)
    assert mla_adapter.rotary_pos_emb_fn(layer, None) is rope_utils.apply_rotary_pos_emb
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=_offsets([2, 2]))
    assert mla_adapter.rotary_pos_emb_fn(layer, params) is rope_utils.apply_rotary_pos_emb
    mla_adapter.normalize_packed_seq(layer, params, torch.zeros(4, 1, 128))
    fused = types.SimpleNamespace(config=make_config(SMALL, apply_rope_fusion=True))
    assert mla_adapter.rotary_pos_emb_fn(fused, params) is rope_utils.apply_rotary_pos_emb


def test_gradients_flow_like_upstream(parallel_state):
    lengths = [1, 9, 30]
    cu = _offsets(lengths)
    config, params, layer = _batch_for(cu, 40, 1)
    freqs = _freqs(30)
    t = torch.randn(40, 4, 16, requires_grad=True)
    grad = torch.randn(40, 4, 16)
    apply = mla_adapter.rotary_pos_emb_fn(layer, params)
    (ours,) = torch.autograd.grad(
        apply(t, freqs, config, cu_seqlens=cu, cp_group=CPGroup(1, 0)), t, grad
    )
    (theirs,) = torch.autograd.grad(_upstream(t, freqs, config, cu, CPGroup(1, 0), 1.0), t, grad)
    _assert_same(ours, theirs)


class CutTable(torch.nn.Module):
    """A RoPE module shaped like 0.13's YaRN: with a CP group it keeps this rank's bshd chunks
    of its table (chunks ``r`` and ``2 * cp - 1 - r`` of ``2 * cp``, as upstream's
    ``get_pos_emb_on_this_cp_rank``) for every batch, packed or not, and takes no
    ``packed_seq`` argument. 0.13's real module, and that function, need a GPU."""

    def __init__(self, cp_group) -> None:
        super().__init__()
        self.cp_group = cp_group

    @functools.lru_cache(maxsize=32)  # as 0.13's YaRN: a second call returns the cut table
    def forward(self, max_seq_len: int, offset: int = 0):
        emb = _freqs(max_seq_len + offset)[offset:]
        if self.cp_group is not None and self.cp_group.size() > 1:
            size, rank = self.cp_group.size(), self.cp_group.rank()
            chunks = emb.chunk(2 * size)
            emb = torch.cat((chunks[rank], chunks[2 * size - 1 - rank]))
        return emb, 1.0


@pytest.mark.parametrize("cp_size", [2, 4])
def test_a_table_cut_per_cp_rank_is_rebuilt_whole_for_packed_batches(cp_size, parallel_state):
    """0.13.1 on 2 x H200: THD at CP 2 ran on the patched tree but 43% off CP 1 (the table
    MLA indexed per sequence held only the rank's bshd chunks). The adapter rotates with the
    whole table: equal to upstream's per-sequence path on the whole table, on every rank.
    The module memoizes per length, as 0.13's YaRN does (a first fix that called the module
    again got the cut table back, and changed nothing on the GPU)."""
    lengths = _lengths(12, seed=7, multiple=2 * cp_size)
    cu = _offsets(lengths)
    longest = max(lengths)
    config = make_config(SMALL, context_parallel_size=cp_size)
    whole = _freqs(longest)
    for rank in range(cp_size):
        group = CPGroup(cp_size, rank)
        tokens = int(cu[-1]) // cp_size
        params = packed_seq_params(cu=cu)
        params.max_seqlen_q = params.max_seqlen_kv = longest
        layer = types.SimpleNamespace(config=config, rotary_pos_emb=CutTable(group))
        mla_adapter.normalize_packed_seq(layer, params, torch.zeros(tokens, 1, 128))
        assert mla_adapter._slices_packed_tables(layer)  # pylint: disable=protected-access
        cut, _ = layer.rotary_pos_emb(longest)
        assert cut.size(0) == longest // cp_size
        t = torch.randn(tokens, 4, 16)
        apply = mla_adapter.rotary_pos_emb_fn(layer, params)
        ours = apply(t, cut, config, cu_seqlens=cu, cp_group=group)
        _assert_same(ours, _upstream(t, whole, config, cu, group, 1.0))
        assert layer.rotary_pos_emb.cp_group is group  # put back
        # RoPE fusion would rotate at the cut table's positions: refused, with the way out.
        fused = types.SimpleNamespace(
            config=make_config(SMALL, context_parallel_size=cp_size, apply_rope_fusion=True),
            rotary_pos_emb=CutTable(group),
        )
        with pytest.raises(mla_adapter.MLACompatibilityError, match="--no-rope-fusion"):
            mla_adapter.rotary_pos_emb_fn(fused, params)
    # Without CP, or on a module that knows packed batches, nothing is rebuilt.
    plain = types.SimpleNamespace(config=config, rotary_pos_emb=CutTable(CPGroup(1, 0)))
    assert not mla_adapter._slices_packed_tables(plain)  # pylint: disable=protected-access
