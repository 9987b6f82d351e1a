"""Question 3: the backend decision table, its errors, and the fallback policy."""

from __future__ import annotations

import dataclasses

import pytest
from megatron.core.transformer import mla_adapter
from megatron.core.transformer.enums import AttnBackend
from mla_configs import V2_LITE, make_config

Facts = mla_adapter.BackendFacts
HOPPER = Facts(
    "2.20.2", (9, 0), flash_attn_2=False, flash_attn_3=False, k_channels=192, v_channels=128
)
HOPPER_FA3 = dataclasses.replace(HOPPER, flash_attn_3=True)
HOPPER_FA2 = dataclasses.replace(HOPPER, flash_attn_2=True)
HOPPER_FA2_TE_PADS = dataclasses.replace(HOPPER_FA2, te_pads_for_flash=True)
HOPPER_OLD_CUDNN = dataclasses.replace(HOPPER, cudnn_version=90400)
BLACKWELL_OLD_CUDNN = dataclasses.replace(HOPPER, compute_capability=(10, 0), cudnn_version=91001)
AMPERE = dataclasses.replace(HOPPER, compute_capability=(8, 0))
AMPERE_FA2 = dataclasses.replace(AMPERE, flash_attn_2=True)
AMPERE_FA3 = dataclasses.replace(AMPERE, flash_attn_3=True)
BLACKWELL = dataclasses.replace(HOPPER, compute_capability=(10, 0))
NO_GPU = dataclasses.replace(HOPPER, compute_capability=None)
LOCAL = dataclasses.replace(HOPPER, spec="local")
LOCAL_CP = dataclasses.replace(LOCAL, context_parallel=2)
NO_TE = dataclasses.replace(HOPPER, te_version=None)

# (facts, requested) -> (backend that runs, V padded) or the error's key phrase.
TABLE = [
    (HOPPER, "auto", ("auto", False)),
    (HOPPER, "fused", ("fused", False)),
    (HOPPER, "unfused", ("unfused", False)),
    (HOPPER, "flash", "no FlashAttention build"),
    (HOPPER, "local", "turns every Transformer Engine backend off"),
    (HOPPER_FA3, "flash", ("flash", False)),
    (HOPPER_FA2, "flash", ("flash", True)),
    (HOPPER_FA2, "auto", ("auto", False)),
    (HOPPER_FA2_TE_PADS, "flash", ("flash", False)),
    (HOPPER_OLD_CUDNN, "fused", "cuDNN >= 9.5"),
    (BLACKWELL_OLD_CUDNN, "fused", "cuDNN >= 9.11"),
    (BLACKWELL_OLD_CUDNN, "auto", ("auto", False)),
    (AMPERE, "fused", "sm90+"),
    (AMPERE, "auto", ("auto", False)),
    (AMPERE, "flash", "no FlashAttention build"),
    (AMPERE_FA2, "flash", ("flash", True)),
    (AMPERE_FA2, "auto", ("auto", True)),
    (AMPERE_FA3, "flash", "no FlashAttention build"),
    (BLACKWELL, "fused", ("fused", False)),
    (NO_GPU, "fused", ("fused", False)),
    (NO_GPU, "auto", ("auto", False)),
    (NO_GPU, "flash", "no FlashAttention build"),
    (LOCAL, "auto", ("local", False)),
    (LOCAL, "local", ("local", False)),
    (LOCAL, "flash", ("local", False)),
    (LOCAL_CP, "local", "context parallelism"),
    (NO_TE, "auto", "Transformer Engine is not importable"),
]


def _id(row):
    facts, requested, _ = row
    gpu = (
        f"sm{facts.compute_capability[0]}{facts.compute_capability[1]}"
        if facts.compute_capability
        else "nogpu"
    )
    extras = "".join(
        tag
        for tag, on in (
            ("+fa2", facts.flash_attn_2),
            ("+fa3", facts.flash_attn_3),
            ("+tepad", facts.te_pads_for_flash),
            (f"-cudnn{facts.cudnn_version}", facts.cudnn_version),
            ("-te", facts.te_version is None),
            (f"-cp{facts.context_parallel}", facts.context_parallel > 1),
        )
        if on
    )
    return f"{facts.spec}-{gpu}{extras}-{requested}"


@pytest.mark.parametrize("facts,requested,expected", TABLE, ids=[_id(r) for r in TABLE])
def test_decision_table(facts, requested, expected):
    if isinstance(expected, str):
        with pytest.raises(mla_adapter.MLACompatibilityError, match=expected):
            mla_adapter.decide_backend(requested, facts)
        return
    decision = mla_adapter.decide_backend(requested, facts)
    assert (decision.backend, decision.pad_value) == expected
    assert decision.reason and not decision.fallback


def test_flash_error_names_flag_restriction_and_choices():
    with pytest.raises(mla_adapter.MLACompatibilityError) as info:
        mla_adapter.decide_backend("flash", HOPPER)
    text = str(info.value)
    for needle in (
        "--attention-backend flash",
        "192",
        "128",
        "--attention-backend fused",
        "--attention-backend unfused",
        mla_adapter.POLICY_ENV,
    ):
        assert needle in text


def test_fallback_policy_picks_the_fastest_supported_backend():
    decision = mla_adapter.decide_backend("flash", HOPPER, policy="fallback")
    assert (
        decision.fallback
        and decision.backend == "fused"
        and "fallback from flash" in decision.reason
    )
    decision = mla_adapter.decide_backend("flash", AMPERE, policy="fallback")
    assert decision.backend == "unfused"
    decision = mla_adapter.decide_backend("fused", AMPERE_FA2, policy="fallback")
    assert decision.backend == "flash" and decision.pad_value


def test_resolve_on_this_machine_without_te_defers_to_the_spec():
    config = make_config(V2_LITE, attention_backend=AttnBackend.flash)
    if mla_adapter._te_version() is None:
        assert mla_adapter.resolve_attention_backend(config) is None
    decision = mla_adapter.resolve_attention_backend(config, "local")
    assert decision.backend == "local" and "ignored" in decision.reason


def test_fallback_rewrites_the_config_before_megatron_sets_nvte(monkeypatch):
    monkeypatch.setenv(mla_adapter.POLICY_ENV, "fallback")
    monkeypatch.setattr(mla_adapter, "_te_version", lambda: "2.20.2")
    monkeypatch.setattr(mla_adapter, "_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(mla_adapter, "_importable", lambda name: False)
    monkeypatch.setattr(mla_adapter, "_cudnn_version", lambda: 91900)
    config = make_config(V2_LITE, attention_backend=AttnBackend.flash)
    decision = mla_adapter.resolve_attention_backend(config)
    assert decision.fallback and config.attention_backend == AttnBackend.fused


def test_non_mla_config_is_left_alone():
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, attention_backend=AttnBackend.flash
    )
    assert mla_adapter.resolve_attention_backend(config) is None


def test_an_attention_variant_is_decided_per_layer(monkeypatch):
    """H3 runs before any layer exists; a config with an attention variant (0.18+ DSA, dev's
    dsv4_hybrid) builds the variant's own core attention, which no backend flag reaches: no
    decision at H3 (a plain MLA config with the same request is refused there), and a layer
    that does build TE's core attention is still decided when it is built (H1)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    if "experimental_attention_variant" not in MLATransformerConfig.__dataclass_fields__:
        pytest.skip("this release has no experimental_attention_variant (0.18+)")
    monkeypatch.setattr(mla_adapter, "_te_version", lambda: "2.20.2")
    monkeypatch.setattr(mla_adapter, "_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(mla_adapter, "_importable", lambda name: False)
    monkeypatch.setattr(mla_adapter, "_cudnn_version", lambda: 91900)
    plain = make_config(V2_LITE, attention_backend=AttnBackend.flash)
    with pytest.raises(mla_adapter.MLACompatibilityError, match="no FlashAttention build"):
        mla_adapter.resolve_attention_backend(plain)
    variant = make_config(
        V2_LITE,
        attention_backend=AttnBackend.flash,
        experimental_attention_variant="dsa",
        add_bias_linear=False,
    )
    assert mla_adapter.resolve_attention_backend(variant) is None
    assert mla_adapter.backend_decision(variant) is None
    with pytest.raises(mla_adapter.MLACompatibilityError, match="no FlashAttention build"):
        mla_adapter.resolve_attention_backend(variant, "te")
