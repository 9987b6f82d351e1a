"""GPU smoke of the overlay: the patched tree builds and runs MLA on a real GPU with real TE.

Runs inside a patched Megatron tree (``MLA_SEAM_MEGATRON_TREE``, like ``tests/adapter``):
the suite's ``smoke`` phase (``mla-seam suite --only smoke``) runs it in each tree.
Without a CUDA device every test skips with that reason; without Transformer Engine the TE
cases skip and the local-spec cases still run.

What it proves, per release line:
* MLA builds with the local spec and with the TE spec; forward + backward run in bshd and THD;
* ``--attention-backend flash`` ends in the adapter's build-time error (or the fallback policy's
  switch), never in TE's "No dot product attention backend is available" at the first step;
* THD output equals per-sequence bshd output (bf16 tolerance; bit-equal for unfused attention).
Each case appends a record to ``MLA_SEAM_RESULTS`` (JSON lines) for the committed results.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path

import pytest
from mla_build import flash_build_installed, have_adapter
from mla_build import packed_seq_params as _packed
from mla_seam import deepseek

TREE = os.environ.get("MLA_SEAM_MEGATRON_TREE")
if TREE:
    sys.path.insert(0, str(Path(TREE).resolve()))

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not TREE, reason="needs MLA_SEAM_MEGATRON_TREE (a patched checkout)"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

try:
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except Exception:  # pylint: disable=broad-except
    HAVE_TE = False
needs_te = pytest.mark.skipif(not HAVE_TE, reason="needs Transformer Engine")


# Whether the tree carries the adapter (a vanilla tree runs the same cases as upstream).
HAVE_ADAPTER = bool(TREE) and have_adapter()


def _decision(config):
    """The adapter's backend decision for ``config`` (``None`` in a vanilla tree)."""
    return getattr(getattr(config, "_mla_seam", None), "backend", None)


LENGTHS = [1, 37, 512, 1500]
DIMS = dict(deepseek.V2_LITE, **deepseek.YARN)
HIDDEN = DIMS["hidden_size"]
NVTE = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


def _record(**fields) -> None:
    path = os.environ.get("MLA_SEAM_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(fields, sort_keys=True) + "\n")


@pytest.fixture(scope="module", autouse=True)
def distributed(megatron_env):
    """The session's parallel state (``megatron_env`` of conftest.py, made by whichever test
    asks first), with the model-parallel RNG seeded for this file."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)
    return megatron_env


def _config(backend: str):
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig(
        num_layers=1,
        params_dtype=torch.bfloat16,
        bf16=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        attention_backend=getattr(AttnBackend, backend),
        **DIMS,
    )


def _set_backend(config) -> None:
    """Run the patched ``LanguageModule._set_attention_backend`` (hook H3) for ``config``."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    for name in NVTE:
        os.environ.pop(name, None)
    LanguageModule._set_attention_backend(types.SimpleNamespace(config=config))
    if HAVE_TE:  # TE caches its backend choice per input shape, not per NVTE_* setting
        from transformer_engine.pytorch.attention.dot_product_attention import (
            dot_product_attention as te_dpa,
        )

        te_dpa._attention_backends["backend_selection_requires_update"] = True


def _layer(config, spec: str):
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.spec_utils import build_module

    make = (
        gpt_layer_specs.get_gpt_layer_local_spec
        if spec == "local"
        else gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
    )
    torch.manual_seed(0)
    layer_spec = make(multi_latent_attention=True)
    return build_module(layer_spec.submodules.self_attention, config=config, layer_number=1).cuda()


def _run(layer, x, **kwargs):
    x = x.detach().requires_grad_(True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out, _ = layer(x, None, **kwargs)
    out.float().square().sum().backward()  # a sum: per-token gradients don't depend on T
    torch.cuda.synchronize()
    return out.detach(), x.grad.detach(), (time.perf_counter() - start) * 1e3


NO_BACKEND = "No dot product attention backend"


def _per_sequence(layer, x, lengths, padded=None):
    """One bshd call per sequence; ``None`` where TE has no backend for that single sequence."""
    outs, grads, start = [], [], 0
    for n, p in zip(lengths, padded or lengths):
        try:
            out, grad, _ = _run(layer, x[start : start + n])
        except Exception as exc:  # pylint: disable=broad-except
            if NO_BACKEND not in str(exc) and "found no attention backend" not in str(exc):
                raise
            out = grad = None  # cuDNN-only (fused) has no sbhd path for some lengths, e.g. 1
        outs.append(out)
        grads.append(grad)
        start += p
    return outs, grads


def _max_rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


CASES = [("local", "local")] + [("te", b) for b in ("auto", "fused", "unfused")]


@pytest.mark.parametrize("spec,backend", CASES, ids=[f"{s}-{b}" for s, b in CASES])
@pytest.mark.parametrize("layout", ["bshd", "thd", "thd-padded", "thd-no-maxlen"])
def test_forward_backward_and_thd_equals_bshd(spec, backend, layout):
    if spec == "te" and not HAVE_TE:
        pytest.skip("needs Transformer Engine")
    config = _config(backend)
    _set_backend(config)
    layer = _layer(config, spec)
    decision = _decision(config)
    decided = decision.backend if decision else None
    torch.manual_seed(1)
    if layout == "bshd":
        x = torch.randn(1024, 2, HIDDEN, device="cuda", dtype=torch.bfloat16)
        out, grad, ms = _run(layer, x)
        assert out.shape == (1024, 2, HIDDEN) and torch.isfinite(grad).all()
        _record(
            case="fwd_bwd",
            spec=spec,
            backend=backend,
            layout=layout,
            ms=round(ms, 3),
            decided=decided,
            reason=decision.reason if decision else None,
        )
        return
    padded = [n + 7 for n in LENGTHS] if layout == "thd-padded" else None
    x = torch.randn(sum(padded or LENGTHS), 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    packed = _packed(LENGTHS, padded, with_max=layout != "thd-no-maxlen")
    if backend == "unfused" and padded and HAVE_ADAPTER:
        from megatron.core.transformer.mla_adapter import MLACompatibilityError

        # TE disables unfused attention for pad_between_seqs: the adapter must say so, not TE.
        # (A vanilla tree runs the case: whatever TE does there is upstream's behaviour.)
        with pytest.raises(MLACompatibilityError, match="--attention-backend unfused") as info:
            _run(layer, x, packed_seq_params=packed)
        _record(case="thd_padded_unfused_error", spec=spec, message=str(info.value))
        return
    out, grad, ms = _run(layer, x, packed_seq_params=packed)
    ref_out, ref_grad = _per_sequence(layer, x, LENGTHS, padded)
    diffs, start, no_ref = [], 0, []
    for n, p, ref_o, ref_g in zip(LENGTHS, padded or LENGTHS, ref_out, ref_grad):
        got_o, got_g = out[start : start + n], grad[start : start + n]
        if ref_o is None:
            no_ref.append(n)
        else:
            diffs.append((_max_rel(got_o, ref_o), _max_rel(got_g, ref_g)))
        start += p
    assert set(no_ref) <= {1}, f"no bshd reference for lengths {no_ref}"
    worst_out = max(d[0] for d in diffs)
    worst_grad = max(d[1] for d in diffs)
    _record(
        case="thd_vs_bshd",
        spec=spec,
        backend=backend,
        layout=layout,
        ms=round(ms, 3),
        decided=decided,
        max_rel_out=worst_out,
        max_rel_grad=worst_grad,
        lengths_without_bshd_backend=no_ref,
    )
    assert worst_out < 2e-2 and worst_grad < 5e-2


@needs_te
def test_flash_fails_at_build_with_the_adapter_error():
    """A flash request MLA cannot run fails at build, naming the flag, not at the first step.

    Behaviour, not API: a vanilla tree runs the same steps and fails this where it accepts the
    request and TE stops at the first step instead.
    """
    if flash_build_installed():
        pytest.skip("a FlashAttention build is installed here: flash is a supported MLA path")
    config = _config("flash")
    try:
        _set_backend(config)
        layer = _layer(config, "te")
    except Exception as exc:  # pylint: disable=broad-except
        message = f"{type(exc).__name__}: {exc}"
    else:
        x = torch.randn(512, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
        try:
            _run(layer, x)
        except Exception as exc:  # pylint: disable=broad-except
            pytest.fail(f"flash was accepted at build and failed at the first step: {exc}")
        pytest.fail("flash was accepted and ran without a FlashAttention build")
    assert "--attention-backend flash" in message and "192" in message and "128" in message
    _record(case="flash_build_error", message=message)


@needs_te
def test_flash_fallback_policy_runs(monkeypatch):
    if not HAVE_ADAPTER:
        pytest.skip("the fallback policy (MLA_SEAM_BACKEND_POLICY) is the adapter's own")
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.mla_adapter import POLICY_ENV

    monkeypatch.setenv(POLICY_ENV, "fallback")
    config = _config("flash")
    _set_backend(config)
    decision = _decision(config)
    assert decision.fallback and config.attention_backend != AttnBackend.flash
    layer = _layer(config, "te")
    x = torch.randn(512, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    out, _, ms = _run(layer, x, packed_seq_params=_packed([100, 412]))
    assert torch.isfinite(out).all()
    _record(case="flash_fallback", decided=decision.backend, reason=decision.reason, ms=ms)


@needs_te
def test_upstream_value_pad_is_off_where_upstream_pads():
    from megatron.core.transformer import multi_latent_attention as mla

    prepare = getattr(mla, "_prepare_mla_core_attention_value", None)
    if prepare is None:
        pytest.skip("this release does not pad V itself (no _prepare_mla_core_attention_value)")
    config = _config("fused")
    _set_backend(config)
    layer = _layer(config, "te")
    q = torch.zeros(8, 16, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.zeros(8, 16, 128, device="cuda", dtype=torch.bfloat16)
    value, need_pad, *_ = prepare(layer, q, v, _packed([8]))
    assert need_pad is False and value.shape[-1] == 128


@pytest.mark.parametrize("spec,backend", [("local", "local"), ("te", "unfused"), ("te", "fused")])
def test_core_attention_thd_against_per_sequence(spec, backend):
    """Same q/k/v through core attention: THD vs one call per sequence (unfused: bit-equal)."""
    if spec == "te" and not HAVE_TE:
        pytest.skip("needs Transformer Engine")
    from megatron.core.transformer.enums import AttnMaskType

    config = _config(backend)
    _set_backend(config)
    core = _layer(config, spec).core_attention
    torch.manual_seed(2)
    total = sum(LENGTHS)
    q = torch.randn(total, 16, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, 16, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(total, 16, 128, device="cuda", dtype=torch.bfloat16)
    thd = core(
        q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=_packed(LENGTHS)
    ).reshape(total, -1)
    start, equal, worst, no_ref = 0, True, 0.0, []
    for n in LENGTHS:
        chunk = [t[start : start + n].unsqueeze(1).clone() for t in (q, k, v)]
        try:
            ref = core(*chunk, None, attn_mask_type=AttnMaskType.causal).reshape(n, -1)
        except Exception as exc:  # pylint: disable=broad-except
            if n != 1 or not ("attention backend" in str(exc) or "memory layout" in str(exc)):
                raise
            no_ref.append(n)  # TE takes no sbhd call for a single token ([1, 1, h, d])
        else:
            equal = equal and torch.equal(thd[start : start + n], ref)
            worst = max(worst, _max_rel(thd[start : start + n], ref))
        start += n
    _record(
        case="core_thd_vs_bshd",
        spec=spec,
        backend=backend,
        bit_equal=equal,
        max_rel=worst,
        lengths_without_bshd_backend=no_ref,
    )
    if spec == "local":
        # One Megatron call per sequence on both sides: the same kernels on the same shapes.
        assert equal, "local core attention: THD must be bit-equal to per-sequence bshd"
    # TE unfused converts THD to one padded batch, so its GEMMs see other shapes than one
    # sequence alone: equal to bf16 rounding (1.1e-3 on H200 + TE 2.20.2), not bit for bit.
    assert worst < 2e-2
