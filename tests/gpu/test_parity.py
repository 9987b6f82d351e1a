"""HF parity of the MLA layer at input RMS 1 and 3, with and without a query LoRA (issue 8).

An HF DeepSeek checkpoint holds no query-input norm weight. Megatron 0.19's QK-norm resolver
builds one for ``q_lora_rank=None`` (fused into ``linear_q_proj``); converted, that weight is
left at its initial ones, and the layer computes another function: invisible at unit input
RMS with unit weights, large at RMS 3. Here every case builds Megatron's layer, loads the HF
layer's weights (an extra Megatron norm weight stays at ones, as after a conversion), runs both
on inputs whose every token has exactly the given RMS, and records ``parity_hf``. Goals (fp32):
TE <= 1e-3, local <= 1e-5; asserted on the patched tree, recorded on vanilla. The suite runs this
file with cuBLAS's TF32 off (``NVIDIA_TF32_OVERRIDE=0``, its phase's environment): with TF32, TE's
fp32 GEMMs gave 1.41e-3 at RMS 3 on vanilla and patched trees alike. Records carry the setting.

Runs on a GPU (TE and local spec) and on the CPU (local spec, where the tree builds it).
"""

from __future__ import annotations

import os

import pytest
import torch
from mla_build import NO_TE, build_attention, have_adapter, have_te, reference_params
from oracles import Q_LORA, V2_LITE, causal_layout, hf_attention, hf_available, hf_forward, max_rel

HAVE_HF, NO_HF = hf_available()
GOALS = {"te": 1e-3, "local": 1e-5}
BATCH, SEQ = 2, 64


def rms_input(rms: float, dev: str, seed: int = 3) -> torch.Tensor:
    """``[batch, seq, hidden]`` float64 whose every token has RMS exactly ``rms``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, SEQ, V2_LITE.hidden_size, generator=gen, dtype=torch.float64) + 0.3
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt() * rms
    return x.to(dev)


@pytest.mark.skipif(not HAVE_HF, reason=NO_HF)
@pytest.mark.parametrize("input_rms", [1.0, 3.0])
@pytest.mark.parametrize("q_lora", ["none", "set"])
@pytest.mark.parametrize("spec", ["te", "local"])
def test_hf_parity(spec, q_lora, input_rms, buildable, megatron_version, record):
    if spec == "te" and (buildable != "cuda" or not have_te()):
        pytest.skip(f"TE spec: {NO_TE} and a GPU")
    if spec == "local" and not have_adapter():
        pytest.skip("a vanilla tree cannot build MLA with the local spec (#1589)")
    hyper = V2_LITE if q_lora == "none" else Q_LORA
    backend = "local" if spec == "local" else "auto"
    built = build_attention(hyper, spec, torch.float32, backend=backend)
    params = reference_params(built, requires_grad=False)
    own = dict(built.module.named_parameters())
    extra = [n for n, p in own.items() if p.numel() and n not in built.mapping]
    if built.hyper.q_input_norm:  # upstream's query-input norm: no HF weight for it
        extra.append("linear_q_proj.layer_norm_weight")
        with torch.no_grad():
            own["linear_q_proj.layer_norm_weight"].fill_(1.0)
        params.pop("q_input_layernorm.weight", None)
    deepseek = built.hyper.replace(q_input_norm=False)
    x = rms_input(input_rms, buildable)
    with torch.no_grad():
        out = built.module(x.transpose(0, 1).float().contiguous(), _mask(built, buildable))[0]
        out = out.transpose(0, 1)
        hf = hf_attention(deepseek, params)
        positions, allowed = causal_layout(BATCH, SEQ, buildable)
        want = hf_forward(hf, x, positions, allowed)
    rel = max_rel(out, want)
    consumed = not extra and not built.notes
    goal = GOALS[spec]
    passed = rel <= goal and consumed
    record(
        case="parity_hf",
        version=".".join(str(v) for v in megatron_version),
        spec=spec,
        dtype="fp32",
        q_lora_rank=hyper.q_lora_rank,
        input_rms=input_rms,
        rel_err=rel,
        max_abs=(out.double() - want.double()).abs().max().item(),
        params_consumed=consumed,
        extra_params=extra,
        notes=built.notes,
        tolerance=goal,
        passed=passed,
        query_norm_env=os.environ.get("MLA_SEAM_QUERY_NORM"),
        tf32_override=os.environ.get("NVIDIA_TF32_OVERRIDE"),
    )
    if not have_adapter() or os.environ.get("MLA_SEAM_QUERY_NORM"):
        # The record carries the comparison; a pass here would read as "vanilla matches HF".
        pytest.skip(f"recorded, not asserted (vanilla tree or upstream query norm): rel {rel:.3g}")
    assert consumed, f"Megatron parameters without an HF counterpart: {extra} {built.notes}"
    assert rel <= goal, f"relative error {rel:.3g} vs HF above {goal:g}"


def _mask(built, dev: str):
    if built.spec != "local":
        return None
    return torch.ones(SEQ, SEQ, dtype=torch.bool, device=dev).triu(1).view(1, 1, SEQ, SEQ)
