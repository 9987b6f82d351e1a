"""Hook H1 end to end: MLA built with the local spec, THD equal to per-sequence bshd (CPU)."""

from __future__ import annotations

import inspect
import pickle

import pytest
import torch
from megatron.core.transformer import mla_adapter
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from mla_build import packed_seq_params
from mla_configs import SMALL, YARN, make_config


def _te_class_missing_breaks_mla() -> str:
    """Upstream 0.16.x: MLA __init__ does isinstance(x, TELinear) with TELinear None w/o TE."""
    from megatron.core.transformer import multi_latent_attention as mla

    if getattr(mla, "HAVE_TE", False) and not isinstance(getattr(mla, "TELinear", None), type):
        return "this release's MultiLatentAttention.__init__ calls isinstance(.., TELinear) on "
    return ""


@pytest.fixture
def mla_layer(cpu_device):
    reason = _te_class_missing_breaks_mla()
    if reason:
        pytest.skip(
            reason + "the MagicMock stand-in upstream puts there without Transformer "
            "Engine (no TE on this CPU machine; the GPU smoke builds it with TE)"
        )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    torch.manual_seed(0)
    config = make_config(SMALL, YARN)
    spec = get_gpt_layer_local_spec(multi_latent_attention=True)
    return build_module(spec.submodules.self_attention, config=config, layer_number=1)


def test_vanilla_local_core_attention_rejects_mla_channels(parallel_state):
    """Why H1 exists: upstream's local DotProductAttention takes no k/v channels (#1589)."""
    if "k_channels" in inspect.signature(DotProductAttention.__init__).parameters:
        pytest.skip("this release's DotProductAttention accepts k_channels (upstream fixed #1589)")
    config = make_config(SMALL)
    with pytest.raises(TypeError, match="k_channels"):
        DotProductAttention(config, 1, AttnMaskType.causal, "self", k_channels=40, v_channels=40)


def test_adapted_local_core_attention_keeps_identity(parallel_state):
    config = make_config(SMALL)
    adapted = mla_adapter.adapted_class(DotProductAttention)
    assert adapted is mla_adapter.MLADotProductAttention
    assert issubclass(adapted, DotProductAttention)
    ours = adapted(
        config, 1, AttnMaskType.causal, "self", softmax_scale=0.1, k_channels=40, v_channels=40
    )
    plain = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    assert ours.state_dict().keys() == plain.state_dict().keys()
    assert ours.hidden_size_per_partition == 40 * config.num_attention_heads
    assert pickle.loads(pickle.dumps(adapted)) is adapted


def test_mla_builds_with_local_spec(mla_layer):
    config = mla_layer.config
    core = mla_layer.core_attention
    assert (
        isinstance(core, DotProductAttention) and type(core) is mla_adapter.MLADotProductAttention
    )
    expected = mla_adapter.layer_metadata(config).softmax_scale
    assert core.softmax_scale == pytest.approx(expected)
    assert mla_layer.softmax_scale == pytest.approx(expected)
    assert mla_adapter.backend_decision(config).backend == "local"


def test_local_spec_builds_mla_with_a_grouped_output_config(cpu_device):
    """dev's MLA config carries the grouped output projection (o_groups, o_lora_rank); the
    local spec builds MLA there (vanilla dev: TypeError k_channels) and the core attention's
    heads x v_head_dim output is what linear_proj takes."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    if "o_groups" not in MLATransformerConfig.__dataclass_fields__:
        pytest.skip("this release's MLATransformerConfig has no o_groups (dev's grouped output)")
    reason = _te_class_missing_breaks_mla()
    if reason:
        pytest.skip(reason + "the MagicMock stand-in upstream puts there without TE")
    torch.manual_seed(0)
    config = make_config(SMALL, YARN, o_groups=2, o_lora_rank=16)
    spec = get_gpt_layer_local_spec(multi_latent_attention=True)
    layer = build_module(spec.submodules.self_attention, config=config, layer_number=1)
    width = SMALL["num_attention_heads"] * SMALL["v_head_dim"]
    assert type(layer.core_attention) is mla_adapter.MLADotProductAttention
    assert layer.core_attention.hidden_size_per_partition == width
    assert layer.linear_proj.weight.shape[1] == width
    n = 7
    mask = torch.ones(n, n, dtype=torch.bool).triu(1).view(1, 1, n, n)
    out, _ = layer(torch.randn(n, 2, SMALL["hidden_size"]), mask)
    assert out.shape == (n, 2, SMALL["hidden_size"]) and torch.isfinite(out).all()


def _per_sequence(layer, x, lengths):
    outs, start = [], 0
    for n in lengths:
        mask = torch.ones(n, n, dtype=torch.bool).triu(1).view(1, 1, n, n)
        out, _ = layer(x[start : start + n], mask)
        outs.append(out)
        start += n
    return torch.cat(outs)


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


def test_thd_equals_per_sequence_bshd(mla_layer):
    lengths = [1, 37, 64, 5]
    x = torch.randn(sum(lengths), 1, mla_layer.config.hidden_size, requires_grad=True)
    cu = _cu(lengths)
    packed = packed_seq_params(cu=cu)
    thd, _ = mla_layer(x, None, packed_seq_params=packed)
    grad_thd = torch.autograd.grad(thd.square().sum(), x)[0]
    ref = _per_sequence(mla_layer, x, lengths)
    grad_ref = torch.autograd.grad(ref.square().sum(), x)[0]
    torch.testing.assert_close(thd, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_thd, grad_ref, rtol=1e-5, atol=1e-6)


def test_thd_with_padded_offsets(mla_layer):
    lengths, padded = [3, 37, 20], [8, 40, 24]
    hidden = mla_layer.config.hidden_size
    chunks = [torch.randn(p, 1, hidden) for p in padded]
    x = torch.cat(chunks)
    packed = packed_seq_params(lengths, padded, with_max=False, dev="cpu")
    out, _ = mla_layer(x, None, packed_seq_params=packed)
    assert out.shape[0] == sum(padded)
    start = 0
    for n, p, chunk in zip(lengths, padded, chunks):
        ref = _per_sequence(mla_layer, chunk[:n], [n])
        torch.testing.assert_close(out[start : start + n], ref, rtol=1e-5, atol=1e-6)
        start += p
