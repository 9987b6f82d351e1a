"""Question 2: packed (THD) sequences — normalization and the V-pad gate."""

from __future__ import annotations

import types

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import mla_adapter
from mla_configs import SMALL, make_config


def _layer(**overrides):
    return types.SimpleNamespace(config=make_config(SMALL, **overrides))


def _cu(*lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def test_non_thd_params_become_none():
    params = PackedSeqParams(qkv_format="sbhd")
    assert mla_adapter.normalize_packed_seq(_layer(), params, torch.zeros(8, 2, 128)) is None
    assert mla_adapter.normalize_packed_seq(_layer(), None, torch.zeros(8, 2, 128)) is None


def test_missing_max_seqlen_and_kv_side_are_filled():
    cu = _cu(1, 37, 512, 1500)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu)
    out = mla_adapter.normalize_packed_seq(_layer(), params, torch.zeros(2050, 1, 128))
    assert out is params
    assert out.cu_seqlens_kv is cu
    assert out.max_seqlen_q == out.max_seqlen_kv == 1500


def test_padded_offsets_size_max_seqlen():
    cu = _cu(1, 37, 500)
    padded = _cu(8, 40, 512)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_q_padded=padded)
    mla_adapter.normalize_packed_seq(_layer(), params, torch.zeros(560, 1, 128))
    assert params.cu_seqlens_kv_padded is padded
    assert params.max_seqlen_q == 512


def test_given_max_seqlen_is_kept():
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=_cu(3, 5),
        cu_seqlens_kv=_cu(3, 5),
        max_seqlen_q=64,
        max_seqlen_kv=64,
    )
    mla_adapter.normalize_packed_seq(_layer(), params, torch.zeros(8, 1, 128))
    assert params.max_seqlen_q == params.max_seqlen_kv == 64


def test_work_is_done_once_per_batch():
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=_cu(3, 5))
    mla_adapter.normalize_packed_seq(_layer(), params, torch.zeros(8, 1, 128))
    params.max_seqlen_q = 99  # a second layer must not recompute (no extra device sync)
    mla_adapter.normalize_packed_seq(_layer(), params, torch.zeros(8, 1, 128))
    assert params.max_seqlen_q == 99


@pytest.mark.parametrize(
    "cu,tokens,message",
    [
        (torch.tensor([1, 4], dtype=torch.int32), 3, "start at 0"),
        (torch.tensor([0, 5, 3], dtype=torch.int32), 3, "never decrease"),
        (_cu(3, 5), 9, "pass cu_seqlens_q_padded"),
    ],
    ids=["not-from-zero", "decreasing", "token-count"],
)
def test_malformed_offsets_are_named(cu, tokens, message):
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu)
    with pytest.raises(mla_adapter.MLACompatibilityError, match=message):
        mla_adapter.normalize_packed_seq(_layer(), params, torch.zeros(tokens, 1, 128))


def test_padded_shorter_than_sequence_is_refused():
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=_cu(4, 4), cu_seqlens_q_padded=_cu(2, 6)
    )
    with pytest.raises(mla_adapter.MLACompatibilityError, match="at least as long"):
        mla_adapter.normalize_packed_seq(_layer(), params, torch.zeros(8, 1, 128))


def test_missing_cu_seqlens_is_refused():
    with pytest.raises(mla_adapter.MLACompatibilityError, match="cu_seqlens_q"):
        mla_adapter.normalize_packed_seq(_layer(), PackedSeqParams(qkv_format="thd"), None)


def test_upstream_value_pad_is_switched_off_only_for_adapted_core_attention():
    adapted = types.SimpleNamespace(core_attention=types.SimpleNamespace(_mla_pad_value=False))
    foreign = types.SimpleNamespace(core_attention=object())
    assert mla_adapter.upstream_value_pad(adapted, True) is False
    assert mla_adapter.upstream_value_pad(foreign, True) is True


@pytest.mark.parametrize(
    "field,message",
    [("cu_seqlens_q", "cu_seqlens_q must be an int32"), ("cu_seqlens_kv", "cu_seqlens_kv must")],
)
def test_offsets_that_are_not_int32_are_named(field, message):
    kwargs = dict(qkv_format="thd", cu_seqlens_q=_cu(3, 5), cu_seqlens_kv=_cu(3, 5))
    kwargs[field] = kwargs[field].to(torch.int64)
    with pytest.raises(mla_adapter.MLACompatibilityError, match=message):
        mla_adapter.normalize_packed_seq(
            _layer(), PackedSeqParams(**kwargs), torch.zeros(8, 1, 128)
        )


def test_decreasing_kv_offsets_name_the_field_and_entry():
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=_cu(3, 5),
        cu_seqlens_kv=torch.tensor([0, 6, 5], dtype=torch.int32),
    )
    with pytest.raises(mla_adapter.MLACompatibilityError, match=r"cu_seqlens_kv .*entry 2"):
        mla_adapter.normalize_packed_seq(_layer(), params, torch.zeros(8, 1, 128))


def test_max_seqlen_below_the_longest_sequence_is_named():
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=_cu(3, 5), max_seqlen_q=4, max_seqlen_kv=4
    )
    with pytest.raises(mla_adapter.MLACompatibilityError, match="max_seqlen_q"):
        mla_adapter.normalize_packed_seq(_layer(), params, torch.zeros(8, 1, 128))


def test_context_parallel_lengths_must_split_into_chunks():
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=_cu(4, 6))
    layer = types.SimpleNamespace(config=make_config(SMALL))
    layer.config.context_parallel_size = 2  # as a CP=2 run sees it; no group is needed
    with pytest.raises(mla_adapter.MLACompatibilityError, match="multiple of 2 x 2"):
        mla_adapter.normalize_packed_seq(layer, params, torch.zeros(5, 1, 128))


def test_one_host_copy_per_offsets_tensor(monkeypatch):
    """The once-per-batch host copy (a device sync on a GPU) is taken once per distinct tensor:
    kv offsets that are the q offsets, and padded offsets that are the actual ones, add none."""
    copies = []
    tolist = torch.Tensor.tolist

    def counting(tensor):
        copies.append(tensor)
        return tolist(tensor)

    cu = _cu(3, 5, 8)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu
    )
    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    mla_adapter.normalize_packed_seq(_layer(), params, torch.zeros(16, 1, 128))
    mla_adapter.normalize_packed_seq(_layer(), params, torch.zeros(16, 1, 128))  # next layer
    assert len(copies) == 1 and copies[0] is cu
