"""The single-GPU MLA matrix: spec x backend x layout x rope x dims x recompute, sampled.

What runs (54 cases, about 1-2 minutes on one H100/H200):

* FULL grid on DeepSeek-V2-Lite dims with YaRN (mscale 0.707 != mscale_all_dim 1.0), no
  recompute: spec {local, te} x backend {auto, fused, unfused, flash, local} x layout {bshd,
  thd (packed lengths [1, 37, 512, 1500]), thd-padded (cu_seqlens padded to [16, 48, 512, 1504])}
  = 30 cases;
* one axis at a time from there, on (local, local) and (te, auto), layouts bshd and thd:
  dims {dealiased (32 heads: hidden/heads 64 != v 128), qlora (q_lora_rank 1536)} = 8 cases;
  rope {plain RoPE, rotary_scaling_factor 40 and mscale_all_dim set} = 4 cases;
  recompute {core_attn, mla_up_proj}, also on (te, unfused) = 12 cases.

Each case that is expected to run checks, in the model dtype (bf16 on a GPU, fp32 on a CPU):
outputs and gradients (input and every parameter) against the float64 DeepSeek reference
(``oracles.py``, tolerance per dtype); THD equals per-sequence bshd (outputs, input gradients,
parameter gradients summed over the sequences); TE never falls through to NoBackend at the first
forward; with recompute, gradients equal those without recompute. A case expected NOT to run
(the brief's rules, written here, not read from the adapter: ``flash`` without a FlashAttention
build that runs MLA; ``local`` with the TE spec) must fail at build with the adapter's
``MLACompatibilityError`` naming ``--attention-backend``.

On a CPU (Megatron 0.19+) the local-spec rows run too; TE rows need a GPU and Transformer
Engine. ``MLA_SEAM_MATRIX_DTYPE`` (bf16|fp32)
overrides the dtype.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import pytest
import torch
from mla_build import (
    NO_CUDA,
    NO_TE,
    build_attention,
    flash_build_installed,
    have_adapter,
    have_te,
)
from oracles import DIMS, ROPES, make_input, max_rel, reference_mla, reference_packed, tolerance

LENGTHS = [1, 37, 512, 1500]
PADDED = [16, 48, 512, 1504]
BSHD = (1024, 2)  # seq, batch
SPECS = ("local", "te")
BACKENDS = ("auto", "fused", "unfused", "flash", "local")
LAYOUTS = ("bshd", "thd", "thd-padded")


def _cases() -> List[Tuple[str, str, str, str, str, str]]:
    cases = [
        (spec, backend, layout, "v2lite", "yarn", "none")
        for spec in SPECS
        for backend in BACKENDS
        for layout in LAYOUTS
    ]
    base = (("local", "local"), ("te", "auto"))
    for dims in ("dealiased", "qlora"):
        cases += [(s, b, lay, dims, "yarn", "none") for s, b in base for lay in ("bshd", "thd")]
    cases += [(s, b, lay, "v2lite", "rope", "none") for s, b in base for lay in ("bshd", "thd")]
    for recompute in ("core_attn", "mla_up_proj"):
        cases += [
            (s, b, lay, "v2lite", "yarn", recompute)
            for s, b in base + (("te", "unfused"),)
            for lay in ("bshd", "thd")
        ]
    return cases


CASES = _cases()
IDS = ["-".join(c) for c in CASES]


def _dtype(dev: str) -> torch.dtype:
    name = os.environ.get("MLA_SEAM_MATRIX_DTYPE") or ("bf16" if dev == "cuda" else "fp32")
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def expected_outcome(spec: str, backend: str) -> str:
    """``"run"`` or ``"build_error"``, from the brief's rules (not from the adapter).

    * TE spec + ``--attention-backend local``: every TE backend off -> error at build.
    * ``flash`` with no FlashAttention build here: TE would find no backend for q/k 192 vs
      v 128 -> error at build (decided before any layer exists, so the local spec gets it too
      where TE is importable).
    """
    if spec == "te" and backend == "local":
        return "build_error"
    if backend == "flash" and not flash_build_installed() and (spec == "te" or have_te()):
        return "build_error"
    return "run"


def expected_step_error(spec: str, backend: str, layout: str) -> bool:
    """TE (>= 2.16) turns unfused attention off for THD with padding between sequences: the
    adapter must refuse at the first step with its own error, not TE's NoBackend."""
    return spec == "te" and backend == "unfused" and layout == "thd-padded"


def _skip_unrunnable(spec: str, dev: str) -> None:
    if spec == "te":
        if dev != "cuda":
            pytest.skip(f"TE spec: {NO_CUDA}")
        if not have_te():
            pytest.skip(NO_TE)


def _layout_inputs(layout: str, hidden: int, dtype: torch.dtype, dev: str):
    """``(x, grad_out, packed, lengths, padded)``; x in Megatron layout."""
    from mla_build import packed_seq_params  # pylint: disable=C0415
    from oracles import packed_layout  # pylint: disable=C0415

    if layout == "bshd":
        seq, batch = BSHD
        x = make_input((seq, batch, hidden), device=dev).to(dtype)
        grad_out = make_input((seq, batch, hidden), seed=2, device=dev).to(dtype)
        return x, grad_out, None, None, None
    padded = PADDED if layout == "thd-padded" else None
    total = sum(padded or LENGTHS)
    x = make_input((total, 1, hidden), device=dev).to(dtype)
    real = packed_layout(LENGTHS, padded, dev)[2]
    grad_out = make_input((total, 1, hidden), seed=2, device=dev).to(dtype)
    grad_out = grad_out * real[:, None, None].to(dtype)
    return x, grad_out, packed_seq_params(LENGTHS, padded, dev=dev), LENGTHS, padded


def _reference(built, x, grad_out, lengths, padded):
    """Float64 reference output, input gradient and parameter gradients (Megatron layout)."""
    from mla_build import reference_params  # pylint: disable=C0415

    params = reference_params(built)
    xr = x.detach().double().clone().requires_grad_(True)
    if lengths is None:
        out = reference_mla(params, xr.transpose(0, 1), built.hyper).transpose(0, 1)
    else:
        out = reference_packed(params, xr[:, 0], built.hyper, lengths, padded)[:, None]
    out.backward(grad_out.double())
    return out.detach(), xr.grad, {k: p.grad for k, p in params.items()}


def _real_rows(t: torch.Tensor, lengths, padded) -> torch.Tensor:
    if lengths is None:
        return t
    rows, start = [], 0
    for n, p in zip(lengths, padded or lengths):
        rows.append(t[start : start + n])
        start += p
    return torch.cat(rows)


def _diffs(out, gx, grads, want_out, want_gx, want_grads, lengths, padded) -> Dict[str, float]:
    diffs = {
        "out": max_rel(_real_rows(out, lengths, padded), _real_rows(want_out, lengths, padded)),
        "grad_x": max_rel(_real_rows(gx, lengths, padded), _real_rows(want_gx, lengths, padded)),
    }
    diffs.update({f"grad:{k}": max_rel(grads[k], g) for k, g in want_grads.items()})
    return diffs


def _per_sequence(built, x, grad_out, lengths, padded):
    """Each packed sequence alone as bshd: outputs/input grads concatenated, param grads summed.

    cuDNN alone (``--attention-backend fused``) has no sbhd path for a single causal token; such a
    sequence has no bshd reference. Returns the lengths left out; param grads are then ``None``
    (they would include the left-out sequence on the THD side).
    """
    from mla_build import run_fwd_bwd  # pylint: disable=C0415

    outs, gxs, total, start, left_out = [], [], None, 0, []
    for n, p in zip(lengths, padded or lengths):
        try:
            out, gx, grads, _ = run_fwd_bwd(
                built, x[start : start + n], grad_out[start : start + n], packed=None
            )
        except Exception as exc:  # pylint: disable=broad-except
            if n != 1 or "attention backend" not in str(exc):
                raise
            left_out.append(n)
            outs.append(None)
            gxs.append(None)
            start += p
            continue
        outs.append(out)
        gxs.append(gx)
        grads = {k: g.double() for k, g in grads.items()}
        total = grads if total is None else {k: total[k] + grads[k] for k in total}
        start += p
    return outs, gxs, (None if left_out else total), left_out


def _kept_rows(t: torch.Tensor, lengths, padded, refs) -> torch.Tensor:
    """Real rows of ``t`` for the sequences that have a bshd reference."""
    rows, start = [], 0
    for n, p, ref in zip(lengths, padded or lengths, refs):
        if ref is not None:
            rows.append(t[start : start + n])
        start += p
    return torch.cat(rows)


def _run_case(built, hyper, spec, backend, layout, dtype, dev, rec, fields) -> Dict[str, bool]:
    """Run one buildable case; fills ``fields`` and returns the named checks."""
    from mla_build import run_fwd_bwd  # pylint: disable=C0415

    x, grad_out, packed, lengths, padded = _layout_inputs(layout, hyper.hidden_size, dtype, dev)
    out, gx, grads, ms = run_fwd_bwd(built, x, grad_out, packed)
    assert torch.isfinite(_real_rows(out, lengths, padded)).all(), "non-finite output"
    want_out, want_gx, want_grads = _reference(built, x, grad_out, lengths, padded)
    vs_ref = _diffs(out, gx, grads, want_out, want_gx, want_grads, lengths, padded)
    tol_out, tol_grad = tolerance(dtype, tf32=spec == "te", bf16_softmax=spec == "local")
    fields.update(ms=round(ms, 3), max_rel_vs_reference=vs_ref, tolerance=[tol_out, tol_grad])

    checks: Dict[str, bool] = {
        "reference_out": vs_ref["out"] < tol_out,
        "reference_grads": max(vs_ref.values()) < tol_grad,
    }
    if lengths is not None:
        seq_out, seq_gx, seq_grads, left_out = _per_sequence(built, x, grad_out, lengths, padded)
        thd = {
            "out": max_rel(
                _kept_rows(out, lengths, padded, seq_out),
                torch.cat([o for o in seq_out if o is not None]),
            ),
            "grad_x": max_rel(
                _kept_rows(gx, lengths, padded, seq_gx),
                torch.cat([g for g in seq_gx if g is not None]),
            ),
        }
        if seq_grads is not None:
            thd.update({f"grad:{k}": max_rel(grads[k], g) for k, g in seq_grads.items()})
        fields.update(thd_vs_bshd=thd, lengths_without_bshd_backend=left_out)
        checks["thd_equals_bshd"] = thd["out"] < tol_out and max(thd.values()) < tol_grad
    if rec is not None:
        plain = build_attention(hyper, spec, dtype, backend=backend, recompute=None)
        _, gx0, grads0, _ = run_fwd_bwd(plain, x, grad_out, packed)
        again = {
            "grad_x": max_rel(_real_rows(gx, lengths, padded), _real_rows(gx0, lengths, padded))
        }
        again.update({f"grad:{k}": max_rel(grads[k], g) for k, g in grads0.items()})
        bit_equal = torch.equal(gx, gx0) and all(torch.equal(grads[k], grads0[k]) for k in grads)
        fields.update(recompute_vs_none=again, recompute_bit_equal=bit_equal)
        checks["recompute_grads_equal"] = max(again.values()) < tol_grad / 4
    return checks


@pytest.mark.gpu
@pytest.mark.parametrize("spec,backend,layout,dims,rope,recompute", CASES, ids=IDS)
def test_matrix(spec, backend, layout, dims, rope, recompute, buildable, record):
    if not have_adapter():
        pytest.skip("the matrix runs on the patched tree")
    from megatron.core.transformer.mla_adapter import (  # pylint: disable=C0415
        MLACompatibilityError,
    )

    dev = buildable
    _skip_unrunnable(spec, dev)
    dtype = _dtype(dev)
    hyper = DIMS[dims].replace(rope=ROPES[rope])
    expected = expected_outcome(spec, backend)
    fields = dict(
        case="matrix",
        spec=spec,
        backend=backend,
        layout=layout,
        dims=dims,
        rope=rope,
        recompute=recompute,
        dtype=str(dtype).replace("torch.", ""),
        device=dev,
        expected=expected,
    )
    rec = None if recompute == "none" else recompute
    try:
        built = build_attention(hyper, spec, dtype, backend=backend, recompute=rec)
    except MLACompatibilityError as exc:
        record(outcome="build_error", message=str(exc), **fields)
        assert expected == "build_error", f"adapter refused a supported path: {exc}"
        assert "--attention-backend" in str(exc)
        return
    decision = built.decision
    fields.update(
        decided=getattr(decision, "backend", None), reason=getattr(decision, "reason", "")
    )
    fields.update(notes=built.notes)
    assert expected == "run", f"{spec}/{backend} built, but must fail at build: {fields}"
    if spec == "local":
        assert decision.backend == "local", fields
    else:
        assert decision.backend == backend, fields

    try:
        checks = _run_case(built, hyper, spec, backend, layout, dtype, dev, rec, fields)
    except MLACompatibilityError as exc:
        if not expected_step_error(spec, backend, layout):
            record(outcome="error", error=f"{type(exc).__name__}: {str(exc)[:500]}", **fields)
            raise
        record(outcome="step_error", message=str(exc), **fields)
        assert "--attention-backend unfused" in str(exc)
        return
    except Exception as exc:  # pylint: disable=broad-except
        record(outcome="error", error=f"{type(exc).__name__}: {str(exc)[:500]}", **fields)
        raise
    assert not expected_step_error(spec, backend, layout), f"must fail at the first step: {fields}"
    record(outcome="ran", checks=checks, **fields)
    failed = [name for name, ok in checks.items() if not ok]
    assert not failed, f"{failed}: {fields}"
