# Copyright (c) 2026 mla-seam authors. Licensed under the Apache License, Version 2.0.

"""Multi-Latent Attention (MLA) adapter: every MLA compatibility decision in one place.

Megatron's generic attention code assumes that query, key and value heads have one width
(``kv_channels``), that RoPE covers the whole head, and that any attention backend can run any
layer. MLA breaks all three: q/k heads are ``qk_head_dim + qk_pos_emb_head_dim`` wide (192 for
DeepSeek-V2/V3), v heads ``v_head_dim`` (128), only the ``qk_pos_emb_head_dim`` slice carries
RoPE, and the softmax scale depends on YaRN's ``mscale_all_dim``.

This module answers four boundary questions and nothing else:

1. Layer metadata (:func:`layer_metadata`): k/v channels, the softmax scale by the DeepSeek /
   HuggingFace formula, and the ``kv_channels`` value other Megatron code reads.
2. Packed sequences (:func:`normalize_packed_seq`, :func:`upstream_value_pad`): THD parameters
   normalized for the RoPE slice, and V padded only when the selected kernel needs equal head
   dims.
3. Backend (:func:`resolve_attention_backend`): is ``--attention-backend`` a supported MLA path
   on this Transformer Engine / GPU? Decided at model build, with a reason, or an
   :class:`MLACompatibilityError` that names the restriction and the flag.
4. Pipeline offsets (:func:`layer_offset`, :func:`per_layer_value`): layer numbering and
   per-layer lists normalized before pipeline and recompute accounting.

Megatron calls in through one-line hooks (the mla-seam patch series):

* H1 ``MultiLatentAttention.__init__``: ``core_attention_spec(self, submodules.core_attention)``
* H2 ``MLASelfAttention.get_query_key_value_tensors``: ``normalize_packed_seq(...)``
* H3 ``LanguageModule._set_attention_backend``: ``resolve_attention_backend(self.config)``
* H4 ``MLATransformerConfig.__post_init__``: ``check_config(self)``
* H5 (release lines that pad V themselves) ``upstream_value_pad(...)``
* H6 (release lines that index per-layer lists off by one) ``per_layer_value(...)``
* H7 (release lines whose uneven-PP + VPP layer offset miscounts) ``pipeline_layer_offset(...)``

Each hook imports this module where it calls it (``from megatron.core.transformer import
mla_adapter`` inside the function), so a hook's hunk never touches an import block that
upstream reorders from release to release.

Upstream features are detected by inspection (signatures, attributes), never by version.
"""

import copy
import dataclasses
import functools
import inspect
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
from megatron.core.transformer.enums import AttnBackend, AttnMaskType

logger = logging.getLogger(__name__)

#: Environment variable choosing what happens when the requested backend cannot run MLA:
#: ``strict`` (default) raises at model build, ``fallback`` switches to the fastest supported
#: backend and logs a warning.
POLICY_ENV = "MLA_SEAM_BACKEND_POLICY"

_BACKEND_FLAG = "--attention-backend"
_MARK = "_mla_seam"


class MLACompatibilityError(ValueError):
    """A configuration Megatron accepts but MLA cannot run; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Question 1: layer metadata
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MLAMetadata:
    """Head widths and softmax scale of one MLA layer.

    Attributes:
        k_channels: Width of a query/key head (``qk_head_dim + qk_pos_emb_head_dim``).
        v_channels: Width of a value head (``v_head_dim``).
        kv_channels: The value ``config.kv_channels`` should hold for code that reads one width.
        softmax_scale: Scale applied to ``q @ k^T`` before the softmax.
        scale_source: How ``softmax_scale`` was obtained, for the build log.
    """

    k_channels: int
    v_channels: int
    kv_channels: int
    softmax_scale: float
    scale_source: str


def yarn_mscale(scaling_factor: float, mscale: float) -> float:
    """YaRN's attention temperature factor, as defined in the DeepSeek-V2 reference.

    Args:
        scaling_factor: RoPE context extension factor (``rotary_scaling_factor``).
        mscale: The coefficient (``mscale`` or ``mscale_all_dim``).

    Returns:
        ``0.1 * mscale * ln(scaling_factor) + 1`` for factors above 1, else 1.
    """
    if scaling_factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scaling_factor) + 1.0


def softmax_scale(config: Any) -> Tuple[float, str]:
    """The MLA softmax scale and where it came from.

    An explicit ``config.softmax_scale`` wins (Megatron's MLA ignores it upstream). Otherwise
    ``1/sqrt(k_channels)``, multiplied by ``yarn_mscale(factor, mscale_all_dim)^2`` for YaRN
    RoPE only, as the DeepSeek / HuggingFace definition does; plain RoPE gets no YaRN factor.

    Args:
        config: An ``MLATransformerConfig``.

    Returns:
        ``(scale, source)``.
    """
    explicit = getattr(config, "softmax_scale", None)
    if explicit is not None:
        return float(explicit), "config.softmax_scale"
    k_channels = config.qk_head_dim + config.qk_pos_emb_head_dim
    scale = 1.0 / math.sqrt(k_channels)
    mscale_all_dim = getattr(config, "mscale_all_dim", 0.0) or 0.0
    if config.rope_type == "yarn" and mscale_all_dim:
        factor = yarn_mscale(config.rotary_scaling_factor, mscale_all_dim)
        return scale * factor * factor, (
            f"yarn mscale_all_dim={mscale_all_dim:g} factor={config.rotary_scaling_factor:g}"
        )
    return scale, f"1/sqrt({k_channels})"


def layer_metadata(config: Any) -> MLAMetadata:
    """Answer question 1 for ``config``.

    Args:
        config: An ``MLATransformerConfig``.

    Returns:
        The layer's :class:`MLAMetadata`.
    """
    scale, source = softmax_scale(config)
    return MLAMetadata(
        k_channels=config.qk_head_dim + config.qk_pos_emb_head_dim,
        v_channels=config.v_head_dim,
        kv_channels=config.v_head_dim,
        softmax_scale=scale,
        scale_source=source,
    )


def check_config(config: Any) -> None:
    """Hook H4: validate MLA fields after ``MLATransformerConfig.__post_init__``.

    ``kv_channels`` defaults to ``hidden_size // num_attention_heads``, which for MLA is not a
    head width at all (64 for 32 heads of 2048, while v heads are 128). When it still holds that
    default, it is set to ``v_head_dim``: the width the attention output, the local core
    attention and KV-cache sizing need.

    Args:
        config: The config being initialized.

    Raises:
        MLACompatibilityError: A head width is not positive or the RoPE type is unknown.
    """
    if not getattr(config, "multi_latent_attention", False):
        return
    for field in ("qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "kv_lora_rank"):
        value = getattr(config, field)
        if not isinstance(value, int) or value <= 0:
            raise MLACompatibilityError(
                f"MLA needs a positive integer {field}, got {value!r}; set --{_flag(field)}."
            )
    if config.rope_type not in ("rope", "yarn"):
        raise MLACompatibilityError(
            f"MLA rope_type must be 'rope' or 'yarn', got {config.rope_type!r} (--rope-type)."
        )
    default_kv = config.hidden_size // config.num_attention_heads
    if config.kv_channels == default_kv and default_kv != config.v_head_dim:
        logger.info(
            "mla-seam: kv_channels %d is hidden/heads, not an MLA head width; using v_head_dim %d",
            default_kv,
            config.v_head_dim,
        )
        config.kv_channels = config.v_head_dim
    if config.rope_type == "yarn" and config.mscale != config.mscale_all_dim:
        logger.info(
            "mla-seam: YaRN mscale=%g differs from mscale_all_dim=%g; the softmax scale uses "
            "mscale_all_dim (DeepSeek definition), RoPE cos/sin use their ratio",
            config.mscale,
            config.mscale_all_dim,
        )


def _flag(field: str) -> str:
    return field.replace("_", "-")


# ---------------------------------------------------------------------------------------------
# Question 2: packed (THD) sequences
# ---------------------------------------------------------------------------------------------


def normalize_packed_seq(
    attention: Any, packed_seq_params: Any, hidden_states: Optional[torch.Tensor]
) -> Optional[Any]:
    """Hook H2: the packed-sequence parameters MLA's QKV/RoPE code may rely on.

    Non-THD packed parameters carry nothing for RoPE or the QKV shapes (upstream squeezes
    dim 1 for any packed parameters and sizes RoPE from ``max_seqlen``), so they become
    ``None`` here; the caller still hands the original object to core attention. THD
    parameters are completed in place once per object (later layers reuse the work): a
    missing kv side mirrors the q side, missing ``max_seqlen_*`` come from the (padded)
    ``cu_seqlens``, and the offsets are checked.

    Tokens of a padded THD batch sit at the padded offsets, so RoPE must split them there.
    Release lines that hand RoPE the unpadded ``cu_seqlens_q``/``kv`` (0.13.x) would rotate
    every sequence after the first one at the wrong positions; when padded offsets differ from
    the actual ones, the QKV/RoPE code therefore gets a copy whose ``cu_seqlens_*`` ARE the
    padded offsets (lines that already prefer the padded ones compute the same thing).

    Args:
        attention: The MLA module (for its config).
        packed_seq_params: ``PackedSeqParams`` or ``None``.
        hidden_states: The layer input, ``[tokens, 1, hidden]`` for THD.

    Returns:
        The parameters to use for QKV and RoPE, or ``None``.

    Raises:
        MLACompatibilityError: The cu_seqlens are malformed.
    """
    if packed_seq_params is None or getattr(packed_seq_params, "qkv_format", None) != "thd":
        return None
    if not getattr(packed_seq_params, _MARK, False):
        _complete_thd(packed_seq_params)
        _check_thd(attention.config, packed_seq_params, hidden_states)
        _check_thd_backend(attention.config, packed_seq_params)
        setattr(packed_seq_params, _MARK, True)
        setattr(packed_seq_params, f"{_MARK}_rope", _rope_view(packed_seq_params))
    return getattr(packed_seq_params, f"{_MARK}_rope", None) or packed_seq_params


def _rope_view(params: Any) -> Optional[Any]:
    """A copy of THD ``params`` with the padded offsets as ``cu_seqlens_*``, or ``None``.

    ``None`` when no side is padded differently from its actual offsets (nothing to fix).
    """
    changes = {}
    for side in ("q", "kv"):
        padded = getattr(params, f"cu_seqlens_{side}_padded", None)
        actual = getattr(params, f"cu_seqlens_{side}")
        if padded is not None and padded is not actual and not torch.equal(padded, actual):
            changes[f"cu_seqlens_{side}"] = padded
    if not changes:
        return None
    view = copy.copy(params)  # a shallow copy: no __post_init__ recomputation
    for name, value in changes.items():
        setattr(view, name, value)
    setattr(view, f"{_MARK}_rope", None)
    return view


def _complete_thd(params: Any) -> None:
    if params.cu_seqlens_q is None:
        raise MLACompatibilityError(
            "PackedSeqParams(qkv_format='thd') without cu_seqlens_q: build it from the "
            "per-sequence lengths (cumulative sum starting at 0, int32)."
        )
    if params.cu_seqlens_kv is None:
        params.cu_seqlens_kv = params.cu_seqlens_q
    if getattr(params, "cu_seqlens_kv_padded", None) is None:
        params.cu_seqlens_kv_padded = getattr(params, "cu_seqlens_q_padded", None)
    for side in ("q", "kv"):
        if getattr(params, f"max_seqlen_{side}") is None:
            offsets = _effective_cu_seqlens(params, side)
            lengths = offsets[1:] - offsets[:-1]
            longest = int(lengths.max().item()) if lengths.numel() else 0
            setattr(params, f"max_seqlen_{side}", longest)


def _effective_cu_seqlens(params: Any, side: str) -> torch.Tensor:
    padded = getattr(params, f"cu_seqlens_{side}_padded", None)
    return padded if padded is not None else getattr(params, f"cu_seqlens_{side}")


def _check_thd(config: Any, params: Any, hidden_states: torch.Tensor) -> None:
    actual = params.cu_seqlens_q.tolist()
    padded = _effective_cu_seqlens(params, "q").tolist()
    if not actual or actual[0] != 0 or any(b < a for a, b in zip(actual, actual[1:])):
        raise MLACompatibilityError(
            f"cu_seqlens_q must start at 0 and never decrease, got {actual[:8]}..."
        )
    if len(padded) != len(actual) or any(
        (p1 - p0) < (a1 - a0) for p0, p1, a0, a1 in zip(padded, padded[1:], actual, actual[1:])
    ):
        raise MLACompatibilityError(
            "cu_seqlens_q_padded must have one entry per cu_seqlens_q entry and every padded "
            "sequence must be at least as long as the sequence itself."
        )
    splits_tokens = config.context_parallel_size > 1 or config.sequence_parallel
    if not splits_tokens and hidden_states is not None and padded[-1] != hidden_states.size(0):
        raise MLACompatibilityError(
            f"THD input has {hidden_states.size(0)} tokens but the packed offsets end at "
            f"{padded[-1]}; pass cu_seqlens_q_padded when sequences are padded."
        )


def _check_thd_backend(config: Any, params: Any) -> None:
    decision = getattr(config, f"{_MARK}_backend", None)
    padded = getattr(params, "cu_seqlens_q_padded", None)
    if decision is None or decision.backend != "unfused" or padded is None:
        return
    if torch.equal(padded, params.cu_seqlens_q) or not _te_unfused_rejects_padded_thd():
        return
    raise MLACompatibilityError(
        f"{_BACKEND_FLAG} unfused cannot run THD batches with padding between sequences "
        "(cu_seqlens_q_padded != cu_seqlens_q): this Transformer Engine disables its unfused "
        f"attention for pad_between_seqs. Use {_BACKEND_FLAG} fused or auto, or pack without "
        "padding."
    )


@functools.lru_cache(maxsize=None)
def _te_unfused_rejects_padded_thd() -> bool:
    """Whether TE's backend selection turns unfused attention off for padded THD batches."""
    try:
        # pylint: disable=import-outside-toplevel
        from transformer_engine.pytorch.attention.dot_product_attention import utils as te_utils

        source = inspect.getsource(te_utils.get_attention_backend)
    except Exception:  # pylint: disable=broad-except
        return False
    return "Disabling UnfusedDotProductAttention for pad_between_seqs" in source


def upstream_value_pad(attention: Any, need_v_pad: bool) -> bool:
    """Hook H5: keep upstream's own V padding off; the adapter pads only where needed.

    Release lines from 0.18 pad V to the q/k width for every THD call, which only FlashAttention
    -2 needs and which costs time on cuDNN (fused) and unfused attention. The adapter's core
    attention pads for the backends that need it (see :class:`BackendDecision`).

    Args:
        attention: The MLA module.
        need_v_pad: Upstream's own verdict.

    Returns:
        Always ``False`` when the core attention was built through the adapter.
    """
    if getattr(attention.core_attention, "_mla_pad_value", None) is None:
        return need_v_pad
    return False


# ---------------------------------------------------------------------------------------------
# Question 3: attention backend
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackendFacts:
    """What the backend decision depends on, probed once per process.

    Attributes:
        te_version: Transformer Engine version string, or ``None`` when TE is not importable.
        compute_capability: ``(major, minor)`` of the current CUDA device, or ``None``.
        flash_attn_2: Whether a FlashAttention-2 build (``flash_attn``) is importable.
        flash_attn_3: Whether a FlashAttention-3 build (``flash_attn_interface``) is importable.
        cudnn_version: cuDNN version as an integer (90500 for 9.5.0), or ``None`` when unknown.
        te_pads_for_flash: Whether TE itself pads q/k/v to one head width for FlashAttention-2.
        k_channels: q/k head width.
        v_channels: v head width.
        context_parallel: Context-parallel size.
        spec: ``"te"``, ``"local"`` or ``"other"``: which core attention the layer spec builds.
    """

    te_version: Optional[str]
    compute_capability: Optional[Tuple[int, int]]
    flash_attn_2: bool
    flash_attn_3: bool
    k_channels: int
    v_channels: int
    context_parallel: int = 1
    spec: str = "te"
    cudnn_version: Optional[int] = None
    te_pads_for_flash: bool = False


@dataclasses.dataclass(frozen=True)
class BackendDecision:
    """The attention path an MLA layer will take, and why.

    Attributes:
        requested: The ``--attention-backend`` value asked for.
        backend: What runs: ``fused``, ``unfused``, ``flash``, ``auto`` or ``local``.
        reason: One sentence for the build log.
        pad_value: Whether V is padded to the q/k width (kernels needing equal head dims only).
        fallback: Whether ``backend`` replaced an unsupported request.
    """

    requested: str
    backend: str
    reason: str
    pad_value: bool = False
    fallback: bool = False
    spec: str = "te"


#: Training with q/k 192 and v 128 through cuDNN: Hopper from cuDNN 9.5, Blackwell from 9.11.
#: Older GPUs run those dims forward only, so training there has no fused path.
_FUSED_MLA_MIN_CUDNN = {9: 90500, 10: 91100}


def _fused_supports_mla(facts: BackendFacts) -> bool:
    cc = facts.compute_capability
    if cc is None or cc[0] < 9:
        return False
    needed = _FUSED_MLA_MIN_CUDNN.get(cc[0], _FUSED_MLA_MIN_CUDNN[10])
    return facts.cudnn_version is None or facts.cudnn_version >= needed


def _flash_path(facts: BackendFacts) -> Optional[Tuple[bool, str]]:
    """``(pad_value, reason)`` when some FlashAttention build can run MLA here, else ``None``."""
    cc = facts.compute_capability
    if facts.flash_attn_3 and cc is not None and cc[0] == 9:
        return False, "FlashAttention-3 runs q/k 192 with v 128 on sm90"
    if facts.flash_attn_2 and cc is not None and cc >= (8, 0):
        if facts.te_pads_for_flash:
            return False, "FlashAttention-2 with TE padding q/k/v to one head width itself"
        return True, (
            f"FlashAttention-2 needs equal head dims: V padded {facts.v_channels}->"
            f"{facts.k_channels}, output trimmed"
        )
    return None


def _unsupported(requested: str, facts: BackendFacts, restriction: str, choices: str) -> str:
    return (
        f"{_BACKEND_FLAG} {requested} cannot run Multi-Latent Attention here: {restriction} "
        f"(MLA head dims: q/k {facts.k_channels} vs v {facts.v_channels}; TE "
        f"{facts.te_version or 'not installed'}; GPU "
        f"{'sm%d%d' % facts.compute_capability if facts.compute_capability else 'none visible'})."
        f" Use {choices}, or set {POLICY_ENV}=fallback to switch to the fastest supported "
        f"backend automatically."
    )


def _decide_local_spec(requested: str, facts: BackendFacts) -> BackendDecision:
    if facts.context_parallel > 1:
        raise MLACompatibilityError(
            "The local layer spec (Megatron's DotProductAttention) does not support context "
            "parallelism; use the Transformer Engine spec (--transformer-impl "
            "transformer_engine) or --context-parallel-size 1."
        )
    note = "" if requested in ("local", "auto") else f"; {_BACKEND_FLAG} {requested} is ignored"
    return BackendDecision(requested, "local", f"local spec: Megatron DotProductAttention{note}")


def _decide_te(requested: str, facts: BackendFacts) -> BackendDecision:
    fused_ok = _fused_supports_mla(facts)
    flash = _flash_path(facts)
    if requested == "local":
        raise MLACompatibilityError(
            f"{_BACKEND_FLAG} local turns every Transformer Engine backend off, but the layer "
            "spec builds TEDotProductAttention: TE would find no backend at the first step. "
            "Use --transformer-impl local for Megatron's own attention, or "
            f"{_BACKEND_FLAG} fused|unfused|auto."
        )
    if requested == "unfused":
        return BackendDecision(requested, "unfused", "TE unfused attention runs any head dims")
    if requested == "fused":
        if fused_ok or facts.compute_capability is None:
            why = "cuDNN fused attention runs q/k != v head dims on sm90+"
            if facts.compute_capability is None:
                why = "no CUDA device visible at build; TE checks cuDNN support at first step"
            return BackendDecision(requested, "fused", why)
        raise _Unsupported(
            "cuDNN fused attention trains q/k != v head dims only on sm90 (cuDNN >= 9.5) and "
            f"sm100+ (cuDNN >= 9.11); cuDNN here: {facts.cudnn_version or 'unknown'}"
        )
    if requested == "flash":
        if flash is not None:
            return BackendDecision(requested, "flash", flash[1], pad_value=flash[0])
        raise _Unsupported(
            "no FlashAttention build here runs MLA head dims (FlashAttention-3 on sm90: "
            f"{_installed(facts.flash_attn_3)}; FlashAttention-2 with V padded on sm80+: "
            f"{_installed(facts.flash_attn_2)})"
        )
    return _decide_auto(facts, fused_ok, flash)


def _installed(flag: bool) -> str:
    return "installed" if flag else "not installed"


def _decide_auto(
    facts: BackendFacts, fused_ok: bool, flash: Optional[Tuple[bool, str]]
) -> BackendDecision:
    if fused_ok or facts.compute_capability is None:
        return BackendDecision("auto", "auto", "TE picks per call; cuDNN fused runs MLA dims")
    if flash is not None:
        return BackendDecision("auto", "auto", f"TE picks per call; {flash[1]}", flash[0])
    return BackendDecision("auto", "auto", "TE picks per call; only unfused runs MLA dims here")


class _Unsupported(Exception):
    """Internal: the requested backend cannot run; carries the restriction text."""


def decide_backend(requested: str, facts: BackendFacts, policy: str = "strict") -> BackendDecision:
    """Question 3 as a pure function of the probed facts.

    Args:
        requested: ``flash``, ``fused``, ``unfused``, ``local`` or ``auto``.
        facts: What the decision depends on.
        policy: ``strict`` raises for an unsupported request; ``fallback`` picks the fastest
            supported backend instead (fused, then FlashAttention, then unfused).

    Returns:
        The decision.

    Raises:
        MLACompatibilityError: The request cannot run MLA (under ``strict``), or the spec and
            the request contradict each other.
    """
    if facts.spec == "local":
        return _decide_local_spec(requested, facts)
    if facts.spec == "te" and facts.te_version is None:
        raise MLACompatibilityError(
            "The layer spec builds TEDotProductAttention but Transformer Engine is not "
            "importable; install transformer-engine or use --transformer-impl local."
        )
    try:
        return _decide_te(requested, facts)
    except _Unsupported as exc:
        choices = _working_choices(facts)
        if policy != "fallback":
            raise MLACompatibilityError(_unsupported(requested, facts, str(exc), choices)) from None
        chosen = _fastest_supported(facts)
        return dataclasses.replace(
            chosen,
            requested=requested,
            fallback=True,
            reason=f"fallback from {requested} ({exc}): {chosen.reason}",
        )


def _working_choices(facts: BackendFacts) -> str:
    names = [f"{_BACKEND_FLAG} fused"] if _fused_supports_mla(facts) else []
    if _flash_path(facts) is not None:
        names.append(f"{_BACKEND_FLAG} flash")
    names += [f"{_BACKEND_FLAG} auto", f"{_BACKEND_FLAG} unfused"]
    return " or ".join(names)


def _fastest_supported(facts: BackendFacts) -> BackendDecision:
    for candidate in ("fused", "flash", "unfused"):
        try:
            return _decide_te(candidate, facts)
        except _Unsupported:
            continue
    raise AssertionError("unfused attention always runs")  # pragma: no cover


def probe_facts(config: Any, spec: str) -> BackendFacts:
    """Probe this process for :class:`BackendFacts` (TE, GPU, FlashAttention builds).

    Args:
        config: An ``MLATransformerConfig``.
        spec: ``"te"``, ``"local"`` or ``"other"``.

    Returns:
        The facts.
    """
    meta = layer_metadata(config)
    return BackendFacts(
        te_version=_te_version(),
        compute_capability=_compute_capability(),
        flash_attn_2=_importable("flash_attn"),
        flash_attn_3=_importable("flash_attn_interface") or _importable("flash_attn_3"),
        k_channels=meta.k_channels,
        v_channels=meta.v_channels,
        context_parallel=getattr(config, "context_parallel_size", 1) or 1,
        spec=spec,
        cudnn_version=_cudnn_version(),
        te_pads_for_flash=_te_pads_for_flash(),
    )


def _te_version() -> Optional[str]:
    try:
        import transformer_engine  # pylint: disable=import-outside-toplevel
    except Exception:  # pylint: disable=broad-except
        return None
    return str(getattr(transformer_engine, "__version__", "unknown"))


def _cudnn_version() -> Optional[int]:
    if not torch.cuda.is_available():
        return None
    return torch.backends.cudnn.version()


def _te_pads_for_flash() -> bool:
    """Whether TE's DotProductAttention pads q/k/v itself for FlashAttention-2 MLA."""
    try:
        from transformer_engine.pytorch.attention.dot_product_attention import (  # noqa: C0415
            dot_product_attention as te_dpa,
        )
    except Exception:  # pylint: disable=broad-except
        return False
    return hasattr(te_dpa, "_pad_qkv_head_dim")


def _compute_capability() -> Optional[Tuple[int, int]]:
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def _importable(module: str) -> bool:
    import importlib.util  # pylint: disable=import-outside-toplevel

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_attention_backend(config: Any, spec: Optional[str] = None) -> Optional[BackendDecision]:
    """Hook H3 (and H1): decide the MLA attention path before Megatron sets NVTE_* variables.

    Called from ``LanguageModule._set_attention_backend`` (spec unknown: inferred from the
    request) and again when MLA builds its core attention (spec known). Under the fallback
    policy ``config.attention_backend`` is rewritten, so Megatron exports the NVTE_* flags of
    the backend that will actually run.

    Args:
        config: The model config (non-MLA configs are left alone).
        spec: ``"te"``, ``"local"`` or ``"other"`` when known.

    Returns:
        The decision, or ``None`` for a non-MLA config.
    """
    if not getattr(config, "multi_latent_attention", False):
        return None
    requested = _backend_name(config.attention_backend)
    if spec is None:
        # Called before any layer exists: only "local" names its spec; otherwise assume the
        # TE spec where TE is importable and leave the rest to the core-attention hook (H1).
        spec = "local" if requested == "local" else ("te" if _te_version() else "other")
    if spec == "other":
        return None
    known = getattr(config, f"{_MARK}_backend", None)
    if known is not None and known.spec == spec and known.backend == requested:
        return known
    policy = os.environ.get(POLICY_ENV, "strict").strip().lower()
    decision = dataclasses.replace(
        decide_backend(requested, probe_facts(config, spec), policy), spec=spec
    )
    if decision.fallback:
        logger.warning("mla-seam: %s", decision.reason)
        config.attention_backend = getattr(AttnBackend, decision.backend)
    setattr(config, f"{_MARK}_backend", decision)
    return decision


def _backend_name(value: Any) -> str:
    return value.name if isinstance(value, AttnBackend) else str(value).split(".")[-1]


# ---------------------------------------------------------------------------------------------
# Question 4: pipeline offsets and per-layer lists
# ---------------------------------------------------------------------------------------------


def _stage_layer_counts(config: Any) -> List[int]:
    """Layers in one virtual chunk of each pipeline rank (same for every virtual stage)."""
    pp = config.pipeline_model_parallel_size
    vp = config.virtual_pipeline_model_parallel_size or 1
    first = config.num_layers_in_first_pipeline_stage
    last = config.num_layers_in_last_pipeline_stage
    if first is None and last is None:
        total = config.num_layers
        total += int(bool(getattr(config, "account_for_embedding_in_pipeline_split", False)))
        total += int(bool(getattr(config, "account_for_loss_in_pipeline_split", False)))
        return [total // pp // vp] * pp
    middle_ranks = pp - (first is not None) - (last is not None)
    middle_layers = config.num_layers - (first or 0) - (last or 0)
    per_middle = (middle_layers // vp) // middle_ranks if middle_ranks > 0 else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first // vp
    if last is not None:
        counts[-1] = last // vp
    return counts


def layer_offset(config: Any, vp_stage: Optional[int], pp_rank: int) -> int:
    """Global index of the first layer held by ``(pp_rank, vp_stage)``.

    Layers are laid out chunk by chunk: virtual stage 0 of ranks 0..pp-1, then virtual stage 1,
    and so on, each rank's chunk holding the counts of :func:`_stage_layer_counts`. A virtual
    embedding layer (``account_for_embedding_in_pipeline_split``) occupies the first slot.

    Args:
        config: The model config.
        vp_stage: Virtual pipeline stage (``None`` without interleaving).
        pp_rank: Pipeline rank.

    Returns:
        The offset to add to a 1-based local layer number.
    """
    if config.pipeline_model_parallel_size <= 1:
        return 0
    layout = getattr(config, "pipeline_model_parallel_layout", None)
    if layout:
        from megatron.core.transformer.enums import LayerType  # pylint: disable=C0415

        return layout.get_layer_offset(layer_type=LayerType.decoder, vp_stage=vp_stage)
    vp = config.virtual_pipeline_model_parallel_size
    if vp is not None and vp_stage is None:
        raise MLACompatibilityError("vp_stage is required when virtual pipelining is on")
    counts = _stage_layer_counts(config)
    stage = vp_stage or 0
    offset = stage * sum(counts) + sum(counts[:pp_rank])
    embedding = getattr(config, "account_for_embedding_in_pipeline_split", False)
    if embedding and config.num_layers_in_first_pipeline_stage is None:
        if config.num_layers_in_last_pipeline_stage is None and (stage, pp_rank) != (0, 0):
            offset -= 1
    return offset


def pipeline_layer_offset(
    config: Any, vp_stage: Optional[int], pp_rank: int, upstream_offset: int
) -> int:
    """Hook H7: the layer offset of a pipeline stage, where upstream's own count is wrong.

    Upstream's ``get_transformer_layer_offset`` returns through this hook on release lines
    whose uneven-PP + VPP branch counts the middle stages from rank 1 even when the first
    stage is not customized (0.13.x): layers overlap or go missing, and with them the
    checkpoint's layer numbering. For MLA models without a pipeline layout the offset is
    :func:`layer_offset`'s; every other model keeps upstream's value. Encoder-decoder
    pipelines (a decoder start rank) are left to upstream.

    Args:
        config: The model config.
        vp_stage: Virtual pipeline stage (``None`` without interleaving).
        pp_rank: The pipeline rank upstream computed the offset for.
        upstream_offset: Upstream's offset.

    Returns:
        The offset to add to a 1-based local layer number.
    """
    if not getattr(config, "multi_latent_attention", False):
        return upstream_offset
    if getattr(config, "pipeline_model_parallel_layout", None) or _decoder_start() is not None:
        return upstream_offset
    ours = layer_offset(config, vp_stage, pp_rank)
    if ours != upstream_offset and not getattr(config, f"{_MARK}_offset_logged", False):
        logger.warning(
            "mla-seam: layer offset of pipeline rank %d, virtual stage %s is %d (upstream "
            "computed %d: uneven pipeline split with virtual stages miscounted)",
            pp_rank,
            vp_stage,
            ours,
            upstream_offset,
        )
        setattr(config, f"{_MARK}_offset_logged", True)
    return ours


def _decoder_start() -> Optional[int]:
    """The pipeline rank where an encoder-decoder model's decoder starts (``None``: no split)."""
    from megatron.core import parallel_state  # pylint: disable=import-outside-toplevel

    getter = getattr(parallel_state, "get_pipeline_model_parallel_decoder_start", None)
    if getter is None:
        return None
    try:
        return getter()
    except (AssertionError, RuntimeError, AttributeError):
        return None


def per_layer_value(values: Any, layer_number: int) -> Any:
    """Hook H6: the entry of a per-layer setting (e.g. ``cp_comm_type``) for a layer.

    Args:
        values: One value for all layers, or a list with one entry per layer.
        layer_number: Megatron's 1-based global layer number.

    Returns:
        The value for that layer.

    Raises:
        MLACompatibilityError: The list does not cover the layer.
    """
    if not isinstance(values, (list, tuple)):
        return values
    if not 1 <= layer_number <= len(values):
        raise MLACompatibilityError(
            f"per-layer list has {len(values)} entries but layer {layer_number} (1-based) was "
            "asked for; give one entry per layer (--num-layers)."
        )
    return values[layer_number - 1]


# ---------------------------------------------------------------------------------------------
# Hook H1: the core attention built by MLA
# ---------------------------------------------------------------------------------------------


class _LocalCoreAttention:
    """Mixin over Megatron's ``DotProductAttention`` for MLA.

    Accepts ``k_channels``/``v_channels`` (passing them on only where upstream accepts them),
    sizes the output from ``v_channels`` instead of ``config.kv_channels``, and runs THD packed
    sequences one sequence at a time.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        k_channels = kwargs.pop("k_channels", None)
        v_channels = kwargs.pop("v_channels", None)
        accepted = inspect.signature(super().__init__).parameters
        for name, value in (("k_channels", k_channels), ("v_channels", v_channels)):
            if name in accepted or _has_var_kw(accepted):
                kwargs[name] = value
        super().__init__(*args, **kwargs)
        self._mla_pad_value = False
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    def forward(self, query, key, value, attention_mask, *args: Any, **kwargs: Any):
        """Run attention; THD packed input is split into its sequences."""
        packed = kwargs.pop("packed_seq_params", None)
        if packed is None or getattr(packed, "qkv_format", None) != "thd":
            return super().forward(query, key, value, attention_mask, *args, **kwargs)
        kwargs.pop("attn_mask_type", None)
        return torch.cat(list(self._thd_chunks(query, key, value, packed)), dim=0)

    def _thd_chunks(self, query, key, value, packed):
        cu_q, cu_kv = packed.cu_seqlens_q.tolist(), packed.cu_seqlens_kv.tolist()
        pad_q = _effective_cu_seqlens(packed, "q").tolist()
        pad_kv = _effective_cu_seqlens(packed, "kv").tolist()
        width = self.hidden_size_per_partition
        for i in range(len(cu_q) - 1):
            n_q, n_kv = cu_q[i + 1] - cu_q[i], cu_kv[i + 1] - cu_kv[i]
            q = query[pad_q[i] : pad_q[i] + n_q].unsqueeze(1)
            k = key[pad_kv[i] : pad_kv[i] + n_kv].unsqueeze(1)
            v = value[pad_kv[i] : pad_kv[i] + n_kv].unsqueeze(1)
            mask = self._sequence_mask(n_q, n_kv, query.device)
            out = super().forward(q, k, v, mask, attn_mask_type=self._sequence_mask_type())
            yield out.reshape(n_q, width)
            gap = pad_q[i + 1] - pad_q[i] - n_q
            if gap:
                yield out.new_zeros(gap, width)

    def _sequence_mask_type(self) -> AttnMaskType:
        causal = self.attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        return AttnMaskType.causal if causal else AttnMaskType.padding

    def _sequence_mask(self, n_q: int, n_kv: int, device) -> torch.Tensor:
        if self._sequence_mask_type() == AttnMaskType.causal:
            mask = torch.ones(n_q, n_kv, device=device, dtype=torch.bool).triu(1 + n_kv - n_q)
        else:
            mask = torch.zeros(n_q, n_kv, device=device, dtype=torch.bool)
        return mask.view(1, 1, n_q, n_kv)


class _TECoreAttention:
    """Mixin over ``TEDotProductAttention``: V padding only when the chosen kernel needs it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("config", args[0] if args else None)
        decision = getattr(config, f"{_MARK}_backend", None)
        self._mla_pad_value = bool(decision and decision.pad_value)
        self._mla_v_channels = kwargs.get("v_channels")
        if self._mla_pad_value and kwargs.get("k_channels") is not None:
            kwargs["v_channels"] = kwargs["k_channels"]
        super().__init__(*args, **kwargs)

    def forward(self, query, key, value, *args: Any, **kwargs: Any):
        """Pad V to the q/k width when the decision asks for it; trim the output back."""
        width = value.size(-1) if value is not None else None
        if not self._mla_pad_value or value is None or width == query.size(-1):
            return self._te_forward(query, key, value, *args, **kwargs)
        value = torch.nn.functional.pad(value, (0, query.size(-1) - width))
        out = self._te_forward(query, key, value, *args, **kwargs)
        return _trim_heads(out, query.size(-1), width)

    def _te_forward(self, query, key, value, *args: Any, **kwargs: Any):
        try:
            return super().forward(query, key, value, *args, **kwargs)
        except ValueError as exc:
            if "No dot product attention backend" not in str(exc):
                raise
            raise MLACompatibilityError(_no_backend_message(self.config, query, key, value, kwargs))


def _no_backend_message(config: Any, query, key, value, kwargs: Dict[str, Any]) -> str:
    decision = getattr(config, f"{_MARK}_backend", None)
    packed = kwargs.get("packed_seq_params")
    layout = getattr(packed, "qkv_format", None) or "sbhd"
    shape = f"q {tuple(query.shape)} k {tuple(key.shape)} v {tuple(value.shape)}"
    chosen = f"{decision.backend} ({decision.reason})" if decision else "unknown"
    return (
        f"Transformer Engine found no attention backend for this MLA call: layout {layout}, "
        f"{shape}, {_BACKEND_FLAG} decided as {chosen}. The build-time decision holds for "
        f"typical training shapes; this call's shape is outside it. Try {_BACKEND_FLAG} auto, "
        "and run with NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 to see TE's reasons."
    )


def _trim_heads(out: torch.Tensor, padded: int, width: int) -> torch.Tensor:
    shape = out.shape
    heads = shape[-1] // padded
    return out.reshape(*shape[:-1], heads, padded)[..., :width].reshape(*shape[:-1], heads * width)


def _has_var_kw(params: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


_ADAPTED: Dict[type, type] = {}


def _spec_kind(module: Any) -> str:
    if not isinstance(module, type):
        return "other"
    for cls in module.__mro__:
        if cls.__name__ == "DotProductAttention":
            if cls.__module__.startswith("transformer_engine"):
                return "te"
            if cls.__module__ == "megatron.core.transformer.dot_product_attention":
                return "local"
    return "other"


def adapted_class(module: type) -> type:
    """The adapter subclass of a core-attention class (one per base, so isinstance holds).

    The subclass keeps the base's name and parameters, so state-dict keys and ``isinstance``
    checks against the base are unchanged.

    Args:
        module: The core-attention class named by the layer spec.

    Returns:
        The subclass, or ``module`` itself for an attention class the adapter does not know.
    """
    if getattr(module, _MARK, False):
        return module
    kind = _spec_kind(module)
    if kind == "other":
        return module
    if module not in _ADAPTED:
        mixin = _LocalCoreAttention if kind == "local" else _TECoreAttention
        name = f"MLA{module.__name__}"
        adapted = type(name, (mixin, module), {_MARK: True, "__module__": __name__})
        adapted.__qualname__ = name
        globals()[name] = adapted  # importable by name, so modules pickle
        _ADAPTED[module] = adapted
    return _ADAPTED[module]


def core_attention_spec(attention: Any, spec: Any) -> Any:
    """Hook H1: the core-attention spec MLA builds, routed through the adapter.

    Sets the layer's ``softmax_scale`` to the adapter's value (Python evaluates the hook before
    the ``softmax_scale=self.softmax_scale`` argument that follows it), resolves the backend
    with the now-known spec, logs :func:`describe` once per config, and returns the spec with its
    class swapped for :func:`adapted_class`.

    Args:
        attention: The ``MultiLatentAttention`` being built.
        spec: ``submodules.core_attention`` (a ``ModuleSpec`` or a class).

    Returns:
        A spec of the same kind that builds the adapted class.
    """
    config = attention.config
    attention.softmax_scale = layer_metadata(config).softmax_scale
    module = getattr(spec, "module", spec)
    resolve_attention_backend(config, _spec_kind(module))
    if not getattr(config, f"{_MARK}_described", False):
        logger.info("%s", describe(config))
        setattr(config, f"{_MARK}_described", True)
    adapted = adapted_class(module) if isinstance(module, type) else module
    if adapted is module:
        return spec
    if isinstance(spec, type):
        return adapted
    return dataclasses.replace(spec, module=adapted)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def describe(config: Any) -> str:
    """One line: what the adapter answered for this config.

    Args:
        config: An ``MLATransformerConfig``.

    Returns:
        ``mla-seam: k_channels=.. v_channels=.. kv_channels=.. softmax_scale=.. (source)
        backend=.. (reason) v_pad=on|off``.
    """
    meta = layer_metadata(config)
    decision = getattr(config, f"{_MARK}_backend", None)
    backend = (
        f"backend={decision.backend} ({decision.reason}) v_pad={'on' if decision.pad_value else 'off'}"
        if decision
        else f"backend={_backend_name(config.attention_backend)} (not yet resolved)"
    )
    return (
        f"mla-seam: k_channels={meta.k_channels} v_channels={meta.v_channels} "
        f"kv_channels={config.kv_channels} softmax_scale={meta.softmax_scale:.6g} "
        f"({meta.scale_source}) {backend}"
    )


def describe_default() -> str:
    """:func:`describe` for DeepSeek-V2-Lite attention dims, resolved on this machine.

    Returns:
        The summary line; used by ``mla-seam apply`` after the main job.
    """
    from megatron.core.transformer.transformer_config import (  # pylint: disable=C0415
        MLATransformerConfig,
    )

    config = MLATransformerConfig(
        num_layers=1,
        hidden_size=2048,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_head_dim=128,
        qk_pos_emb_head_dim=64,
        v_head_dim=128,
        rope_type="yarn",
        rotary_scaling_factor=40.0,
        mscale=0.707,
        mscale_all_dim=0.707,
    )
    resolve_attention_backend(config, "te" if _te_version() else "local")
    return describe(config)
