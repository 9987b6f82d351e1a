"""Question 2 without host work: THD batches that carry their sizes read nothing back.

Device-free checks of issue 20, in every patched line:

* host reads are counted (``host_counts.HostReads``: ``tolist``/``item``/``equal``/``__bool__``/
  ``cpu``...; on a GPU each is a device sync): a batch with ``max_seqlen_q/kv`` given reads its
  offsets once for the first batch of each shape, never again for that shape; a batch without
  sizes reads them every time (and says so once);
* the same calls run under ``FakeTensorMode`` on fake CUDA tensors, where any read of a value
  (or an output whose size depends on one) raises: H2, H8's RoPE on q and k, and the local
  spec's THD core attention, for a batch of a checked shape;
* CUDA graph capture, as the adapter sees it (``_capturing``, the one place it asks): nothing
  is kept across layer calls, nothing read, sizes required;
* positions of a second batch of the same shape come from its own offsets (no stale cache),
  equal to upstream's per-sequence RoPE bit for bit; the local spec's one-call THD layout equals
  per-sequence bshd and the per-sequence path;
* ops: with the batch prepared and the layer's table known, RoPE of a layer's q and k is one
  gather and three ops per tensor.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
from host_counts import HostReads, OpCounter
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import mla_adapter
from mla_build import packed_seq_params
from mla_configs import SMALL, YARN, make_config
from rope_calls import CPGroup, mla_rope_kwargs
from rope_calls import freqs as _freqs
from rope_calls import upstream
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

SIZES_MESSAGE = "without max_seqlen_q/max_seqlen_kv"


def _cu(*lengths, device="cpu"):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def _params(cu, longest=None, **kwargs):
    return packed_seq_params(cu=cu, max_seqlen=longest, **kwargs)


def _upstream(t, freqs, config, cu, mscale=1.0, max_seqlen=None):
    """Upstream's RoPE as MLA calls it; ``max_seqlen`` is MLA's table (the batch's sizes)."""
    return upstream(t, freqs, config, cu, CPGroup(), mscale, max_seqlen or freqs.size(0))


def _layer_step(layer, params, q, k, freqs, mscale=1.0):
    """What MLA's QKV code does with a THD batch: H2, then H8's function on q and k."""
    rope_params = mla_adapter.normalize_packed_seq(layer, params, torch.zeros(q.size(0), 1, 128))
    apply = mla_adapter.rotary_pos_emb_fn(layer, rope_params)
    cu = rope_params.cu_seqlens_q
    kwargs = dict(cu_seqlens=cu, mscale=mscale, cp_group=CPGroup())
    kwargs.update(mla_rope_kwargs(freqs.size(0)))
    return apply(q, freqs, layer.config, **kwargs), apply(k, freqs, layer.config, **kwargs)


@pytest.fixture
def layer(parallel_state):
    return types.SimpleNamespace(config=make_config(SMALL))


@pytest.fixture
def fresh_log(monkeypatch):
    """The adapter's once-per-process log lines, as if none had been logged yet."""
    monkeypatch.setattr(mla_adapter, "_LOGGED", set())


# --- host reads, counted ---------------------------------------------------------------------


def test_sizes_given_read_once_per_shape_then_never(layer):
    q, k, freqs = torch.randn(16, 4, 16), torch.randn(16, 1, 16), _freqs(16)
    with HostReads() as first:
        _layer_step(layer, _params(_cu(3, 5, 8), 8), q, k, freqs)
    assert first.count == 1 and first.kinds["tolist"] == 1  # one tensor: q, kv, one copy
    for lengths in [(8, 4, 4), (1, 1, 14), (16, 0, 0)]:  # same shape, other offsets
        with HostReads() as later:
            _layer_step(layer, _params(_cu(*lengths), 16), q, k, freqs)
        assert later.count == 0, later.kinds
    with HostReads() as new_shape:  # five sequences: another shape, checked once
        _layer_step(layer, _params(_cu(3, 5, 2, 2, 4), 8), q, k, freqs)
    assert new_shape.count == 1


def test_distinct_offsets_tensors_are_read_one_copy_each(layer):
    cu, padded = _cu(3, 5), _cu(4, 6)
    params = _params(cu, 6, cu_seqlens_q_padded=padded)
    with HostReads() as reads:
        mla_adapter.normalize_packed_seq(layer, params, torch.zeros(10, 1, 128))
    assert reads.kinds["tolist"] == 2  # actual and padded; kv shares both


def test_sizes_missing_read_every_batch_and_say_so_once(layer, caplog, fresh_log):
    q, k, freqs = torch.randn(16, 4, 16), torch.randn(16, 1, 16), _freqs(16)
    with caplog.at_level(logging.WARNING, logger=mla_adapter.__name__):
        for lengths in [(3, 5, 8), (8, 4, 4), (3, 5, 8)]:
            params = _params(_cu(*lengths))
            with HostReads() as reads:
                _layer_step(layer, params, q, k, freqs)
            assert reads.count == 1
            assert params.max_seqlen_q == params.max_seqlen_kv == max(lengths)
    said = [r.getMessage() for r in caplog.records if SIZES_MESSAGE in r.getMessage()]
    assert len(said) == 1 and "one device sync per batch" in said[0]


def test_checked_shapes_are_bounded_per_config(layer, monkeypatch):
    monkeypatch.setattr(mla_adapter, "_SHAPES_KEPT", 2)
    shapes = [(4, 4), (2, 2, 4), (1, 1, 1, 5)]  # three shapes of 8 tokens
    for lengths in shapes:
        mla_adapter.normalize_packed_seq(layer, _params(_cu(*lengths), 8), torch.zeros(8, 1, 128))
    assert len(mla_adapter._state(layer.config).thd_shapes) == 2  # pylint: disable=W0212
    with HostReads() as oldest:  # dropped: checked again
        mla_adapter.normalize_packed_seq(layer, _params(_cu(*shapes[0]), 8), torch.zeros(8, 1, 128))
    with HostReads() as newest:
        mla_adapter.normalize_packed_seq(layer, _params(_cu(*shapes[2]), 8), torch.zeros(8, 1, 128))
    assert (oldest.count, newest.count) == (1, 0)


@pytest.mark.parametrize(
    "cu,tokens,longest,message",
    [
        (torch.tensor([1, 4], dtype=torch.int32), 3, 4, "start at 0"),
        (torch.tensor([0, 5, 3], dtype=torch.int32), 3, 5, "never decrease"),
        (_cu(3, 5), 9, 5, "pass cu_seqlens_q_padded"),
        (_cu(3, 5), 8, 4, "below the longest packed sequence"),
        (torch.zeros(2, 2, dtype=torch.int32), 8, 5, "1-D"),
    ],
    ids=["not-from-zero", "decreasing", "token-count", "max-seqlen", "not-1-d"],
)
def test_malformed_offsets_are_named_on_the_first_batch_of_a_shape(
    layer, cu, tokens, longest, message
):
    with pytest.raises(mla_adapter.MLACompatibilityError, match=message):
        mla_adapter.normalize_packed_seq(layer, _params(cu, longest), torch.zeros(tokens, 1, 128))


# --- the same calls on fake CUDA tensors: any read of a value raises ---------------------------


def _fake_cuda(mode, tensor):
    return mode.from_tensor(tensor).to("cuda")


def test_h2_and_h8_read_nothing_on_fake_cuda_tensors(layer):
    lengths = (3, 5, 8)
    q, k, freqs = torch.randn(16, 4, 16), torch.randn(16, 1, 16), _freqs(16)
    _layer_step(layer, _params(_cu(*lengths), 8), q, k, freqs)  # the shape's first batch
    mode = FakeTensorMode()
    with mode:
        cu = torch.empty(4, dtype=torch.int32, device="cuda")  # values unknown: never read
        fq, fk = (torch.empty(t.shape, device="cuda", dtype=torch.bfloat16) for t in (q, k))
        table = torch.empty(freqs.shape, device="cuda")
        params = _params(cu, 16)
        rope_params = mla_adapter.normalize_packed_seq(layer, params, torch.empty(16, 1, 128))
        apply = mla_adapter.rotary_pos_emb_fn(layer, rope_params)
        kwargs = dict(cu_seqlens=cu, mscale=0.9, cp_group=CPGroup(), **mla_rope_kwargs(16))
        out_q = apply(fq, table, layer.config, **kwargs)
        out_k = apply(fk, table, layer.config, **kwargs)
    assert out_q.device.type == out_k.device.type == "cuda"
    assert out_q.shape == q.shape and out_k.dtype == torch.bfloat16


def test_a_new_shape_is_read_and_fake_cuda_tensors_say_so(layer):
    mode = FakeTensorMode()
    with mode, pytest.raises(DataDependentOutputException):
        cu = torch.empty(6, dtype=torch.int32, device="cuda")
        mla_adapter.normalize_packed_seq(layer, _params(cu, 8), torch.empty(16, 1, 128))


def test_local_core_attention_thd_reads_nothing_on_fake_cuda_tensors(parallel_state):
    config = make_config(SMALL, YARN)
    core = mla_adapter.MLADotProductAttention(
        config, 1, mla_adapter.AttnMaskType.causal, "self", k_channels=40, v_channels=40
    )
    mode = FakeTensorMode()
    with mode:
        cu = torch.empty(4, dtype=torch.int32, device="cuda")
        q, k, v = (torch.empty(24, 4, 40, device="cuda") for _ in range(3))
        params = _params(cu, 12)  # 3 sequences x 12 slots <= 2 x 24 tokens: one SDPA call
        out = core(q, k, v, None, packed_seq_params=params)
    assert out.shape == (24, 4 * 40) and out.device.type == "cuda"


# --- CUDA graph capture, as the adapter sees it ------------------------------------------------


@pytest.fixture
def capturing(monkeypatch):
    """The adapter told a CUDA graph is being captured (its one question, ``_capturing``)."""
    monkeypatch.setattr(mla_adapter, "_capturing", lambda: True)


def test_capture_keeps_nothing_across_layer_calls(layer, monkeypatch):
    q, k, freqs = torch.randn(16, 4, 16), torch.randn(16, 1, 16), _freqs(17)
    _layer_step(layer, _params(_cu(3, 5, 8), 8), q, k, freqs)  # eager: shape checked
    monkeypatch.setattr(mla_adapter, "_capturing", lambda: True)
    params = _params(_cu(8, 4, 4), 8)
    with HostReads() as reads:
        ours = _layer_step(layer, params, q, k, freqs)
    batch = mla_adapter.packed_batch(params)
    assert reads.count == 0 and batch.captured and not batch.cached
    config = layer.config
    for got, t in zip(ours, (q, k)):
        assert torch.equal(got, _upstream(t, freqs, config, params.cu_seqlens_q))


def test_capture_without_sizes_is_refused(layer, capturing):
    with pytest.raises(mla_adapter.MLACompatibilityError, match="max_seqlen_q/max_seqlen_kv"):
        mla_adapter.normalize_packed_seq(layer, _params(_cu(3, 5)), torch.zeros(8, 1, 128))


def test_a_shape_first_seen_in_a_capture_is_not_read(layer, capturing, caplog, fresh_log):
    with caplog.at_level(logging.WARNING, logger=mla_adapter.__name__), HostReads() as reads:
        mla_adapter.normalize_packed_seq(layer, _params(_cu(3, 5), 8), torch.zeros(8, 1, 128))
    assert reads.count == 0
    assert any("first seen inside a CUDA graph capture" in r.getMessage() for r in caplog.records)
    assert not mla_adapter._state(layer.config).thd_shapes  # pylint: disable=protected-access


def test_a_rope_table_made_in_a_capture_is_not_kept(capturing):
    freqs = _freqs(12)
    first = mla_adapter.rotation_table(freqs, torch.float32)
    assert mla_adapter.rotation_table(freqs, torch.float32) is not first


def test_rope_tables_are_kept_per_table_outside_capture():
    freqs = _freqs(12)
    table = mla_adapter.rotation_table(freqs, torch.bfloat16, 0.9)
    assert mla_adapter.rotation_table(freqs, torch.bfloat16, 0.9) is table
    assert mla_adapter.rotation_table(freqs[0:8], torch.bfloat16, 0.9) is not table  # a view
    assert mla_adapter.rotation_table(freqs, torch.float32, 0.9) is not table


# --- positions of each batch, bit for bit ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_batches_of_one_shape_rotate_at_their_own_positions(layer, dtype, interleaved):
    """One static offsets buffer, rewritten between batches (as a CUDA graph replays it), and
    a new tensor: every batch equals upstream's per-sequence RoPE, values and gradients."""
    layer.config.rotary_interleaved = interleaved
    freqs = _freqs(41)  # 0.19's per-sequence RoPE takes a table of exactly the tokens as theirs
    buffer = _cu(10, 20, 10)
    torch.manual_seed(0)
    for lengths in [(10, 20, 10), (30, 5, 5), (1, 1, 38)]:
        buffer.copy_(_cu(*lengths))
        for cu in (buffer, _cu(*lengths)):
            q = torch.randn(40, 4, 16, dtype=dtype, requires_grad=True)
            k = torch.randn(40, 1, 16, dtype=dtype, requires_grad=True)
            ours = _layer_step(layer, _params(cu, 40), q, k, freqs, mscale=0.93)
            for got, t in zip(ours, (q, k)):
                want = _upstream(t, freqs, layer.config, cu.clone(), 0.93)
                assert torch.equal(got, want), lengths
                grad = torch.randn_like(want)
                (ours_g,) = torch.autograd.grad(got, t, grad, retain_graph=True)
                (want_g,) = torch.autograd.grad(want, t, grad)
                assert torch.equal(ours_g, want_g), lengths


# --- the local spec's THD core attention in one call -------------------------------------------


def _core():
    config = make_config(SMALL, YARN)
    return mla_adapter.MLADotProductAttention(
        config, 1, mla_adapter.AttnMaskType.causal, "self", k_channels=40, v_channels=40
    )


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_local_thd_in_one_call_equals_per_sequence(parallel_state, monkeypatch, padded):
    core = _core()
    lengths = [5, 9, 0, 12, 6]
    slots = [n + 3 for n in lengths] if padded else lengths
    tokens = sum(slots)
    torch.manual_seed(3)
    q, k, v = (torch.randn(tokens, 4, 40, requires_grad=True) for _ in range(3))
    padded_cu = _cu(*slots)  # H2 makes the kv side the q side's
    kwargs = dict(cu_seqlens_q_padded=padded_cu, cu_seqlens_kv_padded=padded_cu) if padded else {}
    params = _params(_cu(*lengths), max(slots), **kwargs)
    assert core._thd_in_one_call(q, k, params)  # pylint: disable=protected-access
    with HostReads() as reads:
        ours = core(q, k, v, None, packed_seq_params=params)
    assert reads.count == 0
    grad = torch.randn_like(ours)
    ours_g = torch.autograd.grad(ours, (q, k, v), grad)
    monkeypatch.setattr(mla_adapter, "_PADDED_SLOTS", 0)  # the per-sequence path
    loop_params = _params(_cu(*lengths), max(slots), **kwargs)
    assert not core._thd_in_one_call(q, k, loop_params)  # pylint: disable=protected-access
    theirs = core(q, k, v, None, packed_seq_params=loop_params)
    theirs_g = torch.autograd.grad(theirs, (q, k, v), grad)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_g, theirs_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    start = 0
    for n, p in zip(lengths, slots):  # padding slots: zeros and no gradient
        assert not ours[start + n : start + p].any()
        assert not ours_g[0][start + n : start + p].any()
        start += p


def test_local_thd_takes_one_call_in_a_capture_whatever_the_slots(
    parallel_state, monkeypatch, capturing
):
    core = _core()
    monkeypatch.setattr(mla_adapter, "_PADDED_SLOTS", 0)
    q = torch.randn(8, 4, 40)
    assert core._thd_in_one_call(q, q, _params(_cu(3, 5), 8))  # pylint: disable=W0212
    other_kv = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=_cu(3, 5), cu_seqlens_kv=_cu(3, 5), max_seqlen_q=8
    )
    with pytest.raises(mla_adapter.MLACompatibilityError, match="one sequence at a time"):
        core(q, q, q, None, packed_seq_params=other_kv)


# --- ops per layer ---------------------------------------------------------------------------


def test_a_layers_rope_is_one_gather_and_three_ops_per_tensor(layer):
    q, k, freqs = torch.randn(16, 4, 16), torch.randn(16, 1, 16), _freqs(16)
    _layer_step(layer, _params(_cu(3, 5, 8), 8), q, k, freqs)
    params = _params(_cu(8, 4, 4), 8)
    _layer_step(layer, params, q, k, freqs)  # the batch's first layer: its positions
    counter = OpCounter()
    with counter.labelled(mla_adapter), counter.counting():
        _layer_step(layer, params, q, k, freqs)  # a further layer of the batch
    row = counter.table()["_packed_rotary_pos_emb"]
    assert row["calls"] == 2 and row["fwd_kernels"] == 1 + 2 * 3, dict(counter.names)
