"""MLA configurations the adapter tests share (real ``MLATransformerConfig`` objects)."""

from __future__ import annotations

import math
from typing import Any

from mla_seam import deepseek

#: DeepSeek-V2-Lite attention: hidden 2048, 16 heads, kv_lora 512, no q_lora, 128/64/128.
V2_LITE = dict(deepseek.V2_LITE)
#: De-aliased: 32 heads, so hidden/heads (64) is neither the q/k (192) nor the v (128) width.
DEALIASED = dict(V2_LITE, num_attention_heads=32)
#: With a query LoRA (DeepSeek-V3 style q path).
WITH_Q_LORA = dict(V2_LITE, q_lora_rank=384)
#: Small dims for CPU forward passes; v (40) != q/k (24 + 16) and != hidden/heads (32).
SMALL = dict(
    hidden_size=128,
    num_attention_heads=4,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_head_dim=24,
    qk_pos_emb_head_dim=16,
    v_head_dim=40,
)
YARN = dict(deepseek.YARN)
ROPE = dict(YARN, rope_type="rope")


def make_config(dims: dict, rope: dict = YARN, **overrides: Any):
    """An ``MLATransformerConfig`` on the CPU in float32 with dropout off."""
    import torch
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    kwargs = dict(
        num_layers=2,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        **dims,
        **rope,
    )
    kwargs.update(overrides)
    return MLATransformerConfig(**kwargs)


def deepseek_scale(qk_dim: int, rope_type: str, factor: float, mscale_all_dim: float) -> float:
    """The DeepSeek-V2 / HF softmax scale, written out from the paper's definition."""
    scale = qk_dim**-0.5
    if rope_type == "yarn" and mscale_all_dim and factor > 1:
        m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= m * m
    return scale
