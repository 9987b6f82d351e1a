"""The local spec builds DeepSeek's layer on every line (hooks H1, H9) and runs it through SDPA.

CPU, float32, real Megatron modules: the latent norms are built (``qk_layernorm=True``), the
query path has no input norm without ``q_lora_rank`` (0.19's resolver would add one, or reject
the local spec), causal core attention through ``scaled_dot_product_attention`` equals
Megatron's own softmax path, and a THD batch of many sequences equals per-sequence bshd.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from megatron.core.transformer import mla_adapter
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from mla_build import packed_seq_params
from mla_configs import SMALL, YARN, make_config

WITH_Q_LORA = dict(SMALL, q_lora_rank=48)
HAS_RESOLVER = importlib.util.find_spec("megatron.core.transformer.mla_qk_norm_config") is not None


def _te_class_missing_breaks_mla() -> str:
    from megatron.core.transformer import multi_latent_attention as mla

    if getattr(mla, "HAVE_TE", False) and not isinstance(getattr(mla, "TELinear", None), type):
        return (
            "this release's MultiLatentAttention.__init__ calls isinstance(.., TELinear) on the "
            "MagicMock upstream puts there without Transformer Engine (runs on the GPU machine)"
        )
    return ""


def build(dims, **overrides):
    reason = _te_class_missing_breaks_mla()
    if reason:
        pytest.skip(reason)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    torch.manual_seed(0)
    config = make_config(dims, YARN, qk_layernorm=True, add_bias_linear=False, **overrides)
    spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True)
    layer = build_module(spec.submodules.self_attention, config=config, layer_number=1)
    with torch.no_grad():  # norm weights that are not ones, so a missing norm shows
        for name, param in layer.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("dims", [SMALL, WITH_Q_LORA], ids=["no-q-lora", "q-lora"])
def test_local_spec_builds_deepseeks_parameters(dims, cpu_device):
    layer = build(dims)
    names = {n for n, p in layer.named_parameters() if p.numel()}
    expected = {
        "linear_kv_down_proj.weight",
        "kv_layernorm.weight",
        "linear_kv_up_proj.weight",
        "linear_proj.weight",
    }
    if dims["q_lora_rank"] is None:
        expected |= {"linear_q_proj.weight"}
    else:
        expected |= {"linear_q_down_proj.weight", "q_layernorm.weight", "linear_q_up_proj.weight"}
    assert names == expected
    assert not isinstance(layer.kv_layernorm, IdentityOp)
    assert type(layer.core_attention) is mla_adapter.MLADotProductAttention


@pytest.mark.skipif(not HAS_RESOLVER, reason="this release has no QK-norm resolver (0.19+)")
def test_upstream_query_norm_on_request(cpu_device, monkeypatch):
    """MLA_SEAM_QUERY_NORM=upstream gives upstream's behaviour: its resolver rejects this spec."""
    monkeypatch.setenv(mla_adapter.QUERY_NORM_ENV, "upstream")
    config = make_config(SMALL, YARN, qk_layernorm=True)
    assert "query_norm=upstream" in mla_adapter.describe(config)
    with pytest.raises(ValueError, match="q_lora_rank is None"):
        build(SMALL)


@pytest.mark.skipif(not HAS_RESOLVER, reason="this release has no QK-norm resolver (0.19+)")
def test_query_norm_policy_is_named_in_the_summary(monkeypatch):
    config = make_config(SMALL, YARN, qk_layernorm=True)
    assert "query_norm=none" in mla_adapter.describe(config)
    monkeypatch.setenv(mla_adapter.QUERY_NORM_ENV, "sometimes")
    with pytest.raises(mla_adapter.MLACompatibilityError, match="MLA_SEAM_QUERY_NORM"):
        mla_adapter.describe(config)


def test_sdpa_equals_megatrons_softmax_path(cpu_device):
    layer = build(SMALL)
    core = layer.core_attention
    seq, batch, heads = 33, 2, layer.config.num_attention_heads
    torch.manual_seed(1)
    q = torch.randn(seq, batch, heads, 40, requires_grad=True)
    k = torch.randn(seq, batch, heads, 40, requires_grad=True)
    v = torch.randn(seq, batch, heads, 40, requires_grad=True)
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1).view(1, 1, seq, seq)
    assert core._sdpa_computes_this(q, k)
    ours = core(q, k, v, mask)
    theirs = DotProductAttention.forward(core, q, k, v, mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(ours)
    ours_g = torch.autograd.grad(ours, (q, k, v), grad)
    theirs_g = torch.autograd.grad(theirs, (q, k, v), grad)
    for a, b in zip(ours_g, theirs_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("dims", [SMALL, WITH_Q_LORA], ids=["no-q-lora", "q-lora"])
def test_thd_of_many_sequences_equals_per_sequence_bshd(dims, cpu_device):
    layer = build(dims)
    lengths = [1, 7, 30, 2, 1, 19, 64, 3, 11, 5, 1, 40, 8, 2, 26, 9]
    x = torch.randn(sum(lengths), 1, layer.config.hidden_size, requires_grad=True)
    cu = _cu(lengths)
    packed = packed_seq_params(cu=cu)
    thd, _ = layer(x, None, packed_seq_params=packed)
    grad = torch.randn_like(thd)
    thd_grads = torch.autograd.grad(thd, [x] + list(layer.parameters()), grad)
    outs, start = [], 0
    for n in lengths:
        mask = torch.ones(n, n, dtype=torch.bool).triu(1).view(1, 1, n, n)
        outs.append(layer(x[start : start + n], mask)[0])
        start += n
    ref = torch.cat(outs)
    ref_grads = torch.autograd.grad(ref, [x] + list(layer.parameters()), grad)
    torch.testing.assert_close(thd, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(thd_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", [(30, 30), (30, 40)], ids=["q-as-kv", "q-below-kv"])
def test_one_pass_rope_in_a_layer_equals_upstreams(sizes, cpu_device, monkeypatch):
    """The layer as the tree's MLA runs it (0.19: mla_rotary_interleaved; main: the larger
    max_seqlen for q and k; dev: q's and kv's own): with the adapter's one-pass RoPE (H8) and
    with upstream's function in its place, output and gradients are the same bit for bit, also
    where max_seqlen_q is below max_seqlen_kv (dev then rotates q from the batch's start, as
    upstream's rule for a table longer than max_seqlen says)."""
    from megatron.core.transformer import multi_latent_attention

    layer = build(SMALL)
    lengths = [3, 17, 1, 30, 9]
    cu = _cu(lengths)
    torch.manual_seed(4)
    x = torch.randn(sum(lengths), 1, layer.config.hidden_size, requires_grad=True)
    grad = torch.randn_like(x)
    weights = [x] + list(layer.parameters())

    def run():
        packed = packed_seq_params(cu=cu, max_seqlen_q=sizes[0], max_seqlen_kv=sizes[1])
        out, _ = layer(x, None, packed_seq_params=packed)
        return out, torch.autograd.grad(out, weights, grad), packed

    ours, ours_g, packed = run()
    assert any(key[0] == "positions" for key in mla_adapter.packed_batch(packed).cached)
    upstream = multi_latent_attention.apply_rotary_pos_emb
    monkeypatch.setattr(mla_adapter, "rotary_pos_emb_fn", lambda attention, params: upstream)
    theirs, theirs_g, packed = run()
    assert not mla_adapter.packed_batch(packed).cached  # upstream's function ran
    assert torch.equal(ours, theirs)
    for a, b in zip(ours_g, theirs_g):
        assert torch.equal(a, b)
