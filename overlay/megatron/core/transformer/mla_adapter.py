# Copyright (c) 2026 mla-seam authors. Licensed under the Apache License, Version 2.0.

"""Multi-Latent Attention (MLA) adapter: every MLA compatibility decision in one place.

Megatron's generic attention code assumes that query, key and value heads have one width
(``kv_channels``), that RoPE covers the whole head, and that any attention backend can run any
layer. MLA breaks all three: q/k heads are ``qk_head_dim + qk_pos_emb_head_dim`` wide (192 for
DeepSeek-V2/V3), v heads ``v_head_dim`` (128), only the ``qk_pos_emb_head_dim`` slice carries
RoPE, and the softmax scale depends on YaRN's ``mscale_all_dim``.

This module answers four boundary questions and nothing else:

1. Layer metadata (:func:`layer_metadata`, :func:`resolve_qk_norms`): k/v channels, the softmax
   scale by the DeepSeek / HuggingFace formula, the ``kv_channels`` value other Megatron code
   reads, and which latent/query norms the layer has.
2. Packed sequences (:func:`normalize_packed_seq`, :func:`rotary_pos_emb_fn`,
   :func:`upstream_value_pad`): THD parameters normalized for the RoPE slice, RoPE applied to the
   whole packed batch in one pass, and V padded only when the selected kernel needs equal head
   dims.
3. Backend (:func:`resolve_attention_backend`): is ``--attention-backend`` a supported MLA path
   on this Transformer Engine / GPU? Decided at model build, with a reason, or an
   :class:`MLACompatibilityError` that names the restriction and the flag.
4. Pipeline offsets (:func:`layer_offset`, :func:`pipeline_layer_offset`,
   :func:`per_layer_value`): layer numbering and per-layer lists normalized before pipeline and
   recompute accounting.

Megatron calls in through one-line hooks (the mla-seam patch series):

* H1 ``MultiLatentAttention.__init__``: ``core_attention_spec(self, submodules.core_attention)``
* H2 ``MLASelfAttention.get_query_key_value_tensors``: ``normalize_packed_seq(...)``
* H3 ``LanguageModule._set_attention_backend``: ``resolve_attention_backend(self.config)``
* H4 ``MLATransformerConfig.__post_init__``: ``check_config(self)``
* H5 (release lines that pad V themselves) ``upstream_value_pad(...)``
* H6 (release lines that index per-layer lists off by one) ``per_layer_value(...)``
* H7 ``get_transformer_layer_offset`` (on entry): ``pipeline_layer_offset(config, vp_stage, ...)``
* H8 ``MLASelfAttention.get_query_key_value_tensors``: ``rotary_pos_emb_fn(self, ...)``
* H9 (release lines with the QK-norm resolver) ``resolve_qk_norms(self, ...)``

Each hook imports this module where it calls it (``from megatron.core.transformer import
mla_adapter`` inside the function), so a hook's hunk never touches an import block that
upstream reorders from release to release.

State: the adapter keeps one attribute on a config, ``config._mla_seam`` (an
:class:`MLASeamState`), and one on a THD ``PackedSeqParams``, ``_mla_seam`` (the per-batch
work, :class:`PackedBatch`). Upstream features are detected by inspection (signatures,
attributes), never by version.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import importlib.util
import inspect
import logging
import math
import os
import textwrap
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.utils import log_single_rank

try:
    import transformer_engine  # pylint: disable=unused-import

    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    HAVE_TE = True
except ImportError:
    HAVE_TE = False

if TYPE_CHECKING:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.multi_latent_attention import (
        MLASelfAttentionSubmodules,
        MultiLatentAttention,
    )
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

logger = logging.getLogger(__name__)

#: Environment variable choosing what happens when the requested backend cannot run MLA:
#: ``strict`` (default) raises at model build, ``fallback`` switches to the fastest supported
#: backend and logs a warning.
POLICY_ENV = "MLA_SEAM_BACKEND_POLICY"

#: Environment variable choosing the query path of ``q_lora_rank=None`` layers where Megatron's
#: QK-norm resolver (0.19+) fuses an RMSNorm into ``linear_q_proj``: ``deepseek`` (default) builds
#: DeepSeek's layer, a plain query projection; ``upstream`` keeps upstream's query-input norm.
QUERY_NORM_ENV = "MLA_SEAM_QUERY_NORM"

#: The one attribute the adapter sets on a config and on a THD ``PackedSeqParams``.
STATE_ATTR = "_mla_seam"

_BACKEND_FLAG = "--attention-backend"
_LOGGED: set = set()


class MLACompatibilityError(ValueError):
    """A configuration Megatron accepts but MLA cannot run; the message says what to change."""


@dataclasses.dataclass
class MLASeamState:
    """What the adapter decided for one config (``config._mla_seam``).

    Attributes:
        backend: The backend decision (question 3), once made.
        query_norm: ``"deepseek"`` or ``"upstream"`` once :func:`resolve_qk_norms` ran, else
            ``None`` (the release builds the query path without a resolver).
        offset_logged: Whether a pipeline offset answered by the adapter (H7) was logged for
            this config.
    """

    backend: Optional["BackendDecision"] = None
    query_norm: Optional[str] = None
    offset_logged: bool = False


def state(config: TransformerConfig) -> MLASeamState:
    """The adapter's state on ``config`` (created on first use).

    Args:
        config: A ``TransformerConfig``.

    Returns:
        Its :class:`MLASeamState`.
    """
    found = getattr(config, STATE_ATTR, None)
    if not isinstance(found, MLASeamState):
        found = MLASeamState()
        setattr(config, STATE_ATTR, found)
    return found


def backend_decision(config: TransformerConfig) -> Optional["BackendDecision"]:
    """The backend decision made for ``config``, or ``None`` before the model was built.

    Args:
        config: A ``TransformerConfig``.

    Returns:
        The :class:`BackendDecision` or ``None``.
    """
    found = getattr(config, STATE_ATTR, None)
    return found.backend if isinstance(found, MLASeamState) else None


def _log_once(level: int, message: str) -> None:
    """Log ``message`` on rank 0, once per process."""
    if message in _LOGGED:
        return
    _LOGGED.add(message)
    log_single_rank(logger, level, message)


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


def softmax_scale(config: MLATransformerConfig) -> Tuple[float, str]:
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


def layer_metadata(config: MLATransformerConfig) -> MLAMetadata:
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


def check_config(config: MLATransformerConfig) -> None:
    """Hook H4: validate MLA fields in ``MLATransformerConfig.__post_init__``.

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
        config.kv_channels = config.v_head_dim


def _flag(field: str) -> str:
    return field.replace("_", "-")


def query_norm_policy() -> str:
    """``upstream`` when the user asked for upstream's query-input norm, else ``deepseek``.

    Returns:
        The policy read from :data:`QUERY_NORM_ENV`.

    Raises:
        MLACompatibilityError: The variable holds another value.
    """
    value = os.environ.get(QUERY_NORM_ENV, "deepseek").strip().lower() or "deepseek"
    if value not in ("deepseek", "upstream"):
        raise MLACompatibilityError(
            f"{QUERY_NORM_ENV}={value!r}: use 'deepseek' (no query-input norm without "
            "q_lora_rank, as DeepSeek defines the layer) or 'upstream' (Megatron's fused "
            "query-input RMSNorm)."
        )
    return value


def resolve_qk_norms(
    attention: MultiLatentAttention, submodules: MLASelfAttentionSubmodules, resolver_cls: type
) -> Dict[str, Any]:
    """Hook H9: the q/kv norms and projections an MLA layer builds (QK-norm resolver lines).

    Megatron's resolver (``mla_qk_norm_config.QKNormConfigResolver``, 0.19+) builds
    ``linear_q_proj`` as a fused RMSNorm+linear when ``qk_layernorm=True`` and
    ``q_lora_rank=None``: a norm on the query input that DeepSeek's layer does not have (an HF
    checkpoint has no weight for it), and it rejects the local spec's query norm outright. Here
    such a layer gets DeepSeek's query path: the spec's plain ``linear_q_proj`` and no query norm;
    the kv latent norm and everything else is upstream's resolution. ``MLA_SEAM_QUERY_NORM=
    upstream`` keeps upstream's answer. Layers with a query LoRA, without QK norm, with an
    explicitly fused ``linear_q_proj`` in the spec, or DSA layers are upstream's unchanged.

    Args:
        attention: The ``MLASelfAttention`` being built.
        submodules: Its ``MLASelfAttentionSubmodules``.
        resolver_cls: Upstream's resolver class.

    Returns:
        The resolver's mapping (``linear_q_proj``, ``linear_q_up_proj``, ``linear_kv_up_proj``,
        ``q_layernorm``, ``kv_layernorm``).
    """
    config = attention.config
    resolver = resolver_cls(config, submodules)
    applies = (
        config.q_lora_rank is None
        and config.qk_layernorm
        and not getattr(config, "qk_l2_norm", False)
        and getattr(config, "experimental_attention_variant", None) is None
        and not _is_fused_norm_linear(resolver, submodules.linear_q_proj)
    )
    if not applies:
        return resolver.resolve()
    policy = query_norm_policy()
    state(config).query_norm = policy
    if policy == "upstream":
        return resolver.resolve()
    # The kv side does not depend on the query LoRA; only the no-LoRA branch adds the query
    # norm. Resolve the layer as if it had a query LoRA and keep the kv answer.
    with_q_lora = copy.copy(config)
    with_q_lora.q_lora_rank = config.kv_lora_rank
    resolved = resolver_cls(with_q_lora, submodules).resolve()
    resolved.update(
        linear_q_proj=submodules.linear_q_proj or resolver.linear_impl,
        linear_q_up_proj=IdentityOp,
        q_layernorm=IdentityOp,
    )
    return resolved


def _is_fused_norm_linear(resolver: Any, spec: Any) -> bool:
    fused = getattr(resolver, "fused_norm_linear_impl", None)
    return fused is not None and getattr(spec, "module", spec) is fused


# ---------------------------------------------------------------------------------------------
# Question 2: packed (THD) sequences
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PackedBatch:
    """The adapter's work for one THD batch, done once and shared by every layer.

    Kept on the batch's ``PackedSeqParams`` (attribute ``_mla_seam``).

    Attributes:
        rope_params: The parameters QKV and RoPE use (a copy whose ``cu_seqlens_*`` are the
            padded offsets where they differ, else the batch's own parameters).
        offsets_q: ``cu_seqlens_q`` on the host.
        offsets_kv: ``cu_seqlens_kv`` on the host.
        padded_q: The padded q offsets (``cu_seqlens_q`` where there are none) on the host.
        padded_kv: The padded kv offsets on the host.
        positions: RoPE position of every local token, per (offsets tensor, tokens, CP size,
            CP rank): ``(offsets, positions)``.
        tables: The whole RoPE table of a module that cuts it per CP rank, per (module,
            length): ``(module, table)``.
    """

    rope_params: Any
    offsets_q: List[int]
    offsets_kv: List[int]
    padded_q: List[int]
    padded_kv: List[int]
    positions: Dict[Tuple[int, int, int, int], Tuple[torch.Tensor, torch.Tensor]] = (
        dataclasses.field(default_factory=dict)
    )
    tables: Dict[Tuple[int, int], Tuple[torch.nn.Module, torch.Tensor]] = dataclasses.field(
        default_factory=dict
    )


def packed_batch(packed_seq_params: Optional[PackedSeqParams]) -> Optional[PackedBatch]:
    """The :class:`PackedBatch` of THD parameters already normalized, else ``None``.

    Args:
        packed_seq_params: ``PackedSeqParams`` or ``None``.

    Returns:
        The batch's work, or ``None``.
    """
    found = getattr(packed_seq_params, STATE_ATTR, None)
    return found if isinstance(found, PackedBatch) else None


def normalize_packed_seq(
    attention: MultiLatentAttention,
    packed_seq_params: Optional[PackedSeqParams],
    hidden_states: Optional[torch.Tensor],
) -> Optional[PackedSeqParams]:
    """Hook H2: the packed-sequence parameters MLA's QKV/RoPE code may rely on.

    Non-THD packed parameters carry nothing for RoPE or the QKV shapes (upstream squeezes
    dim 1 for any packed parameters and sizes RoPE from ``max_seqlen``), so they become
    ``None`` here; the caller still hands the original object to core attention. THD
    parameters are completed and checked once per batch (later layers reuse the work, and the
    one host copy of the offsets it takes): a missing kv side mirrors the q side, missing
    ``max_seqlen_*`` come from the (padded) ``cu_seqlens``.

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
        MLACompatibilityError: The offsets are malformed (the message names the field).
    """
    if packed_seq_params is None or getattr(packed_seq_params, "qkv_format", None) != "thd":
        return None
    batch = packed_batch(packed_seq_params)
    if batch is None:
        batch = _prepare_thd(attention.config, packed_seq_params, hidden_states)
    return batch.rope_params


def _prepare_thd(
    config: MLATransformerConfig, params: PackedSeqParams, hidden_states: Optional[torch.Tensor]
) -> PackedBatch:
    if params.cu_seqlens_q is None:
        raise MLACompatibilityError(
            "PackedSeqParams(qkv_format='thd') without cu_seqlens_q: build it from the "
            "per-sequence lengths (cumulative sum starting at 0, int32)."
        )
    if params.cu_seqlens_kv is None:
        params.cu_seqlens_kv = params.cu_seqlens_q
    if getattr(params, "cu_seqlens_kv_padded", None) is None:
        params.cu_seqlens_kv_padded = getattr(params, "cu_seqlens_q_padded", None)
    host: Dict[str, Optional[List[int]]] = {}
    copied: Dict[int, Optional[List[int]]] = {}  # one host copy per tensor (kv is often q's)
    for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        offsets = getattr(params, name, None)
        if id(offsets) not in copied:
            copied[id(offsets)] = _host_offsets(name, offsets)
        host[name] = copied[id(offsets)]
    for side in ("q", "kv"):
        actual = host[f"cu_seqlens_{side}"]
        padded = host[f"cu_seqlens_{side}_padded"] or actual
        _check_padding(side, actual, padded)
        if getattr(params, f"max_seqlen_{side}") is None:
            setattr(params, f"max_seqlen_{side}", max(_lengths(padded), default=0))
    padded_q = host["cu_seqlens_q_padded"] or host["cu_seqlens_q"]
    padded_kv = host["cu_seqlens_kv_padded"] or host["cu_seqlens_kv"]
    _check_thd_shape(config, params, padded_q, padded_kv, hidden_states)
    _check_thd_backend(config, params)
    batch = PackedBatch(
        rope_params=_rope_view(params) or params,
        offsets_q=host["cu_seqlens_q"],
        offsets_kv=host["cu_seqlens_kv"],
        padded_q=padded_q,
        padded_kv=padded_kv,
    )
    setattr(params, STATE_ATTR, batch)
    if batch.rope_params is not params:
        setattr(batch.rope_params, STATE_ATTR, batch)
    return batch


def _host_offsets(name: str, offsets: Optional[torch.Tensor]) -> Optional[List[int]]:
    """``offsets`` on the host, checked: int32, 1-D, starting at 0, never decreasing."""
    if offsets is None:
        return None
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int32:
        kind = offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets).__name__
        raise MLACompatibilityError(
            f"PackedSeqParams.{name} must be an int32 tensor (the attention kernels read it as "
            f"int32), got {kind}; build it with dtype=torch.int32."
        )
    values = offsets.tolist()
    if offsets.dim() != 1 or len(values) < 2 or values[0] != 0:
        raise MLACompatibilityError(
            f"PackedSeqParams.{name} must be 1-D, start at 0 and have one entry per sequence "
            f"plus one, got {values[:8]}..."
        )
    for index, (start, end) in enumerate(zip(values, values[1:])):
        if end < start:
            raise MLACompatibilityError(
                f"PackedSeqParams.{name} must never decrease, but entry {index + 1} ({end}) is "
                f"below entry {index} ({start}): {values[:8]}..."
            )
    return values


def _lengths(offsets: List[int]) -> List[int]:
    return [end - start for start, end in zip(offsets, offsets[1:])]


def _check_padding(side: str, actual: List[int], padded: List[int]) -> None:
    if len(padded) != len(actual) or any(p < a for p, a in zip(_lengths(padded), _lengths(actual))):
        raise MLACompatibilityError(
            f"PackedSeqParams.cu_seqlens_{side}_padded must have one entry per cu_seqlens_{side} "
            "entry and every padded sequence must be at least as long as the sequence itself."
        )


def _check_thd_shape(
    config: MLATransformerConfig,
    params: PackedSeqParams,
    padded_q: List[int],
    padded_kv: List[int],
    hidden_states: Optional[torch.Tensor],
) -> None:
    cp_size = getattr(config, "context_parallel_size", 1) or 1
    name = "cu_seqlens_q_padded" if params.cu_seqlens_q_padded is not None else "cu_seqlens_q"
    if cp_size > 1 and any(n % (2 * cp_size) for n in _lengths(padded_q)):
        raise MLACompatibilityError(
            f"PackedSeqParams.{name}: with context parallelism {cp_size} every (padded) sequence "
            f"length must be a multiple of 2 x {cp_size}; pad the sequences "
            "(cu_seqlens_q_padded)."
        )
    rope_len = max(params.max_seqlen_q, params.max_seqlen_kv)
    longest = max(_lengths(padded_q) + _lengths(padded_kv))
    if longest > rope_len:
        raise MLACompatibilityError(
            f"PackedSeqParams.max_seqlen_q/max_seqlen_kv ({params.max_seqlen_q}/"
            f"{params.max_seqlen_kv}) are below the longest packed sequence ({longest} tokens): "
            "RoPE tables are sized from them; pass the longest (padded) length."
        )
    if hidden_states is None:
        return
    tokens = hidden_states.size(0)
    if getattr(config, "sequence_parallel", False):
        tokens *= getattr(config, "tensor_model_parallel_size", 1) or 1
    if padded_q[-1] != tokens * cp_size:
        raise MLACompatibilityError(
            f"PackedSeqParams.{name} ends at {padded_q[-1]} tokens but the THD input holds "
            f"{tokens * cp_size} (x context parallel {cp_size}); pass cu_seqlens_q_padded when "
            "sequences are padded."
        )


def _rope_view(params: PackedSeqParams) -> Optional[PackedSeqParams]:
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
    return view


def _effective_cu_seqlens(params: PackedSeqParams, side: str) -> torch.Tensor:
    padded = getattr(params, f"cu_seqlens_{side}_padded", None)
    return padded if padded is not None else getattr(params, f"cu_seqlens_{side}")


def _check_thd_backend(config: MLATransformerConfig, params: PackedSeqParams) -> None:
    decision = backend_decision(config)
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
    if not HAVE_TE:
        return False
    try:
        # pylint: disable=import-outside-toplevel
        from transformer_engine.pytorch.attention.dot_product_attention import utils as te_utils

        source = inspect.getsource(te_utils.get_attention_backend)
    except Exception:  # pylint: disable=broad-except
        return False
    return "Disabling UnfusedDotProductAttention for pad_between_seqs" in source


def rotary_pos_emb_fn(
    attention: MultiLatentAttention, packed_seq_params: Optional[PackedSeqParams]
) -> Callable[..., torch.Tensor]:
    """Hook H8: the function MLA's QKV code applies RoPE with, for this batch.

    Release lines up to 0.19 apply RoPE to a THD batch through ``rope_utils`` one sequence at a
    time in Python (0.19: a launch sequence and a narrow copy per sequence; earlier lines: a
    frequency slice per sequence and a host copy of the offsets per call), so a layer's cost
    grows with the number of packed sequences. For a THD batch normalized by
    :func:`normalize_packed_seq` (and RoPE fusion off: the fused MLA kernels already take the
    offsets), the returned function builds every token's position once per batch on the device
    (CP-aware, padded offsets) and rotates the packed tensor in one pass: the same arithmetic
    as upstream's per-sequence path, with MLA's de-interleaving and ``rotary_interleaved``
    respected. Positions restart at every sequence, as for per-sequence bshd. Where the
    layer's RoPE module cuts its table to the rank's bshd chunks under context parallelism even
    for packed batches (0.13's YaRN), the rotation uses the whole table. Anything else gets
    upstream's ``apply_rotary_pos_emb`` (the one MLA's module imported).

    Args:
        attention: The MLA module.
        packed_seq_params: The parameters :func:`normalize_packed_seq` returned.

    Returns:
        A function with upstream's ``apply_rotary_pos_emb`` signature.

    Raises:
        MLACompatibilityError: RoPE fusion on a THD batch under context parallelism where the
            release cuts the table per rank (the fused kernels would rotate at wrong
            positions).
    """
    # pylint: disable=import-outside-toplevel
    from megatron.core.transformer import multi_latent_attention

    upstream = multi_latent_attention.apply_rotary_pos_emb
    batch = packed_batch(packed_seq_params)
    if batch is None:
        return upstream
    sliced = _slices_packed_tables(attention)
    if attention.config.apply_rope_fusion:
        if sliced:
            raise MLACompatibilityError(
                "MLA RoPE fusion with packed (THD) sequences and context parallelism: this "
                "release cuts YaRN's cos/sin table per context-parallel rank as for bshd and "
                "does not pass the rank to the fused kernels, so every packed token would be "
                "rotated at a wrong position. Turn RoPE fusion off (--no-rope-fusion, "
                "apply_rope_fusion=False): the adapter then rotates THD batches itself."
            )
        return upstream
    rotary = attention.rotary_pos_emb if sliced else None
    return functools.partial(_packed_rotary_pos_emb, batch, upstream, rotary)


def _slices_packed_tables(attention: MultiLatentAttention) -> bool:
    """Whether the layer's RoPE module cuts its table per CP rank for packed batches too.

    Under context parallelism a bshd rank holds two chunks of the sequence, so a rotary module
    keeps only those chunks of its table. A THD rank holds two chunks of every packed sequence,
    which need the whole table. Releases that know this take a ``packed_seq`` argument; a
    module with a CP group and no such argument (0.13's YaRN) cuts the table regardless.
    """
    rotary = getattr(attention, "rotary_pos_emb", None)
    group = getattr(rotary, "cp_group", None)
    if group is None or group.size() < 2:
        return False
    return not _forward_takes_packed_seq(type(rotary))


@functools.lru_cache(maxsize=None)
def _forward_takes_packed_seq(cls: type) -> bool:
    """Whether ``cls.forward`` has a ``packed_seq`` parameter (read once per class)."""
    return "packed_seq" in inspect.signature(cls.forward).parameters


def _whole_table(batch: PackedBatch, rotary: torch.nn.Module, length: int) -> torch.Tensor:
    """``rotary``'s table of ``length`` positions, not cut per CP rank (once per batch)."""
    key = (id(rotary), length)
    cached = batch.tables.get(key)
    if cached is None or cached[0] is not rotary:
        # The module's forward may memoize per length (0.13's YaRN: ``lru_cache``), which
        # would hand back the cut table: call the function under the cache.
        forward = inspect.unwrap(type(rotary).forward)
        group = rotary.cp_group
        rotary.cp_group = None  # the module cuts the table only when it has a CP group
        try:
            table = forward(rotary, length)
        finally:
            rotary.cp_group = group
        cached = (rotary, table[0] if isinstance(table, tuple) else table)
        batch.tables[key] = cached
    return cached[1]


def _packed_rotary_pos_emb(
    batch: PackedBatch,
    upstream: Callable[..., torch.Tensor],
    rotary: Optional[torch.nn.Module],
    t: torch.Tensor,
    freqs: torch.Tensor,
    config: TransformerConfig,
    cu_seqlens: Optional[torch.Tensor] = None,
    mscale: float = 1.0,
    cp_group: Optional[torch.distributed.ProcessGroup] = None,
    mla_rotary_interleaved: Optional[bool] = None,
    **kwargs: Any,
) -> torch.Tensor:
    if cu_seqlens is None or kwargs or not isinstance(freqs, torch.Tensor):
        if mla_rotary_interleaved is not None:
            kwargs["mla_rotary_interleaved"] = mla_rotary_interleaved
        return upstream(
            t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group, **kwargs
        )
    if cp_group is None:
        cp_group = parallel_state.get_context_parallel_group()
    if mla_rotary_interleaved is None:
        mla_rotary_interleaved = config.multi_latent_attention
    if rotary is not None:  # the table MLA computed is this rank's bshd chunks only
        freqs = _whole_table(batch, rotary, freqs.size(0) * cp_group.size())
    positions = _packed_positions(batch, cu_seqlens, t.size(0), cp_group.size(), cp_group.rank())
    return apply_rotary_packed(
        t,
        freqs,
        positions,
        rotary_interleaved=config.rotary_interleaved,
        mla_rotary_interleaved=mla_rotary_interleaved,
        mscale=mscale,
    )


def _packed_positions(
    batch: PackedBatch, cu_seqlens: torch.Tensor, tokens: int, cp_size: int, cp_rank: int
) -> torch.Tensor:
    key = (id(cu_seqlens), tokens, cp_size, cp_rank)
    cached = batch.positions.get(key)
    if cached is None or cached[0] is not cu_seqlens:
        cached = (cu_seqlens, thd_positions(cu_seqlens, tokens, cp_size, cp_rank))
        batch.positions[key] = cached
    return cached[1]


def thd_positions(
    cu_seqlens: torch.Tensor, tokens: int, cp_size: int = 1, cp_rank: int = 0
) -> torch.Tensor:
    """The RoPE position of every local token of a THD batch, on the offsets' device.

    Positions restart at 0 at every sequence. Under context parallelism each rank holds two
    chunks of every (padded) sequence, chunk ``cp_rank`` and chunk ``2 * cp_size - 1 - cp_rank``,
    and gets their global positions. No host synchronisation.

    Args:
        cu_seqlens: Global (padded) offsets, ``[sequences + 1]``.
        tokens: Local token count (``cu_seqlens[-1] / cp_size``).
        cp_size: Context-parallel size.
        cp_rank: This rank in the context-parallel group.

    Returns:
        ``[tokens]`` int64 positions.
    """
    offsets = cu_seqlens.to(torch.int64)
    lengths = (offsets[1:] - offsets[:-1]) // cp_size
    local_ends = torch.cumsum(lengths, 0)
    index = torch.arange(tokens, device=cu_seqlens.device, dtype=torch.int64)
    sequence = torch.searchsorted(local_ends, index, right=True)
    sequence = sequence.clamp_(max=lengths.numel() - 1)
    local = index - (local_ends - lengths)[sequence]
    if cp_size == 1:
        return local
    length = lengths[sequence]
    half = length // 2
    return torch.where(
        local < half, cp_rank * half + local, cp_size * length - (cp_rank + 2) * half + local
    )


def apply_rotary_packed(
    t: torch.Tensor,
    freqs: torch.Tensor,
    positions: torch.Tensor,
    rotary_interleaved: bool = False,
    mla_rotary_interleaved: bool = False,
    mscale: float = 1.0,
) -> torch.Tensor:
    """Rotate a packed ``[tokens, heads, dim]`` tensor, each token at its own position.

    Upstream's RoPE arithmetic (cos/sin of the frequencies scaled by ``mscale`` and rounded to
    ``t``'s dtype, ``t * cos + rotate_half(t) * sin``), applied to every token in one pass.

    Args:
        t: ``[tokens, heads, dim]`` (or ``[tokens, 1, dim]``).
        freqs: ``[max_len, 1, 1, rot_dim]`` frequencies.
        positions: ``[tokens]`` positions into ``freqs``.
        rotary_interleaved: Rotate interleaved pairs instead of halves.
        mla_rotary_interleaved: MLA's layout: de-interleave the rotary slice first.
        mscale: YaRN's cos/sin scale.

    Returns:
        The rotated tensor, same shape and dtype.
    """
    rot_dim = freqs.size(-1)
    positions = positions.clamp(max=freqs.size(0) - 1)  # padding tokens past the table
    angles = freqs.reshape(freqs.size(0), rot_dim).index_select(0, positions)
    angles = angles.view(t.size(0), *([1] * (t.dim() - 2)), rot_dim)
    x, passed = t[..., :rot_dim], t[..., rot_dim:]
    if mla_rotary_interleaved:
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    cos = (torch.cos(angles) * mscale).to(t.dtype)
    sin = (torch.sin(angles) * mscale).to(t.dtype)
    if rotary_interleaved:
        rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    else:
        first, second = torch.chunk(x, 2, dim=-1)
        rotated = torch.cat((-second, first), dim=-1)
    out = x * cos + rotated * sin
    return torch.cat((out, passed), dim=-1) if passed.size(-1) else out


def upstream_value_pad(attention: MultiLatentAttention, need_v_pad: bool) -> bool:
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


# # Question 3: attention backend
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


def probe_facts(config: MLATransformerConfig, spec: str) -> BackendFacts:
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
        # pylint: disable=import-outside-toplevel,redefined-outer-name,reimported
        import transformer_engine
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
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_attention_backend(
    config: TransformerConfig, spec: Optional[str] = None
) -> Optional[BackendDecision]:
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
    known = backend_decision(config)
    if known is not None and known.spec == spec and known.backend == requested:
        return known
    policy = os.environ.get(POLICY_ENV, "strict").strip().lower()
    decision = dataclasses.replace(
        decide_backend(requested, probe_facts(config, spec), policy), spec=spec
    )
    if decision.fallback:
        _log_once(logging.WARNING, f"mla-seam: {decision.reason}")
        config.attention_backend = getattr(AttnBackend, decision.backend)
    state(config).backend = decision
    return decision


def _backend_name(value: Any) -> str:
    return value.name if isinstance(value, AttnBackend) else str(value).split(".")[-1]


# ---------------------------------------------------------------------------------------------
# Question 4: pipeline offsets and per-layer lists
# ---------------------------------------------------------------------------------------------


def _stage_layer_counts(config: TransformerConfig) -> List[int]:
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


def layer_offset(config: TransformerConfig, vp_stage: Optional[int], pp_rank: int) -> int:
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
    config: TransformerConfig, vp_stage: Optional[int], pp_rank: int
) -> Optional[int]:
    """Hook H7: the layer offset of a pipeline stage where upstream's own count fails.

    Upstream's ``get_transformer_layer_offset`` asks here first, as soon as it knows its
    pipeline rank, and returns the answer when there is one. The adapter answers only for MLA
    models whose uneven split (first or last stage size set) with virtual stages upstream gets
    wrong (:func:`_upstream_offset_failure`): no middle stage (upstream divides by zero), or
    the middle stages counted from rank 1 (0.13.x). The answer is :func:`layer_offset`'s.

    Args:
        config: The model config.
        vp_stage: Virtual pipeline stage (``None`` without interleaving).
        pp_rank: The pipeline rank upstream computes the offset for.

    Returns:
        The offset to add to a 1-based local layer number, or ``None``: upstream's own code
        computes it (every other model, a pipeline layout, an encoder-decoder split and every
        case upstream counts right).
    """
    if not getattr(config, "multi_latent_attention", False):
        return None
    if config.pipeline_model_parallel_size <= 1:
        return None
    if getattr(config, "pipeline_model_parallel_layout", None):
        return None
    failure = _upstream_offset_failure(config)
    if failure is None or _decoder_start() is not None:
        return None
    ours = layer_offset(config, vp_stage, pp_rank)
    if not state(config).offset_logged:
        state(config).offset_logged = True
        # Every pipeline rank has its own offsets: logged on each rank, not on rank 0 only.
        logger.warning(
            "mla-seam: layer offsets from the adapter (upstream %s); pipeline rank %d, virtual "
            "stage %s starts at layer %d",
            failure,
            pp_rank,
            vp_stage,
            ours,
        )
    return ours


def _upstream_offset_failure(config: TransformerConfig) -> Optional[str]:
    """How upstream's uneven-split + virtual-stage offset fails for ``config`` (``None``: right).

    Upstream's branch for ``num_layers_in_first/last_pipeline_stage`` with virtual stages
    divides the middle layers by the number of middle stages without checking it (zero on PP=2
    with both stage sizes set: ZeroDivisionError on the last pipeline rank, every release up to
    0.19.x; the branch without virtual stages checks), and on 0.13.x counts the middle stages
    from rank 1 when the first stage is not customized.
    """
    if config.virtual_pipeline_model_parallel_size is None:
        return None
    first = config.num_layers_in_first_pipeline_stage
    last = config.num_layers_in_last_pipeline_stage
    if first is None and last is None:
        return None
    middle_ranks = config.pipeline_model_parallel_size - (first is not None) - (last is not None)
    if middle_ranks == 0:
        return "divides by zero middle stages"
    if first is None and _upstream_counts_middle_from_rank_one():
        return "counts the middle stages from rank 1"
    return None


@functools.lru_cache(maxsize=None)
def _upstream_counts_middle_from_rank_one() -> bool:
    """Whether upstream's virtual-stage offset counts middle stages from rank 1 (0.13.x).

    Read from the source of ``get_transformer_layer_offset``: a ``rank - 1`` outside the
    ``middle_pipeline_rank`` assignment (which subtracts one only when the first stage is
    customized). ``False`` where the source cannot be read.
    """
    from megatron.core.transformer import transformer_layer  # pylint: disable=C0415

    try:
        source = inspect.getsource(transformer_layer.get_transformer_layer_offset)
        tree = ast.parse(textwrap.dedent(source))
    except (OSError, TypeError, SyntaxError):
        return False
    counted = set()
    for node in ast.walk(tree):
        targets = getattr(node, "targets", [])
        if any(getattr(target, "id", None) == "middle_pipeline_rank" for target in targets):
            counted.update(id(sub) for sub in ast.walk(node.value))
    return any(
        isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Sub)
        and getattr(node.left, "id", None) in ("pipeline_rank", "pp_rank")
        and getattr(node.right, "value", None) == 1
        and id(node) not in counted
        for node in ast.walk(tree)
    )


def _decoder_start() -> Optional[int]:
    """The pipeline rank where an encoder-decoder model's decoder starts (``None``: no split)."""
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


# ---------------------------------------------------------------------------------------------
# Hook H1: the core attention built by MLA
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _init_accepts(cls: type, name: str) -> bool:
    params = inspect.signature(cls.__init__).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@functools.lru_cache(maxsize=None)
def _sdpa_takes_scale() -> bool:
    sdpa = getattr(F, "scaled_dot_product_attention", None)
    if sdpa is None:
        return False
    try:
        return "scale" in inspect.signature(sdpa).parameters
    except (TypeError, ValueError):
        return True  # a builtin without a Python signature: torch >= 2.1 has ``scale``


class MLADotProductAttention(DotProductAttention):
    """Megatron's local ``DotProductAttention`` for MLA.

    Accepts ``k_channels``/``v_channels`` (passed on only where upstream accepts them) and sizes
    the output from ``v_channels`` instead of ``config.kv_channels``. Causal self-attention runs
    through ``torch.nn.functional.scaled_dot_product_attention``, which computes the same
    function (the adapter's softmax scale, causal mask, attention dropout) in fused kernels;
    other masks, sliding windows, softmax variants and grouped queries keep Megatron's own path.
    THD packed batches run sequence by sequence at the padded offsets, padding slots zero.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        v_channels = kwargs.get("v_channels")
        for name in ("k_channels", "v_channels"):
            if name in kwargs and not _init_accepts(DotProductAttention, name):
                kwargs.pop(name)
        super().__init__(*args, **kwargs)
        self._mla_pad_value = False
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    def forward(self, query, key, value, attention_mask, *args: Any, **kwargs: Any):
        """Attention over ``[s, b, heads, dim]`` (or THD ``[t, heads, dim]``) inputs."""
        packed = kwargs.pop("packed_seq_params", None)
        if packed is not None and getattr(packed, "qkv_format", None) == "thd":
            return self._forward_thd(query, key, value, packed)
        bias = kwargs.get("attention_bias", args[1] if len(args) > 1 else None)
        if bias is None and self._sdpa_computes_this(query, key):
            return self._sdpa(query, key, value)
        return super().forward(query, key, value, attention_mask, *args, **kwargs)

    def _sdpa_computes_this(self, query: torch.Tensor, key: torch.Tensor) -> bool:
        config = self.config
        return (
            self.attn_mask_type == AttnMaskType.causal
            and query.size(0) == key.size(0)
            and _sdpa_takes_scale()
            and self.num_attention_heads_per_partition == self.num_query_groups_per_partition
            and getattr(config, "window_size", None) is None
            and getattr(config, "softmax_type", "vanilla") == "vanilla"
        )

    def _sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Causal attention through SDPA: ``[s, b, heads, dim]`` in, ``[s, b, heads * v]`` out."""
        seq, batch = query.size(0), query.size(1)
        coeff = getattr(self.scale_mask_softmax, "scale", None) or 1.0
        dropout = self.attention_dropout.p if self.training else 0.0
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if dropout and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale * coeff
                )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale * coeff
            )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, self.hidden_size_per_partition)

    def _forward_thd(self, query, key, value, packed: PackedSeqParams) -> torch.Tensor:
        batch = packed_batch(packed)
        if batch is not None:
            cu_q, cu_kv, pad_q, pad_kv = (
                batch.offsets_q,
                batch.offsets_kv,
                batch.padded_q,
                batch.padded_kv,
            )
        else:
            cu_q, cu_kv = packed.cu_seqlens_q.tolist(), packed.cu_seqlens_kv.tolist()
            pad_q = _effective_cu_seqlens(packed, "q").tolist()
            pad_kv = _effective_cu_seqlens(packed, "kv").tolist()
        width = self.hidden_size_per_partition
        pieces = []
        for i in range(len(cu_q) - 1):
            n_q, n_kv = cu_q[i + 1] - cu_q[i], cu_kv[i + 1] - cu_kv[i]
            q = query[pad_q[i] : pad_q[i] + n_q].unsqueeze(1)
            k = key[pad_kv[i] : pad_kv[i] + n_kv].unsqueeze(1)
            v = value[pad_kv[i] : pad_kv[i] + n_kv].unsqueeze(1)
            if n_q and self._sdpa_computes_this(q, k):
                out = self._sdpa(q, k, v)
            elif n_q:
                out = super().forward(q, k, v, self._sequence_mask(n_q, n_kv, query.device))
            else:
                out = query.new_zeros(0, 1, width)
            pieces.append(out.reshape(n_q, width))
            gap = pad_q[i + 1] - pad_q[i] - n_q
            if gap:
                pieces.append(out.new_zeros(gap, width))
        return torch.cat(pieces, dim=0)

    def _sequence_mask(self, n_q: int, n_kv: int, device: torch.device) -> torch.Tensor:
        """Megatron's boolean mask (True = masked) for one sequence of a THD batch."""
        causal = self.attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        if causal:
            mask = torch.ones(n_q, n_kv, device=device, dtype=torch.bool).triu(1 + n_kv - n_q)
        else:
            mask = torch.zeros(n_q, n_kv, device=device, dtype=torch.bool)
        return mask.view(1, 1, n_q, n_kv)


if HAVE_TE:

    class MLATEDotProductAttention(TEDotProductAttention):
        """``TEDotProductAttention`` for MLA: V padded only when the chosen kernel needs it."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            config = kwargs.get("config", args[0] if args else None)
            decision = backend_decision(config)
            self._mla_pad_value = bool(decision and decision.pad_value)
            if self._mla_pad_value and kwargs.get("k_channels") is not None:
                kwargs["v_channels"] = kwargs["k_channels"]
            super().__init__(*args, **kwargs)

        def forward(self, query, key, value, *args: Any, **kwargs: Any):
            """Pad V to the q/k width when the decision asks for it; trim the output back."""
            width = value.size(-1) if value is not None else None
            if not self._mla_pad_value or value is None or width == query.size(-1):
                return self._te_forward(query, key, value, *args, **kwargs)
            value = F.pad(value, (0, query.size(-1) - width))
            out = self._te_forward(query, key, value, *args, **kwargs)
            return _trim_heads(out, query.size(-1), width)

        def _te_forward(self, query, key, value, *args: Any, **kwargs: Any):
            try:
                return super().forward(query, key, value, *args, **kwargs)
            except ValueError as exc:
                if "No dot product attention backend" not in str(exc):
                    raise
                raise MLACompatibilityError(
                    _no_backend_message(self.config, query, key, value, kwargs)
                ) from exc

else:
    MLATEDotProductAttention = None


def _no_backend_message(
    config: TransformerConfig, query, key, value, kwargs: Dict[str, Any]
) -> str:
    decision = backend_decision(config)
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


def _spec_kind(module: Any) -> str:
    """``"te"``, ``"local"`` or ``"other"``: which core attention a spec's class is."""
    if not isinstance(module, type):
        return "other"
    if issubclass(module, DotProductAttention):
        return "local"
    if HAVE_TE and issubclass(module, TEDotProductAttention):
        return "te"
    return "other"


def adapted_class(module: type) -> type:
    """The adapter's core-attention class for the class a layer spec names.

    ``DotProductAttention`` becomes :class:`MLADotProductAttention` and
    ``TEDotProductAttention`` :class:`MLATEDotProductAttention`: subclasses with the base's
    parameters, so state-dict keys and ``isinstance`` checks against the base are unchanged.
    Any other class (including a fork's own subclass) is built as the spec says.

    Args:
        module: The core-attention class named by the layer spec.

    Returns:
        The adapter's class, or ``module`` itself.
    """
    if module is DotProductAttention:
        return MLADotProductAttention
    if HAVE_TE and module is TEDotProductAttention:
        return MLATEDotProductAttention
    return module


def core_attention_spec(attention: MultiLatentAttention, spec: Any) -> Any:
    """Hook H1: the core-attention spec MLA builds, routed through the adapter.

    Sets the layer's ``softmax_scale`` to the adapter's value (Python evaluates the hook before
    the ``softmax_scale=self.softmax_scale`` argument that follows it), resolves the backend
    with the now-known spec, logs :func:`describe` once per process on rank 0, and returns the
    spec with its class swapped for :func:`adapted_class`.

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
    _log_once(logging.INFO, describe(config))
    adapted = adapted_class(module) if isinstance(module, type) else module
    if adapted is module:
        return spec
    if isinstance(spec, type):
        return adapted
    return dataclasses.replace(spec, module=adapted)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def describe(config: MLATransformerConfig) -> str:
    """One line: what the adapter answered for this config.

    Args:
        config: An ``MLATransformerConfig``.

    Returns:
        ``mla-seam: k_channels=.. v_channels=.. kv_channels=.. softmax_scale=.. (source)
        [query_norm=..] backend=.. (reason) v_pad=on|off``.
    """
    meta = layer_metadata(config)
    decision = backend_decision(config)
    if decision:
        pad = "on" if decision.pad_value else "off"
        backend = f"backend={decision.backend} ({decision.reason}) v_pad={pad}"
    else:
        backend = f"backend={_backend_name(config.attention_backend)} (not yet resolved)"
    return (
        f"mla-seam: k_channels={meta.k_channels} v_channels={meta.v_channels} "
        f"kv_channels={config.kv_channels} softmax_scale={meta.softmax_scale:.6g} "
        f"({meta.scale_source}) {_describe_query_norm(config)}{backend}"
    )


def _describe_query_norm(config: MLATransformerConfig) -> str:
    if config.q_lora_rank is not None or not config.qk_layernorm or not _has_qk_norm_resolver():
        return ""
    if query_norm_policy() == "upstream":
        return f"query_norm=upstream ({QUERY_NORM_ENV}=upstream: fused RMSNorm on the query input) "
    return "query_norm=none (DeepSeek: no query-input norm without q_lora_rank) "


@functools.lru_cache(maxsize=None)
def _has_qk_norm_resolver() -> bool:
    try:
        spec = importlib.util.find_spec("megatron.core.transformer.mla_qk_norm_config")
    except (ImportError, ValueError):
        return False
    return spec is not None
