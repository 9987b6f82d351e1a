"""Golden values: a tiny MLA GPT trained N steps deterministically; loss and grad norm per step.

The model: 2 layers of DeepSeek-style MLA (hidden 256, 4 heads, q_lora 96, kv_lora 64,
qk 32+16, v 40, YaRN with mscale != mscale_all_dim) with a dense MLP, vocab 512, sequence 128,
micro-batch 4, float32 parameters, AdamW, synthetic token streams from a fixed seed. On a GPU it
uses the TE spec with the unfused backend (as Megatron's own golden-value runs: deterministic
mode, unfused attention), with ``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0`` and cuBLAS's deterministic
workspace; without TE, or on a CPU (Megatron 0.19+), the local spec.

The test trains twice in one process and requires identical numbers (determinism), then once
more from weights that depend only on each parameter's name (record ``golden_fixed``: across
tags, it tells a change of what the model computes from a change of its initialization), then:
``MLA_SEAM_GOLDEN_OUT`` set -> writes the golden-values file there (Megatron's schema, via
:func:`mla_seam.suite.golden_document`); ``MLA_SEAM_GOLDEN_REF`` naming an existing file ->
the run must equal it exactly (same tag, TE and card). ``MLA_SEAM_GOLDEN_STEPS`` sets N (20).
Cross-tag differences are reported by ``mla-seam suite``, not asserted here.
"""

from __future__ import annotations

import math
import os
import zlib
from typing import Dict, List

import pytest
import torch
from mla_build import have_adapter, have_te, megatron_config, set_backend
from oracles import YARN, MLAHyper

TINY = MLAHyper(
    hidden_size=256,
    num_heads=4,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=40,
    rope=YARN,
)
VOCAB, SEQ, BATCH, LAYERS = 512, 128, 4, 2
SEED = 1234


def _steps() -> int:
    return int(os.environ.get("MLA_SEAM_GOLDEN_STEPS", "20"))


def _batch(step: int, dev: str):
    """Token streams over the first 64 ids, x_{i+1} = (x_i + d) mod 64 with a per-row stride d.

    Learnable within a few steps (unigram, then bigram), and a pure function of the seed.
    """
    gen = torch.Generator().manual_seed(SEED * 1000 + step)
    start = torch.randint(0, 64, (BATCH, 1), generator=gen)
    stride = torch.randint(1, 4, (BATCH, 1), generator=gen)
    seq = (start + stride * torch.arange(SEQ + 1)) % 64
    return seq[:, :-1].to(dev), seq[:, 1:].to(dev)


def _model(spec: str, backend: str, dev: str):
    from megatron.core.models.gpt import gpt_layer_specs  # pylint: disable=C0415
    from megatron.core.models.gpt.gpt_model import GPTModel  # pylint: disable=C0415

    config = megatron_config(
        TINY,
        torch.float32,
        backend=backend,
        num_layers=LAYERS,
        ffn_hidden_size=512,
        init_method_std=0.02,
    )
    set_backend(config)  # GPTModel calls it too; this clears stale NVTE_* flags first
    for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        os.environ.pop(name, None)
    make = (
        gpt_layer_specs.get_gpt_layer_local_spec
        if spec == "local"
        else gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
    )
    layer_spec = make(multi_latent_attention=True, qk_layernorm=True)
    torch.manual_seed(SEED)
    if dev == "cuda":
        from megatron.core.tensor_parallel.random import (  # pylint: disable=C0415
            model_parallel_cuda_manual_seed,
        )

        model_parallel_cuda_manual_seed(SEED)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )
    return model.to(dev)


def set_fixed_weights(model: torch.nn.Module) -> None:
    """Overwrite the model's weights with values that depend on nothing but each name and shape.

    Matrices: N(0, 0.02) from a generator seeded by the parameter's name; vectors (the norms'
    weights): ones. The curve trained from them tells a change of what the model computes from a
    change of how a release initializes it (the draw order of its RNG, which module forks the
    model-parallel RNG), which moves the native curve alone.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
                continue
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def train(
    spec: str, backend: str, steps: int, dev: str, fixed_weights: bool = False
) -> Dict[str, List[float]]:
    """Train the tiny model ``steps`` steps; loss and global grad norm per step.

    ``fixed_weights``: from :func:`set_fixed_weights` instead of the release's own init.
    """
    model = _model(spec, backend, dev)
    if fixed_weights:
        set_fixed_weights(model)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0
    )
    positions = torch.arange(SEQ, device=dev).unsqueeze(0).expand(BATCH, SEQ)
    mask = None
    if spec == "local":
        mask = torch.ones(SEQ, SEQ, dtype=torch.bool, device=dev).triu(1).view(1, 1, SEQ, SEQ)
    losses, norms = [], []
    for step in range(1, steps + 1):
        tokens, labels = _batch(step, dev)
        optimizer.zero_grad(set_to_none=True)
        per_token = model(tokens, positions, mask, labels=labels)
        loss = per_token.float().mean()
        loss.backward()
        squares = [
            p.grad.detach().double().square().sum()
            for p in model.parameters()
            if p.grad is not None
        ]
        norm = torch.stack(squares).sum().sqrt()
        optimizer.step()
        losses.append(float(loss.item()))
        norms.append(float(norm.item()))
    return {"lm loss": losses, "grad norm": norms}


@pytest.mark.gpu
def test_golden_values(buildable, record):
    from mla_seam.suite import (  # pylint: disable=C0415
        compare_golden_exact,
        golden_document,
        read_golden,
        write_golden,
    )

    dev = buildable
    if not have_adapter():
        pytest.skip("golden values are recorded for the patched tree")
    spec, backend = ("te", "unfused") if dev == "cuda" and have_te() else ("local", "local")
    if dev == "cuda":
        os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    steps = _steps()
    first = train(spec, backend, steps, dev)
    second = train(spec, backend, steps, dev)
    doc = golden_document(first)
    deterministic = compare_golden_exact(golden_document(second), doc)
    record(
        case="golden",
        spec=spec,
        backend=backend,
        device=dev,
        steps=steps,
        values=first,
        deterministic=not deterministic,
    )
    assert all(math.isfinite(v) for v in first["lm loss"] + first["grad norm"])
    head, tail = first["lm loss"][:5], first["lm loss"][-5:]
    assert sum(tail) < sum(head), f"the tiny model does not learn: {first['lm loss']}"
    assert not deterministic, f"two identical runs differ: {deterministic[:5]}"
    fixed = train(spec, backend, steps, dev, fixed_weights=True)
    record(case="golden_fixed", spec=spec, backend=backend, device=dev, steps=steps, values=fixed)
    assert all(math.isfinite(v) for v in fixed["lm loss"] + fixed["grad norm"])
    out = os.environ.get("MLA_SEAM_GOLDEN_OUT")
    if out:
        write_golden(out, doc)
    ref = os.environ.get("MLA_SEAM_GOLDEN_REF")
    if ref and os.path.isfile(ref):
        problems = compare_golden_exact(doc, read_golden(ref))
        assert not problems, f"golden values differ from {ref}: {problems[:10]}"
