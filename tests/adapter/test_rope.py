"""Question 2, hook H8: THD RoPE in one pass, against upstream's own per-sequence functions.

Every case runs the release's real ``rope_utils.apply_rotary_pos_emb`` (the per-sequence THD
path MLA takes with RoPE fusion off) and the adapter's packed path on the same tensors:
sequence counts up to 300 (zero- and one-token sequences included), padded offsets, context
parallelism (each rank's two chunks, at global positions), both ``rotary_interleaved`` settings,
YaRN's ``mscale``, float32 and bfloat16. Both are called as the tree's MLA calls them
(``rope_calls.mla_rope_kwargs``: ``max_seqlen`` on main and dev). Where the release's function
takes them (main, dev), ``max_seqlen`` below the table (positions from the batch's start; dev
passes q's and kv's own), ``inverse`` and ``mla_output_remove_interleaving`` too. Equality is
bit-for-bit on the CPU (same arithmetic, same rounding); on a GPU a 1-ulp allowance covers
cos/sin kernels that may round a gathered table differently from a sliced one.
"""

from __future__ import annotations

import functools
import random
import types

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import mla_adapter
from mla_build import packed_seq_params
from mla_configs import SMALL, make_config
from rope_calls import CPGroup, mla_rope_kwargs, takes
from rope_calls import freqs as _freqs
from rope_calls import offsets as _offsets
from rope_calls import upstream as _upstream


def _lengths(count, seed, multiple=1, longest=96):
    rng = random.Random(seed)
    picks = [rng.choice([0, 1, 2, 5, 17, 64, longest]) for _ in range(count)]
    return [max(multiple, (n + multiple - 1) // multiple * multiple) for n in picks]


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
    longest = freqs.size(0)  # MLA's table: the longest sequence the batch says it holds
    kwargs = mla_rope_kwargs(longest)
    for t in (q, k):
        ours = apply(t, freqs, config=config, cu_seqlens=cu, mscale=0.93, cp_group=group, **kwargs)
        _assert_same(ours, _upstream(t, freqs, config, cu, group, 0.93, longest))


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
        _assert_same(ours, _upstream(t, freqs, config, cu, group, 1.0, max(lengths)))


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
    kwargs = mla_rope_kwargs(rope_params.max_seqlen_q)
    ours = apply(
        t, freqs, config, cu_seqlens=rope_params.cu_seqlens_q, cp_group=CPGroup(), **kwargs
    )
    start = 0
    for n, p in zip(lengths, padded):
        alone = _upstream(t[start : start + n], freqs, config, _offsets([n]), CPGroup(), 1.0, n)
        _assert_same(ours[start : start + n], alone)
        start += p


def test_positions_are_computed_once_per_batch(parallel_state):
    cu = _offsets([5, 7])
    config, params, layer = _batch_for(cu, 12, 1)
    apply = mla_adapter.rotary_pos_emb_fn(layer, params)
    t, freqs = torch.randn(12, 2, 16), _freqs(8)
    kwargs = mla_rope_kwargs(8)
    apply(t, freqs, config, cu_seqlens=cu, cp_group=CPGroup(1, 0), **kwargs)
    cached = dict(mla_adapter.packed_batch(params).cached)
    again = mla_adapter.rotary_pos_emb_fn(layer, params)
    again(t, freqs, config, cu_seqlens=cu, cp_group=CPGroup(1, 0), **kwargs)
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
    kwargs = mla_rope_kwargs(30)
    (ours,) = torch.autograd.grad(
        apply(t, freqs, config, cu_seqlens=cu, cp_group=CPGroup(1, 0), **kwargs), t, grad
    )
    (theirs,) = torch.autograd.grad(_upstream(t, freqs, config, cu, CPGroup(), 1.0, 30), t, grad)
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
        ours = apply(t, cut, config, cu_seqlens=cu, cp_group=group, **mla_rope_kwargs(longest))
        _assert_same(ours, _upstream(t, whole, config, cu, group, 1.0, longest))
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


NEEDS_MAX_SEQLEN = pytest.mark.skipif(
    not takes("max_seqlen"), reason="this release's THD RoPE takes no max_seqlen (main, dev)"
)


@NEEDS_MAX_SEQLEN
@pytest.mark.parametrize("cp_size", [1, 2])
def test_separate_q_and_kv_max_seqlen_rotate_as_upstream(cp_size, parallel_state):
    """dev passes ``max_seqlen_q`` for q and ``max_seqlen_kv`` for k; main the larger for both.
    MLA's table is as long as the larger: the side whose ``max_seqlen`` is below it rotates at
    positions counted from the batch's start (upstream's rule for a table covering the whole
    batch), the other per sequence; every combination equals upstream bit for bit, and the two
    sides' positions are kept apart."""
    lengths = _lengths(9, seed=11, multiple=2 * cp_size, longest=48)
    cu = _offsets(lengths)
    tokens = int(cu[-1]) // cp_size
    longest = max(lengths)
    config = make_config(SMALL, context_parallel_size=cp_size)
    table = _freqs(int(cu[-1]) + 8)  # long enough for every position from the batch's start
    torch.manual_seed(cp_size)
    q, k = torch.randn(tokens, 4, 16), torch.randn(tokens, 1, 16)
    for rank in range(cp_size):
        group = CPGroup(cp_size, rank)
        params = packed_seq_params(cu=cu)
        params.max_seqlen_q, params.max_seqlen_kv = longest, table.size(0)
        layer = types.SimpleNamespace(config=config)
        mla_adapter.normalize_packed_seq(layer, params, torch.zeros(tokens, 1, 128))
        apply = mla_adapter.rotary_pos_emb_fn(layer, params)
        for t, max_seqlen in ((q, params.max_seqlen_q), (k, params.max_seqlen_kv)):
            kwargs = mla_rope_kwargs(max_seqlen)
            ours = apply(t, table, config, cu_seqlens=cu, cp_group=group, **kwargs)
            _assert_same(ours, _upstream(t, table, config, cu, group, 1.0, max_seqlen))
        cached = {key[-1] for key in mla_adapter.packed_batch(params).cached}
        assert cached == {True, False}, "q (from the batch's start) and kv (per sequence)"
    positions = mla_adapter.thd_positions(_offsets([4, 0, 8]), 12, from_batch_start=True)
    assert positions.tolist() == list(range(12))
    positions = mla_adapter.thd_positions(_offsets([4, 0, 8]), 6, 2, 1, from_batch_start=True)
    assert positions.tolist() == [1, 2, 4 + 2, 4 + 3, 4 + 4, 4 + 5]


@NEEDS_MAX_SEQLEN
def test_without_max_seqlen_upstream_decides(parallel_state):
    """Where upstream's function takes ``max_seqlen`` and a call gives none, upstream runs: main
    reads the offsets to tell a whole-batch table (its legacy rule), dev refuses the call."""
    cu = _offsets([6, 10])
    config, params, layer = _batch_for(cu, 16, 1)
    apply = mla_adapter.rotary_pos_emb_fn(layer, params)
    t, table = torch.randn(16, 4, 16), _freqs(16)
    try:
        theirs = _upstream(t, table, config, cu, CPGroup(), 1.0, None)
    except AssertionError as exc:  # dev: "max_seqlen must be provided for THD RoPE"
        with pytest.raises(AssertionError, match=str(exc).split(" ")[0]):
            apply(t, table, config, cu_seqlens=cu, cp_group=CPGroup(), **mla_rope_kwargs(None))
    else:
        ours = apply(t, table, config, cu_seqlens=cu, cp_group=CPGroup(), **mla_rope_kwargs(None))
        _assert_same(ours, theirs)
    assert not mla_adapter.packed_batch(params).cached, "the adapter computed nothing itself"


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "option", ["inverse", "mla_output_remove_interleaving", "both"], ids=lambda o: o
)
def test_inverse_and_output_interleaving_rotate_as_upstream(option, dtype, interleaved):
    """dev's and main's options (DSv4 rotates V and O back): computed in the one pass."""
    names = ["inverse", "mla_output_remove_interleaving"] if option == "both" else [option]
    if not all(takes(name) for name in names):
        pytest.skip(f"this release's apply_rotary_pos_emb takes no {' or '.join(names)}")
    lengths = [5, 0, 17, 64, 2]
    cu = _offsets(lengths)
    config, params, layer = _batch_for(cu, 88, 1)
    config.rotary_interleaved = interleaved
    table = _freqs(64, dim=16)
    torch.manual_seed(5)
    t = torch.randn(88, 4, 24, dtype=dtype, requires_grad=True)  # 16 rotated, 8 passed
    options = {name: True for name in names}
    apply = mla_adapter.rotary_pos_emb_fn(layer, params)
    kwargs = mla_rope_kwargs(64, **options)
    ours = apply(t, table, config, cu_seqlens=cu, mscale=0.93, cp_group=CPGroup(), **kwargs)
    theirs = _upstream(t, table, config, cu, CPGroup(), 0.93, 64, **options)
    _assert_same(ours, theirs)
    plain = _upstream(t, table, config, cu, CPGroup(), 0.93, 64)
    assert not torch.equal(theirs, plain), "the option changes the result"
    grad = torch.randn_like(theirs)
    (ours_g,) = torch.autograd.grad(ours, t, grad)
    (theirs_g,) = torch.autograd.grad(theirs, t, grad)
    _assert_same(ours_g, theirs_g)
    assert any(key[0] == "positions" for key in mla_adapter.packed_batch(params).cached)


def test_inverse_undoes_the_rotation():
    """The adapter's own tables: the inverse rotation takes a rotated tensor back (fp32)."""
    table = _freqs(32)
    positions = torch.arange(32, dtype=torch.int32)
    t = torch.randn(32, 2, 16, dtype=torch.float64)
    rot = mla_adapter.rotation_table(table.double(), torch.float64)
    back = mla_adapter.rotation_table(table.double(), torch.float64, inverse=True)
    there = mla_adapter.rotate_packed(t, rot.index_select(0, positions))
    again = mla_adapter.rotate_packed(there, back.index_select(0, positions))
    torch.testing.assert_close(again, t)
    assert not torch.allclose(there, t)
