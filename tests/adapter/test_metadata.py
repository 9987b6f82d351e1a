"""Question 1: layer metadata (channels, softmax scale, kv_channels)."""

from __future__ import annotations

import pytest
from megatron.core.transformer import mla_adapter
from mla_configs import (
    DEALIASED,
    ROPE,
    SMALL,
    V2_LITE,
    WITH_Q_LORA,
    YARN,
    deepseek_scale,
    make_config,
)


@pytest.mark.parametrize(
    "dims", [V2_LITE, DEALIASED, WITH_Q_LORA], ids=["v2lite", "32heads", "qlora"]
)
@pytest.mark.parametrize("rope", [YARN, ROPE], ids=["yarn", "rope"])
def test_channels_and_scale_follow_deepseek(dims, rope):
    config = make_config(dims, rope)
    meta = mla_adapter.layer_metadata(config)
    assert meta.k_channels == dims["qk_head_dim"] + dims["qk_pos_emb_head_dim"] == 192
    assert meta.v_channels == dims["v_head_dim"] == 128
    expected = deepseek_scale(192, rope["rope_type"], 40.0, rope["mscale_all_dim"])
    assert meta.softmax_scale == pytest.approx(expected, rel=1e-12)


def test_yarn_scale_uses_mscale_all_dim_not_mscale():
    config = make_config(V2_LITE, dict(YARN, mscale=0.5, mscale_all_dim=0.707))
    scale = mla_adapter.layer_metadata(config).softmax_scale
    assert scale == pytest.approx(deepseek_scale(192, "yarn", 40.0, 0.707))
    assert scale != pytest.approx(deepseek_scale(192, "yarn", 40.0, 0.5))


def test_plain_rope_gets_no_yarn_factor():
    """Upstream multiplies by YaRN's mscale^2 even for rope_type='rope' (0.1147 vs 0.0722)."""
    config = make_config(V2_LITE, ROPE)
    assert mla_adapter.layer_metadata(config).softmax_scale == pytest.approx(192**-0.5)


def test_explicit_softmax_scale_wins():
    config = make_config(V2_LITE, YARN, softmax_scale=0.05)
    meta = mla_adapter.layer_metadata(config)
    assert meta.softmax_scale == 0.05 and meta.scale_source == "config.softmax_scale"


def test_kv_channels_default_becomes_v_head_dim_when_dealiased():
    config = make_config(DEALIASED)
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.kv_channels == 128


def test_kv_channels_set_by_user_is_kept():
    config = make_config(DEALIASED, kv_channels=96)
    assert config.kv_channels == 96


@pytest.mark.parametrize("field,value", [("v_head_dim", 0), ("qk_pos_emb_head_dim", -1)])
def test_bad_dims_fail_at_config(field, value):
    with pytest.raises(mla_adapter.MLACompatibilityError, match=field.replace("_", "-")):
        make_config(dict(SMALL, **{field: value}))


@pytest.mark.parametrize("field", ["qk_head_dim", "kv_lora_rank"])
def test_dims_a_config_may_derive_fail_when_a_layer_reads_them(field):
    """Checked once ``__post_init__`` is done (dev's dsv4_hybrid derives them after H4): a
    config keeps them, the layer build (H1) and the backend decision (H3) refuse them."""
    config = make_config(dict(SMALL, **{field: 0}))
    with pytest.raises(mla_adapter.MLACompatibilityError, match=field.replace("_", "-")):
        mla_adapter.layer_metadata(config)


def _config_fields() -> set:
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return set(MLATransformerConfig.__dataclass_fields__)


def test_head_dims_a_variant_derives_are_read_as_derived():
    """dev's ``dsv4_hybrid`` re-derives qk_head_dim and kv_lora_rank from v_head_dim and
    qk_pos_emb_head_dim after H4: the adapter accepts what the variant overrides and answers
    with the widths its layers get (q/k heads v_head_dim wide)."""
    if "csa_compress_ratios" not in _config_fields():
        pytest.skip("this release has no dsv4_hybrid attention variant (dev's DeepSeek-V4)")
    dims = dict(SMALL, v_head_dim=48, qk_head_dim=0, kv_lora_rank=0)
    config = make_config(
        dims, YARN, experimental_attention_variant="dsv4_hybrid", csa_compress_ratios=[0, 4]
    )
    assert config.qk_head_dim == config.kv_lora_rank == 48 - SMALL["qk_pos_emb_head_dim"]
    meta = mla_adapter.layer_metadata(config)
    assert meta.k_channels == meta.v_channels == config.kv_channels == 48
    assert meta.softmax_scale == pytest.approx(deepseek_scale(48, "yarn", 40.0, 1.0), rel=1e-12)


def test_grouped_output_projection_leaves_channels_and_scale():
    """dev's ``o_groups`` / ``o_lora_rank`` (grouped output projection) change no head width."""
    if "o_groups" not in _config_fields():
        pytest.skip("this release's MLATransformerConfig has no o_groups (dev's grouped output)")
    grouped = make_config(SMALL, YARN, o_groups=2, o_lora_rank=16)
    plain = make_config(SMALL, YARN)
    assert mla_adapter.layer_metadata(grouped) == mla_adapter.layer_metadata(plain)
    assert grouped.kv_channels == plain.kv_channels == SMALL["v_head_dim"]


def test_yarn_mscale_matches_definition():
    assert mla_adapter.yarn_mscale(1.0, 0.707) == 1.0
    assert mla_adapter.yarn_mscale(40.0, 1.0) == pytest.approx(1.0 + 0.1 * 3.6888794541139363)


def test_describe_names_channels_scale_and_backend():
    config = make_config(V2_LITE, YARN)
    mla_adapter.resolve_attention_backend(config, "te" if mla_adapter.HAVE_TE else "local")
    line = mla_adapter.describe(config)
    assert "k_channels=192" in line and "v_channels=128" in line
    assert "softmax_scale=" in line and "backend=" in line
