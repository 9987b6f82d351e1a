"""DeepSeek-V2-Lite's attention: the one model the tests and the tool's summary line build.

Plain data in ``MLATransformerConfig``'s field names, no imports: the GPU tests read it inside a
Megatron tree's interpreter (``tests/gpu/oracles.py`` builds its :class:`MLAHyper` defaults from
it), the adapter tests build configs from it (``tests/adapter/mla_configs.py``).
"""

from __future__ import annotations

#: DeepSeek-V2-Lite attention: hidden 2048, 16 heads, kv_lora 512, no q_lora, q/k 128 + 64 RoPE,
#: v 128 (HF: hidden_size, num_attention_heads, kv_lora_rank, qk_nope_head_dim,
#: qk_rope_head_dim, v_head_dim).
V2_LITE = {
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_head_dim": 128,
    "qk_pos_emb_head_dim": 64,
    "v_head_dim": 128,
}

#: The tests' YaRN: V2-Lite's factor 40 and mscale 0.707, with ``mscale_all_dim`` 1.0 (V2-Lite
#: ships 0.707) so that code reading one for the other shows in the softmax scale.
YARN = {
    "rope_type": "yarn",
    "rotary_scaling_factor": 40.0,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
}
