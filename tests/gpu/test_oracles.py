"""Patched Megatron MLA against two independent oracles: outputs AND gradients.

Oracles (``oracles.py``): a plain-PyTorch MLA written from the DeepSeek-V2 definition with the
softmax scale given explicitly, and HuggingFace transformers' ``DeepseekV3Attention`` loaded with
the same weights through an explicit name mapping. Inputs are never only unit-RMS (per-token RMS
0.25..4, non-zero mean) and norm weights are not ones, so a missing or extra RMSNorm shows.

Runs on the CPU (local spec, Megatron 0.19+, float32/float64/bfloat16) and on a GPU (local and TE
spec). Tolerances are per dtype (``oracles.TOLERANCES``, max abs difference over max abs value, for the
output and every gradient), against float64 oracles: float64 1e-5 (Megatron's RoPE tables are
float32); float32 5e-5 / 1e-4 (output / gradients); TF32 (TE's float32 GEMMs) 5e-3 / 1e-2;
bfloat16 3e-2 / 1e-1 (8e-2 / 1.5e-1 for the local spec, whose softmax is bf16 too). HF computes RoPE and the softmax in float32 even in a float64 module, so
comparisons with HF use at least :data:`HF_FLOOR`.

What Megatron builds is read back from its parameters (``mla_build.build_attention``). Where it
is not DeepSeek's layer (Megatron 0.19: an extra RMSNorm on the query input in the TE spec; no
latent norms possible in the local spec without q_lora), the reference is configured to match
what was built, so the adapter's numerics are still checked, and ``test_megatron_is_deepseek``
reports the structural drift (xfail naming it).
"""

from __future__ import annotations

import math

import pytest
import torch
from mla_build import NO_CUDA, NO_TE, TREE
from oracles import (
    DIMS,
    PLAIN_ROPE,
    ROPES,
    V2_LITE,
    YARN,
    Consumed,
    causal_layout,
    hf_attention,
    hf_available,
    hf_forward,
    init_params,
    make_input,
    max_rel,
    packed_layout,
    reference_mla,
    reference_packed,
    softmax_scale,
    tolerance,
)

HAVE_HF, NO_HF = hf_available()
needs_hf = pytest.mark.skipif(not HAVE_HF, reason=NO_HF)
HF_FLOOR = 1e-5  # HF: float32 softmax and RoPE tables even in a float64 module (~2e-6)
BATCH, SEQ = 2, 64
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# The oracles themselves (no Megatron)
# ---------------------------------------------------------------------------------------------


def test_softmax_scale_is_the_deepseek_formula():
    """Numbers written out by hand: 192^-0.5, times (0.1*1.0*ln 40 + 1)^2 for YaRN."""
    assert softmax_scale(V2_LITE.replace(rope=PLAIN_ROPE)) == pytest.approx(192**-0.5)
    yarn = (0.1 * 1.0 * math.log(40.0) + 1.0) ** 2 / math.sqrt(192)
    assert softmax_scale(V2_LITE) == pytest.approx(yarn)
    assert softmax_scale(V2_LITE) == pytest.approx(0.13523377886)
    no_all_dim = V2_LITE.replace(rope=YARN.__class__(mscale_all_dim=0.0))
    assert softmax_scale(no_all_dim) == pytest.approx(192**-0.5)


@pytest.mark.parametrize("dims", sorted(DIMS))
def test_reference_reads_and_differentiates_every_parameter(dims):
    hyper = DIMS[dims]
    params = {k: v.requires_grad_(True) for k, v in init_params(hyper).items()}
    tracked = Consumed(params)
    out = reference_mla(tracked, make_input((1, 16, hyper.hidden_size)), hyper)
    out.square().sum().backward()
    assert tracked.unread() == []
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params.values())


def test_reference_packed_equals_per_sequence_and_zeroes_padding():
    hyper = V2_LITE
    params = init_params(hyper)
    lengths, padded = [1, 6, 13], [4, 6, 16]
    x = make_input((sum(padded), hyper.hidden_size))
    out = reference_packed(params, x, hyper, lengths, padded)
    start = 0
    for n, p in zip(lengths, padded):
        alone = reference_mla(params, x[start : start + n][None], hyper)[0]
        assert max_rel(out[start : start + n], alone) < 1e-12
        assert out[start + n : start + p].abs().max().item() == 0.0 if p > n else True
        start += p


@needs_hf
@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("dims", sorted(DIMS))
def test_reference_matches_hf_deepseek_v3(dims, rope, record):
    """Two oracles agree: outputs and gradients (input and every parameter), float64."""
    hyper = DIMS[dims].replace(rope=ROPES[rope])
    params = {k: v.requires_grad_(True) for k, v in init_params(hyper).items()}
    x = make_input((BATCH, 40, hyper.hidden_size)).requires_grad_(True)
    grad_out = make_input((BATCH, 40, hyper.hidden_size), seed=2)
    positions, allowed = causal_layout(BATCH, 40)
    ref = reference_mla(params, x, hyper)
    ref.backward(grad_out)
    ref_grads = {k: p.grad.clone() for k, p in params.items()}
    ref_gx = x.grad.clone()

    hf = hf_attention(hyper, {k: v.detach() for k, v in params.items()})
    x2 = x.detach().clone().requires_grad_(True)
    out = hf_forward(hf, x2, positions, allowed)
    out.backward(grad_out)
    hf_grads = {k: p.grad for k, p in hf[0].named_parameters()}
    diffs = {"out": max_rel(out, ref), "grad_x": max_rel(x2.grad, ref_gx)}
    diffs.update({f"grad:{k}": max_rel(hf_grads[k], g) for k, g in ref_grads.items()})
    record(case="oracle_reference_vs_hf", dims=dims, rope=rope, **diffs)
    assert set(hf_grads) == set(ref_grads)
    assert max(diffs.values()) < HF_FLOOR, diffs


# ---------------------------------------------------------------------------------------------
# Megatron against the oracles
# ---------------------------------------------------------------------------------------------

SPECS = ["local", "te"]


def _skip_unless_runnable(spec: str, dtype: torch.dtype, dev: str) -> None:
    from mla_build import have_te  # pylint: disable=C0415

    if spec == "te":
        if dev != "cuda":
            pytest.skip(f"TE spec: {NO_CUDA}")
        if not have_te():
            pytest.skip(NO_TE)
        if dtype == torch.float64:
            pytest.skip("Transformer Engine has no float64 attention")


def _tf32(spec: str) -> bool:
    """TE runs float32 GEMMs as TF32; torch only where the user allowed it."""
    return spec == "te" or (torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32)


def _compare(built, dtype, dev, seq=SEQ):
    """Run Megatron and both oracles on one input; returns the record fields and limits."""
    from mla_build import reference_params, run_fwd_bwd  # pylint: disable=C0415

    hyper = built.hyper
    x = make_input((BATCH, seq, hyper.hidden_size), device=dev).to(dtype)
    grad_out = make_input((BATCH, seq, hyper.hidden_size), seed=2, device=dev).to(dtype)
    out, gx, grads, _ = run_fwd_bwd(
        built, x.transpose(0, 1).contiguous(), grad_out.transpose(0, 1).contiguous()
    )
    out, gx = out.transpose(0, 1), gx.transpose(0, 1)

    params = reference_params(built)
    tracked = Consumed(params)
    x_ref = x.detach().double().clone().requires_grad_(True)
    ref = reference_mla(tracked, x_ref, hyper)
    ref.backward(grad_out.double())
    assert tracked.unread() == [], f"reference parameters never read: {tracked.unread()}"
    diffs = {"out": max_rel(out, ref), "grad_x": max_rel(gx, x_ref.grad)}
    diffs.update({f"grad:{k}": max_rel(grads[k], p.grad) for k, p in params.items()})

    hf_diffs = {}
    if HAVE_HF and hyper.latent_norms and not hyper.q_input_norm:
        hf_params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        hf = hf_attention(hyper, hf_params)
        x_hf = x.detach().double().clone().requires_grad_(True)
        positions, allowed = causal_layout(BATCH, seq, dev)
        out_hf = hf_forward(hf, x_hf, positions, allowed)
        out_hf.backward(grad_out.double())
        hf_named = dict(hf[0].named_parameters())
        hf_diffs = {"out": max_rel(out, out_hf), "grad_x": max_rel(gx, x_hf.grad)}
        hf_diffs.update({f"grad:{k}": max_rel(grads[k], hf_named[k].grad) for k in params})
    return diffs, hf_diffs


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("dims", sorted(DIMS))
@pytest.mark.parametrize("spec", SPECS)
def test_megatron_against_oracles(spec, dims, rope, dtype, buildable, record):
    """Outputs and all gradients of the patched MLA layer vs the reference (and HF)."""
    from mla_build import build_attention, have_adapter  # pylint: disable=C0415

    torch_dtype = DTYPES[dtype]
    _skip_unless_runnable(spec, torch_dtype, buildable)
    if not have_adapter():
        pytest.skip("oracle comparisons run on the patched tree")
    hyper = DIMS[dims].replace(rope=ROPES[rope])
    built = build_attention(
        hyper, spec, torch_dtype, backend="local" if spec == "local" else "auto"
    )
    diffs, hf_diffs = _compare(built, torch_dtype, buildable)
    tol_out, tol_grad = tolerance(torch_dtype, tf32=_tf32(spec), bf16_softmax=spec == "local")
    decision = built.decision
    record(
        case="oracle_megatron",
        spec=spec,
        dims=dims,
        rope=rope,
        dtype=dtype,
        device=buildable,
        notes=built.notes,
        backend=getattr(decision, "backend", None),
        max_rel_vs_reference=diffs,
        max_rel_vs_hf=hf_diffs,
        tolerance={"out": tol_out, "grad": tol_grad},
    )
    assert diffs["out"] < tol_out, diffs
    worst_grad = max(v for k, v in diffs.items() if k != "out")
    assert worst_grad < tol_grad, diffs
    if hf_diffs:
        assert hf_diffs["out"] < max(tol_out, HF_FLOOR), hf_diffs
        assert max(v for k, v in hf_diffs.items() if k != "out") < max(tol_grad, HF_FLOOR)


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("spec", SPECS)
def test_softmax_scale_is_the_explicit_one(spec, rope, buildable, record):
    """The layer's softmax scale is DeepSeek's, computed here by hand (upstream: mscale^2 for
    plain RoPE too, and mscale instead of mscale_all_dim before core_v0.14)."""
    from mla_build import build_attention, have_adapter  # pylint: disable=C0415

    _skip_unless_runnable(spec, torch.float32, buildable)
    if not have_adapter():
        pytest.skip("the explicit scale is the adapter's; vanilla trees differ by design")
    hyper = V2_LITE.replace(rope=ROPES[rope])
    built = build_attention(hyper, spec, torch.float32, "local" if spec == "local" else "auto")
    want = softmax_scale(hyper)
    core_scale = getattr(built.module.core_attention, "softmax_scale", None)
    record(
        case="softmax_scale",
        spec=spec,
        rope=rope,
        want=want,
        layer=built.module.softmax_scale,
        core=core_scale,
    )
    assert built.module.softmax_scale == pytest.approx(want, rel=1e-12)
    if core_scale is not None:
        assert core_scale == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dims", sorted(DIMS))
@pytest.mark.parametrize("spec", SPECS)
def test_megatron_is_deepseek(spec, dims, buildable, record):
    """Megatron builds DeepSeek's layer: every reference parameter and nothing else.

    Upstream drift the adapter does not own is reported as xfail with the difference named.
    """
    from mla_build import build_attention  # pylint: disable=C0415

    _skip_unless_runnable(spec, torch.float32, buildable)
    built = build_attention(DIMS[dims], spec, torch.float32, "local" if spec == "local" else "auto")
    record(case="deepseek_structure", spec=spec, dims=dims, drift=built.notes)
    if built.notes:
        pytest.xfail("upstream structure drift: " + "; ".join(built.notes))


@pytest.mark.parametrize("spec", SPECS)
def test_megatron_thd_against_reference(spec, buildable, record):
    """THD (packed, with padded offsets) against the reference's block-causal packing."""
    from mla_build import (  # pylint: disable=C0415
        build_attention,
        have_adapter,
        packed_seq_params,
        reference_params,
        run_fwd_bwd,
    )

    # TE runs float32 only through its unfused attention, which TE >= 2.16 turns off for THD
    # with padding between sequences (the adapter says so at the first step): bf16 there.
    dtype = torch.bfloat16 if spec == "te" else torch.float32
    _skip_unless_runnable(spec, dtype, buildable)
    if not have_adapter():
        pytest.skip("THD through the adapter")
    lengths, padded = [1, 37, 70, 5], [8, 40, 72, 8]
    built = build_attention(V2_LITE, spec, dtype, "local" if spec == "local" else "auto")
    hyper = built.hyper
    x = make_input((sum(padded), hyper.hidden_size), device=buildable).to(dtype)
    grad_out = make_input((sum(padded), hyper.hidden_size), seed=2, device=buildable).to(dtype)
    real = packed_layout(lengths, padded, buildable)[2]
    grad_out = grad_out * real[:, None].to(dtype)
    packed = packed_seq_params(lengths, padded, dev=buildable)
    out, gx, grads, _ = run_fwd_bwd(built, x[:, None], grad_out[:, None], packed)
    params = reference_params(built)
    x_ref = x.detach().double().clone().requires_grad_(True)
    ref = reference_packed(params, x_ref, hyper, lengths, padded)
    ref.backward(grad_out.double())
    mask = real[:, None]
    diffs = {
        "out": max_rel(out[:, 0] * mask, ref),
        "grad_x": max_rel(gx[:, 0] * mask, x_ref.grad * mask),
    }
    diffs.update({f"grad:{k}": max_rel(grads[k], p.grad) for k, p in params.items()})
    tol_out, tol_grad = tolerance(dtype, tf32=_tf32(spec))
    record(
        case="oracle_thd",
        spec=spec,
        dims="v2lite",
        rope="yarn",
        dtype=str(dtype).replace("torch.", ""),
        notes=built.notes,
        max_rel_vs_reference=diffs,
    )
    assert diffs["out"] < tol_out and max(diffs.values()) < tol_grad, diffs


def test_tree_is_set():
    """Say so when the Megatron comparisons above were not collected against any tree."""
    if not TREE:
        pytest.skip("MLA_SEAM_MEGATRON_TREE unset: only the oracle self-tests ran")
