# Copyright (c) 2026 mla-seam authors. Licensed under the Apache License, Version 2.0.

"""Multi-Latent Attention (MLA) adapter: every MLA compatibility decision in one place.

MLA's q/k heads are ``qk_head_dim + qk_pos_emb_head_dim`` wide (192 for DeepSeek-V2/V3), its v
heads ``v_head_dim`` (128), only the ``qk_pos_emb_head_dim`` slice carries RoPE, and the softmax
scale depends on YaRN's ``mscale_all_dim``; Megatron's generic attention code assumes one head
width, RoPE over the whole head and any backend for any layer. This module answers four
questions at that boundary, one section each, in this order:

1. Layer metadata: head widths, softmax scale, the ``kv_channels`` other code reads, and which
   latent/query norms the layer has.
2. Packed (THD) sequences: a batch's parameters prepared once, RoPE over the whole packed
   batch, V padded only for kernels that need equal head dims, and either context-parallel
   layout (dev's ``cp_partition_mode``) taken by converting to the zigzag one MLA runs.
3. Attention backend: is ``--attention-backend`` an MLA path on this TE / GPU, decided at model
   build (else an :class:`MLACompatibilityError` naming the flag), and the core attention that
   runs it.
4. Pipeline offsets: the layer offset of every pipeline stage, per-layer lists by layer number.

Megatron calls in through one-line hooks (``patches/core_v0.NN``); each imports this module
inside the function it hooks, so no hunk touches an import block:

==== ======================================================= ============================= ====
Hook Upstream call site                                      Entry point                   Q
==== ======================================================= ============================= ====
H1   ``MultiLatentAttention.__init__`` (core attention)      ``core_attention_spec``       1, 3
H2   ``MLASelfAttention.get_query_key_value_tensors`` (top)  ``normalize_packed_seq``      2
H3   ``LanguageModule._set_attention_backend``               ``resolve_attention_backend`` 3
H4   ``MLATransformerConfig.__post_init__``                  ``check_config``              1
H5   ``_prepare_mla_core_attention_value`` (0.18+)           ``upstream_value_pad``        2
H6   ``TransformerLayer.__init__`` (up to 0.16)              ``per_layer_value``           4
H7   ``get_transformer_layer_offset`` (on entry)             ``pipeline_layer_offset``     4
H8   ``MLASelfAttention.get_query_key_value_tensors``        ``rotary_pos_emb_fn``         2
H9   ``MLASelfAttention._resolve_qk_norm_config`` (0.19+)    ``resolve_qk_norms``          1
H10  ``MultiLatentAttention.forward`` (dev: entry, return)   ``zigzag_cp_input``,          2
     and ``TransformerConfig.__post_init__`` (dev)           ``cp_layout_output``,
                                                             ``cp_layout_served``
==== ======================================================= ============================= ====

H9 says which norms the layer has (question 1). H1 sets the layer's softmax scale (1) and builds
the core attention the backend decision picked (3); it lives in section 3 with its two classes,
since all they add is how the chosen backend runs MLA (k/v widths, FlashAttention-2's V pad,
the local class's SDPA and THD paths).

Code that exists only until upstream fixes something sits between ``# >>> until upstream:`` and
``# <<<`` lines giving its patch's ``Obsolete-If`` (a contract probe of ``mla-seam drift``;
where it holds, ``mla-seam rebase`` drops the hook) or, where the patch has none yet, its
``Drop-When``, and the upstream issue or PR. Facts about a release come from the hook (an
argument its line's patch passes) or from capability checks (``hasattr``, signatures,
``is_te_min_version``), never from reading source.

State: one attribute, ``_mla_seam``, on a config (:class:`MLASeamState`) and on a THD
``PackedSeqParams`` (:class:`PackedBatch`, the batch's work shared by every layer); and, held
weakly per RoPE table (it lives as long as upstream keeps the table), its cos/sin
(:func:`rotation_table`). Nothing made during a CUDA graph capture is kept.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import inspect
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.utils import is_te_min_version, log_single_rank

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

__all__ = [
    # The hook entry points, H1 .. H10.
    "core_attention_spec",
    "normalize_packed_seq",
    "resolve_attention_backend",
    "check_config",
    "upstream_value_pad",
    "per_layer_value",
    "pipeline_layer_offset",
    "rotary_pos_emb_fn",
    "resolve_qk_norms",
    "zigzag_cp_input",
    "cp_layout_output",
    "cp_layout_served",
    # What their callers handle.
    "MLACompatibilityError",
    "BackendDecision",
]

logger = logging.getLogger(__name__)

#: ``strict`` (default): an ``--attention-backend`` with no MLA path fails at model build;
#: ``fallback``: the fastest supported backend runs instead, with a warning (question 3).
POLICY_ENV = "MLA_SEAM_BACKEND_POLICY"

#: ``deepseek`` (default): a ``q_lora_rank=None`` layer gets DeepSeek's plain query projection;
#: ``upstream``: the query-input RMSNorm of Megatron's QK-norm resolver (0.19+; question 1, H9).
QUERY_NORM_ENV = "MLA_SEAM_QUERY_NORM"

#: The one attribute the adapter sets, on a config and on a THD ``PackedSeqParams``.
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
        offset_logged: Whether an offset answered by the adapter (H7) was logged for the config.
        thd_shapes: THD batch shapes whose offsets were checked on the host (question 2), least
            recently seen first, at most ``_SHAPES_KEPT``.
    """

    backend: Optional[BackendDecision] = None
    offset_logged: bool = False
    thd_shapes: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)


def _state(config: TransformerConfig) -> MLASeamState:
    """The adapter's state on ``config``, created on first use."""
    found = getattr(config, STATE_ATTR, None)
    if not isinstance(found, MLASeamState):
        found = MLASeamState()
        setattr(config, STATE_ATTR, found)
    return found


def _log_once(level: int, message: str) -> None:
    """Log ``message`` on rank 0, once per process."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        log_single_rank(logger, level, message)


def _importable(module: str) -> bool:
    """Whether ``module`` can be imported here (a capability check; nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Question 1: layer metadata (H4; H9: which norms the layer has; H1 sets the scale, section 3)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MLAMetadata:
    """Head widths and softmax scale of one MLA layer.

    Attributes:
        k_channels: Width of a query/key head (``qk_head_dim + qk_pos_emb_head_dim``).
        v_channels: Width of a value head (``v_head_dim``), also the ``kv_channels`` H4 sets.
        softmax_scale: Scale applied to ``q @ k^T`` before the softmax.
        scale_source: How ``softmax_scale`` was obtained, for the build log.
    """

    k_channels: int
    v_channels: int
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
    return 0.1 * mscale * math.log(scaling_factor) + 1.0 if scaling_factor > 1 else 1.0


#: Head widths a config gives as they are (checked at H4) and widths a config may still derive
#: later in its ``__post_init__`` (dev's ``dsv4_hybrid``: from the first two; checked by
#: :func:`layer_metadata`, once the config is complete).
_GIVEN_WIDTHS = ("qk_pos_emb_head_dim", "v_head_dim")
_DERIVABLE_WIDTHS = ("qk_head_dim", "kv_lora_rank")


def _check_widths(config: MLATransformerConfig, fields: Tuple[str, ...]) -> None:
    """Raise :class:`MLACompatibilityError` naming the first of ``fields`` that is no positive
    integer (and its flag)."""
    for field in fields:
        value = getattr(config, field)
        if not isinstance(value, int) or value <= 0:
            flag = field.replace("_", "-")
            raise MLACompatibilityError(
                f"MLA needs a positive integer {field}, got {value!r}; set --{flag}."
            )


def layer_metadata(config: MLATransformerConfig) -> MLAMetadata:
    """Answer question 1 for ``config``: head widths and softmax scale.

    An explicit ``config.softmax_scale`` wins (upstream's MLA ignores it, PR #3698); else
    ``1/sqrt(k_channels)``, times ``yarn_mscale(factor, mscale_all_dim)^2`` for YaRN RoPE only
    (DeepSeek / HuggingFace).

    Read when a layer is built (H1) or the backend decided (H3), once ``__post_init__`` has
    finished: a config that derives head widths itself after H4 (dev's ``dsv4_hybrid`` variant
    re-derives ``qk_head_dim`` and ``kv_lora_rank`` from ``v_head_dim`` and
    ``qk_pos_emb_head_dim``) is read with the widths its layers get, and those widths are
    checked here, not at H4.

    Args:
        config: An ``MLATransformerConfig``.

    Returns:
        The layer's :class:`MLAMetadata`.

    Raises:
        MLACompatibilityError: ``qk_head_dim`` or ``kv_lora_rank`` is not a positive integer.
    """
    _check_widths(config, _DERIVABLE_WIDTHS)
    k_channels = config.qk_head_dim + config.qk_pos_emb_head_dim
    scale, source = 1.0 / math.sqrt(k_channels), f"1/sqrt({k_channels})"
    mscale_all_dim = getattr(config, "mscale_all_dim", 0.0) or 0.0
    if getattr(config, "softmax_scale", None) is not None:
        scale, source = float(config.softmax_scale), "config.softmax_scale"
    elif config.rope_type == "yarn" and mscale_all_dim:
        factor = yarn_mscale(config.rotary_scaling_factor, mscale_all_dim)
        scale = scale * factor * factor
        source = f"yarn mscale_all_dim={mscale_all_dim:g} factor={config.rotary_scaling_factor:g}"
    return MLAMetadata(k_channels, config.v_head_dim, scale, source)


def check_config(config: MLATransformerConfig) -> None:
    """Hook H4: validate MLA fields in ``MLATransformerConfig.__post_init__``.

    ``kv_channels`` defaults to ``hidden_size // num_attention_heads``, no MLA head width; where
    it still does, it becomes ``v_head_dim`` (attention output, local core attention, KV cache;
    also the head width of dev's ``dsv4_hybrid`` layers, whose q/k heads are ``v_head_dim``
    wide). The hook runs right after the base class's ``__post_init__``, before the rest of
    MLA's: ``qk_head_dim`` and ``kv_lora_rank``, which that rest may still derive, are checked
    when a layer reads them (:func:`layer_metadata`).

    Args:
        config: The config being initialized.

    Raises:
        MLACompatibilityError: A head width is not positive or the RoPE type is unknown.
    """
    if not getattr(config, "multi_latent_attention", False):
        return
    _check_widths(config, _GIVEN_WIDTHS)
    if config.rope_type not in ("rope", "yarn"):
        raise MLACompatibilityError(
            f"MLA rope_type must be 'rope' or 'yarn', got {config.rope_type!r} (--rope-type)."
        )
    default_kv = config.hidden_size // config.num_attention_heads
    if config.kv_channels == default_kv and default_kv != config.v_head_dim:
        config.kv_channels = config.v_head_dim


# >>> until upstream: the query-input norm of the QK-norm resolver (H9) -----------------------
# Obsolete-If: mla.qk_norm_resolver=false. Drop-When: the resolver builds no query-input norm
#     for q_lora_rank=None. Upstream: none filed; the resolver is NVIDIA/Megatron-LM PR #4452
#     (core_v0.19.0); upstream main still adds the norm, dev removed the resolver (2026-08:
#     dev's series has no H9).


def _query_norm_policy() -> str:
    """``upstream`` when the user asked for upstream's query-input norm, else ``deepseek``."""
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

    For ``qk_layernorm=True`` and ``q_lora_rank=None`` upstream's resolver fuses an RMSNorm into
    ``linear_q_proj``, a query-input norm DeepSeek's layer lacks (HF checkpoints have no weight
    for it), and rejects the local spec. Such a layer gets the spec's plain ``linear_q_proj`` and
    no query norm, the rest as upstream resolves it (``MLA_SEAM_QUERY_NORM=upstream``: all of
    it). Other layers (query LoRA, no QK norm, a spec fusing ``linear_q_proj``, DSA) are upstream's.

    Args:
        attention: The ``MLASelfAttention`` being built.
        submodules: Its ``MLASelfAttentionSubmodules``.
        resolver_cls: Upstream's resolver class.

    Returns:
        The resolver's mapping (``linear_q_proj``, ``linear_q_up_proj``, ``q_layernorm``, ...).
    """
    config = attention.config
    resolver = resolver_cls(config, submodules)
    fused = getattr(resolver, "fused_norm_linear_impl", None)
    spec = submodules.linear_q_proj
    applies = (
        config.q_lora_rank is None
        and config.qk_layernorm
        and not getattr(config, "qk_l2_norm", False)
        and getattr(config, "experimental_attention_variant", None) is None
        and not (fused is not None and getattr(spec, "module", spec) is fused)
    )
    if not applies or _query_norm_policy() == "upstream":
        return resolver.resolve()
    # The kv side does not depend on the query LoRA; only the no-LoRA branch adds the query
    # norm. Resolve the layer as if it had a query LoRA and keep the kv answer.
    with_q_lora = copy.copy(config)
    with_q_lora.q_lora_rank = config.kv_lora_rank
    resolved = resolver_cls(with_q_lora, submodules).resolve()
    resolved.update(
        linear_q_proj=spec or resolver.linear_impl,
        linear_q_up_proj=IdentityOp,
        q_layernorm=IdentityOp,
    )
    return resolved


def _describe_query_norm(config: MLATransformerConfig) -> str:
    """The build log's ``query_norm=..`` part, on releases whose resolver could add the norm."""
    if config.q_lora_rank is not None or not config.qk_layernorm:
        return ""
    if not _importable("megatron.core.transformer.mla_qk_norm_config"):
        return ""
    if _query_norm_policy() == "upstream":
        return f"query_norm=upstream ({QUERY_NORM_ENV}=upstream: fused RMSNorm on the query input) "
    return "query_norm=none (DeepSeek: no query-input norm without q_lora_rank) "


# <<< the query-input norm of the QK-norm resolver (H9) ---------------------------------------


# ---------------------------------------------------------------------------------------------
# Question 2: packed (THD) sequences (H2, H8, H5)
# ---------------------------------------------------------------------------------------------

_OFFSETS = ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")

#: Checked THD batch shapes a config remembers (:attr:`MLASeamState.thd_shapes`).
_SHAPES_KEPT = 256


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (nothing may be read back then)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


@dataclasses.dataclass
class PackedBatch:
    """The adapter's work for one THD batch (on its ``PackedSeqParams``, as ``_mla_seam``).

    A batch that carries ``max_seqlen_q/kv``, of a shape checked before, costs no host read:
    what the layers need from its offsets is computed on the device, once per batch
    (:meth:`memo`), or per layer call while a CUDA graph is captured. A batch is its
    ``PackedSeqParams`` object: offsets rewritten in place belong to the next one.

    Attributes:
        rope_params: The parameters QKV and RoPE use: a copy whose ``cu_seqlens_*`` are the
            padded offsets where those are other tensors, else the batch's own parameters.
        captured: Prepared during a CUDA graph capture; nothing is kept on such a batch.
        host: The offsets on the host per ``PackedSeqParams`` field, once read (the batch's
            checks, or the local spec's per-sequence path), else ``None``.
        cached: Per key: ``(sources, value)``, a device tensor made from the offsets (RoPE
            positions, the local spec's gather indices, a whole RoPE table), reused while its
            sources are the same objects.
    """

    rope_params: Any
    captured: bool = False
    host: Optional[Dict[str, Optional[List[int]]]] = None
    cached: Dict[tuple, tuple] = dataclasses.field(default_factory=dict)

    @classmethod
    def prepare(
        cls,
        config: MLATransformerConfig,
        params: PackedSeqParams,
        hidden_states: Optional[torch.Tensor],
    ) -> PackedBatch:
        """Complete, check and record THD ``params``: the one preparation step of a batch.

        A missing kv side mirrors the q side; dtype and rank of every offsets tensor are checked.
        The checks that need the offsets' values bring them to the host (one copy per tensor:
        a device sync) for the first batch of each shape (:func:`_batch_shape`, remembered on
        the config) and for every batch without ``max_seqlen_q/kv``, whose sizes they fill
        (logged once). Inside a CUDA graph capture nothing is read: the sizes must be given.
        The work is recorded on ``params`` (and its RoPE view), where later layers find it
        (:func:`packed_batch`). Whatever a batch needs beyond this (another context-parallel
        layout, separate q/kv sizes) belongs here.

        Returns:
            The batch's work.
        """
        if params.cu_seqlens_q is None:
            raise MLACompatibilityError(
                "PackedSeqParams(qkv_format='thd') without cu_seqlens_q: build it from the "
                "per-sequence lengths (cumulative sum starting at 0, int32)."
            )
        if params.cu_seqlens_kv is None:
            params.cu_seqlens_kv = params.cu_seqlens_q
        if getattr(params, "cu_seqlens_kv_padded", None) is None:
            params.cu_seqlens_kv_padded = getattr(params, "cu_seqlens_q_padded", None)
        for name in _OFFSETS:
            _check_offsets_tensor(name, getattr(params, name, None))
        sized = params.max_seqlen_q is not None and params.max_seqlen_kv is not None
        capturing = _capturing()
        shapes = _state(config).thd_shapes
        shape = _batch_shape(params, hidden_states)
        host = None
        if sized and shape in shapes:
            shapes.move_to_end(shape)
        elif capturing and sized:
            _log_once(
                logging.WARNING,
                "mla-seam: a THD batch shape first seen inside a CUDA graph capture was not "
                "checked (a capture cannot read its offsets); run one eager step of that shape "
                "first to have them checked.",
            )
        else:
            host = _read_offsets(params, "without max_seqlen_q/max_seqlen_kv it sizes the batch")
            if not sized:
                _log_once(
                    logging.WARNING,
                    "mla-seam: THD batches without max_seqlen_q/max_seqlen_kv: the adapter "
                    "reads cu_seqlens on the host to size them (one device sync per batch, no "
                    "CUDA graph capture); pass both (Megatron's data path does) for none.",
                )
            _check_offsets(config, params, host, hidden_states)
            if sized:
                shapes[shape] = None
                if len(shapes) > _SHAPES_KEPT:
                    shapes.popitem(last=False)
        rope_params = _rope_view(params) or params
        batch = cls(rope_params, captured=capturing, host=host)
        setattr(params, STATE_ATTR, batch)
        if batch.rope_params is not params:
            setattr(batch.rope_params, STATE_ATTR, batch)
        return batch

    def memo(
        self, key: tuple, sources: tuple, make: Callable[[], Any], local: Optional[dict] = None
    ) -> Any:
        """``make()``, kept on the batch per ``key`` while ``sources`` are the same objects.

        During a CUDA graph capture (or on a batch prepared in one) it is kept in ``local``
        (one layer call's dict) instead: a tensor made in a capture holds its values only on
        replay, and one made before it would be a constant of the graph.

        Args:
            key: What the value is (kind and sizes).
            sources: The objects it is made from (offsets tensors, a RoPE module).
            make: Makes the value.
            local: The dict of the current layer call, or ``None``: not kept.

        Returns:
            The value.
        """
        store = local if self.captured or _capturing() else self.cached
        if store is None:
            return make()
        found = store.get(key)
        if found is None or any(a is not b for a, b in zip(found[0], sources)):
            found = (sources, make())
            store[key] = found
        return found[1]

    def offsets_on_host(self, params: PackedSeqParams, why: str) -> Dict[str, Optional[List[int]]]:
        """The batch's offsets on the host, read once (a device sync) where not read yet.

        Args:
            params: The batch's ``PackedSeqParams``.
            why: What needs them, for the error inside a CUDA graph capture.

        Returns:
            Per ``PackedSeqParams`` field, its offsets (``None`` where absent).
        """
        if self.host is None:
            self.host = _read_offsets(params, why)
        return self.host


def packed_batch(packed_seq_params: Optional[PackedSeqParams]) -> Optional[PackedBatch]:
    """The :class:`PackedBatch` of THD parameters already prepared, else ``None``.

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

    Non-THD packed parameters carry nothing for RoPE or the QKV shapes (upstream squeezes dim 1
    and sizes RoPE from ``max_seqlen`` for any of them): ``None``; core attention still gets the
    original. THD parameters are prepared once per batch (:meth:`PackedBatch.prepare`). Their
    tokens sit at the padded offsets, where RoPE must split them; 0.13.x hands RoPE the unpadded
    ones (fixed in core_v0.14.0), so QKV/RoPE get a copy whose ``cu_seqlens_*`` ARE the padded
    offsets where those are given (later lines compute the same).

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
        batch = PackedBatch.prepare(attention.config, packed_seq_params, hidden_states)
    return batch.rope_params


def _batch_shape(params: PackedSeqParams, hidden_states: Optional[torch.Tensor]) -> tuple:
    """What a batch's host checks depend on besides its values: tokens, offsets sizes, sharing.

    Two batches of one shape differ only in the values of their offsets and sizes; the checks
    run on the first batch of each shape (and every batch without sizes).
    """
    tensors = [getattr(params, name, None) for name in _OFFSETS]
    sizes = tuple(None if t is None else t.numel() for t in tensors)
    shared = tuple(tensors[i] is tensors[j] for i in range(4) for j in range(i + 1, 4))
    tokens = None if hidden_states is None else hidden_states.size(0)
    return (tokens, sizes, shared)


def _check_offsets_tensor(name: str, offsets: Optional[torch.Tensor]) -> None:
    """What ``offsets`` must be without reading it: an int32 tensor, 1-D, two entries or more."""
    if offsets is None:
        return
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int32:
        kind = offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets).__name__
        raise MLACompatibilityError(
            f"PackedSeqParams.{name} must be an int32 tensor (the attention kernels read it as "
            f"int32), got {kind}; build it with dtype=torch.int32."
        )
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise MLACompatibilityError(
            f"PackedSeqParams.{name} must be 1-D, start at 0 and have one entry per sequence "
            f"plus one, got shape {tuple(offsets.shape)}."
        )


def _read_offsets(params: PackedSeqParams, why: str) -> Dict[str, Optional[List[int]]]:
    """Every offsets field of ``params`` on the host: one copy (a device sync) per tensor."""
    if _capturing():
        raise MLACompatibilityError(
            "The MLA adapter needs this THD batch's cu_seqlens on the host, which a CUDA graph "
            f"capture cannot read ({why}). Capture THD batches with max_seqlen_q/max_seqlen_kv "
            "given, after one eager step of the same shape."
        )
    host: Dict[str, Optional[List[int]]] = {}
    copied: Dict[int, Optional[List[int]]] = {}  # kv is often q's tensor, padded the actual one
    for name in _OFFSETS:
        offsets = getattr(params, name, None)
        if id(offsets) not in copied:
            copied[id(offsets)] = None if offsets is None else offsets.tolist()
        host[name] = copied[id(offsets)]
    return host


def _check_offsets(
    config: MLATransformerConfig,
    params: PackedSeqParams,
    host: Dict[str, Optional[List[int]]],
    hidden_states: Optional[torch.Tensor],
) -> None:
    """The checks of a batch that need its offsets' values; fills missing ``max_seqlen_*``."""
    for name in _OFFSETS:
        values = host[name]
        if values is None:
            continue
        if values[0] != 0:
            raise MLACompatibilityError(
                f"PackedSeqParams.{name} must be 1-D, start at 0 and have one entry per "
                f"sequence plus one, got {values[:8]}..."
            )
        for index, (start, end) in enumerate(zip(values, values[1:])):
            if end < start:
                raise MLACompatibilityError(
                    f"PackedSeqParams.{name} must never decrease, but entry {index + 1} ({end}) "
                    f"is below entry {index} ({start}): {values[:8]}..."
                )
    for side in ("q", "kv"):
        actual = host[f"cu_seqlens_{side}"]
        padded = host[f"cu_seqlens_{side}_padded"] or actual
        _check_padding(side, actual, padded)
        if getattr(params, f"max_seqlen_{side}") is None:
            setattr(params, f"max_seqlen_{side}", max(_lengths(padded), default=0))
    padded_q = host["cu_seqlens_q_padded"] or host["cu_seqlens_q"]
    padded_kv = host["cu_seqlens_kv_padded"] or host["cu_seqlens_kv"]
    _check_thd_shape(config, params, padded_q, padded_kv, hidden_states)
    _check_thd_backend(config, host)


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


def _check_thd_backend(config: MLATransformerConfig, host: Dict[str, Optional[List[int]]]) -> None:
    decision = backend_decision(config)
    padded = host["cu_seqlens_q_padded"]
    if decision is None or decision.backend != "unfused" or padded is None:
        return
    # TE 2.16 turns UnfusedDotProductAttention off for THD with padding between sequences
    # (NVIDIA/TransformerEngine PR #2596). TE has no public query for its backend filters, so
    # its version tells (a 2.16 dev build reads as older: TE's own NoBackend error then says it).
    if padded == host["cu_seqlens_q"] or not (HAVE_TE and is_te_min_version("2.16.0")):
        return
    raise MLACompatibilityError(
        f"{_BACKEND_FLAG} unfused cannot run THD batches with padding between sequences "
        "(cu_seqlens_q_padded != cu_seqlens_q): this Transformer Engine disables its unfused "
        f"attention for pad_between_seqs. Use {_BACKEND_FLAG} fused or auto, or pack without "
        "padding."
    )


def _rope_view(params: PackedSeqParams) -> Optional[PackedSeqParams]:
    """A copy of THD ``params`` with the padded offsets as ``cu_seqlens_*`` (``None``: same).

    Where the padded offsets are another tensor they are used, equal or not (no comparison:
    that would read both back); the positions are the same when they are equal.
    """
    changes = {}
    for side in ("q", "kv"):
        padded = getattr(params, f"cu_seqlens_{side}_padded", None)
        if padded is not None and padded is not getattr(params, f"cu_seqlens_{side}"):
            changes[f"cu_seqlens_{side}"] = padded
    if not changes:
        return None
    view = copy.copy(params)  # a shallow copy: no __post_init__ recomputation
    for name, value in changes.items():
        setattr(view, name, value)
    return view


def thd_tokens(
    cu_seqlens: torch.Tensor, tokens: int, cp_size: int = 1
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each of a rank's THD tokens sits, on the offsets' device, no host read.

    Args:
        cu_seqlens: Global (padded) offsets, ``[sequences + 1]`` int32.
        tokens: Local token count (``cu_seqlens[-1] / cp_size``).
        cp_size: Context-parallel size (a rank holds ``1 / cp_size`` of every sequence).

    Returns:
        ``(sequence, local, offsets)``: per token its sequence (int64) and its index among the
        rank's tokens of that sequence (``[tokens]``, the offsets' dtype), and the rank's
        offsets (``cu_seqlens / cp_size``).
    """
    offsets = cu_seqlens
    if cp_size > 1:
        offsets = torch.div(cu_seqlens, cp_size, rounding_mode="floor")
    sequences = offsets.numel() - 1
    index = torch.arange(tokens, device=offsets.device, dtype=offsets.dtype)
    sequence = torch.searchsorted(offsets.narrow(0, 1, sequences), index, right=True)
    sequence = sequence.clamp_(max=sequences - 1)  # tokens past the last offset: the last one
    return sequence, index - offsets.index_select(0, sequence), offsets


def _zigzag_positions(
    local: torch.Tensor, length: torch.Tensor, cp_size: int, cp_rank: int
) -> torch.Tensor:
    """Megatron's load-balanced THD split: a rank holds chunks ``cp_rank`` and
    ``2 * cp_size - 1 - cp_rank`` of every (padded) sequence; ``length`` is the rank's share."""
    half = length // 2
    return torch.where(
        local < half, cp_rank * half + local, cp_size * length - (cp_rank + 2) * half + local
    )


#: Context-parallel THD layouts: name -> the global positions of a rank's local tokens, from
#: ``(local index, the rank's share of the sequence, cp_size, cp_rank)``.
CP_LAYOUTS: Dict[str, Callable[..., torch.Tensor]] = {"zigzag": _zigzag_positions}


def thd_positions(
    cu_seqlens: torch.Tensor,
    tokens: int,
    cp_size: int = 1,
    cp_rank: int = 0,
    cp_layout: str = "zigzag",
    from_batch_start: bool = False,
) -> torch.Tensor:
    """The RoPE position of every local token of a THD batch, on the offsets' device, no host read.

    Positions restart at 0 at every sequence (``from_batch_start``: they count from the start
    of the packed batch instead, for a table that covers the whole batch). Under context
    parallelism a rank's tokens get their global positions by ``cp_layout``
    (:data:`CP_LAYOUTS`; Megatron's load-balanced split is ``zigzag``).

    Args:
        cu_seqlens: Global (padded) offsets, ``[sequences + 1]``.
        tokens: Local token count (``cu_seqlens[-1] / cp_size``).
        cp_size: Context-parallel size.
        cp_rank: This rank in the context-parallel group.
        cp_layout: How sequences are split over the context-parallel ranks.
        from_batch_start: Add each sequence's start offset.

    Returns:
        ``[tokens]`` positions (the offsets' dtype).
    """
    sequence, local, offsets = thd_tokens(cu_seqlens, tokens, cp_size)
    if cp_size > 1:
        share = torch.diff(offsets).index_select(0, sequence)
        local = CP_LAYOUTS[cp_layout](local, share, cp_size, cp_rank)
    if from_batch_start:
        local = local + cu_seqlens.index_select(0, sequence)
    return local


# >>> until upstream: THD RoPE one sequence at a time (H8) -----------------------------------
# Obsolete-If: none in the patch yet. Drop-When: rope_utils' THD path is vectorized.
# Upstream: none filed; upstream main replaced the loop (NVIDIA/Megatron-LM PR #5944), no
#     release has it yet. The whole-table part (0.13's YaRN cuts its table per CP rank for
#     packed batches too) goes with the last line whose rotary forward lacks ``packed_seq``.


def rotary_pos_emb_fn(
    attention: MultiLatentAttention, packed_seq_params: Optional[PackedSeqParams]
) -> Callable[..., torch.Tensor]:
    """Hook H8: the function MLA's QKV code applies RoPE with, for this batch.

    Up to 0.19 ``rope_utils`` rotates a THD batch one sequence at a time in Python, so a layer's
    cost grows with the number of sequences. For a prepared THD batch with RoPE fusion off (the
    fused kernels take the offsets themselves) the returned function rotates the whole batch in
    one pass with upstream's arithmetic: positions made on the device once per batch
    (:func:`thd_positions`), the cos/sin of the table (:func:`rotation_table`, once per table)
    gathered at them once for the layer's q and k; where the RoPE module cuts its table per CP
    rank even for packed batches (0.13's YaRN), with the whole table. Otherwise: upstream's
    ``apply_rotary_pos_emb``.

    Args:
        attention: The MLA module.
        packed_seq_params: The parameters :func:`normalize_packed_seq` returned.

    Returns:
        A function with upstream's ``apply_rotary_pos_emb`` signature.

    Raises:
        MLACompatibilityError: RoPE fusion on a THD batch where the release cuts the table per
            CP rank (the fused kernels would rotate at wrong positions).
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
    # The dict is this layer call's: its q and k share what it keeps (a capture keeps nothing
    # on the batch, see PackedBatch.memo).
    return functools.partial(_packed_rotary_pos_emb, batch, upstream, rotary, {})


def _slices_packed_tables(attention: MultiLatentAttention) -> bool:
    """Whether the layer's RoPE module cuts its table per CP rank for packed batches too.

    A THD rank holds two chunks of every sequence and needs the whole table; rotary modules that
    know it take ``packed_seq``, one with a CP group and no such argument (0.13's YaRN) cuts.
    """
    rotary = getattr(attention, "rotary_pos_emb", None)
    group = getattr(rotary, "cp_group", None)
    if group is None or group.size() < 2:
        return False
    return not _forward_takes_packed_seq(type(rotary))


@functools.lru_cache(maxsize=None)
def _forward_takes_packed_seq(cls: type) -> bool:
    return "packed_seq" in inspect.signature(cls.forward).parameters


def _whole_table(rotary: torch.nn.Module, length: int) -> torch.Tensor:
    """``rotary``'s table of ``length`` positions, not cut per CP rank."""
    # The module's forward may memoize per length (0.13's YaRN: ``lru_cache``), which would
    # hand back the cut table: call the function under the cache.
    forward = inspect.unwrap(type(rotary).forward)
    group = rotary.cp_group
    rotary.cp_group = None  # the module cuts the table only when it has a CP group
    try:
        table = forward(rotary, length)
    finally:
        rotary.cp_group = group
    return table[0] if isinstance(table, tuple) else table


#: Options of upstream's ``apply_rotary_pos_emb`` the one-pass path computes itself (each where
#: the release's function takes it: ``inverse``, ``mla_output_remove_interleaving`` and
#: ``max_seqlen`` on upstream main and dev, 2026-08); a call with any other goes to upstream.
_PACKED_OPTIONS = frozenset(
    ("mla_rotary_interleaved", "inverse", "mla_output_remove_interleaving", "max_seqlen")
)


@functools.lru_cache(maxsize=None)
def _takes(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` has a parameter ``name`` (upstream's RoPE contract, by signature)."""
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _packed_rotary_pos_emb(
    batch: PackedBatch,
    upstream: Callable[..., torch.Tensor],
    rotary: Optional[torch.nn.Module],
    layer_call: dict,
    t: torch.Tensor,
    freqs: torch.Tensor,
    config: TransformerConfig,
    cu_seqlens: Optional[torch.Tensor] = None,
    mscale: float = 1.0,
    cp_group: Optional[torch.distributed.ProcessGroup] = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Upstream's THD RoPE contract in one pass (the options :data:`_PACKED_OPTIONS` names).

    ``max_seqlen`` (main and dev): a table longer than it covers the whole packed batch, and
    positions count from the batch's start (upstream's rule; MLA passes ``max_seqlen_q`` for q
    and ``max_seqlen_kv`` for k on dev, their maximum for both on main). Where upstream takes
    ``max_seqlen`` and none is given (main reads the offsets then; dev refuses), upstream runs.
    """
    max_seqlen = kwargs.get("max_seqlen")
    if (
        cu_seqlens is None
        or not _PACKED_OPTIONS.issuperset(kwargs)
        or not isinstance(freqs, torch.Tensor)
        or getattr(config, "mrope_section", None) is not None
        or any(not _takes(upstream, name) for name in kwargs)
        or (max_seqlen is None and _takes(upstream, "max_seqlen"))
    ):
        return upstream(
            t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group, **kwargs
        )
    if cp_group is None:
        cp_group = parallel_state.get_context_parallel_group()
    mla_rotary_interleaved = kwargs.get("mla_rotary_interleaved")
    if mla_rotary_interleaved is None:
        mla_rotary_interleaved = config.multi_latent_attention
    inverse = bool(kwargs.get("inverse", False))
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    if rotary is not None:  # the table MLA computed is this rank's bshd chunks only
        length = freqs.size(0) * cp_size
        key = ("table", id(rotary), length)
        freqs = batch.memo(key, (rotary,), lambda: _whole_table(rotary, length), layer_call)
    table_len, tokens = freqs.size(0), t.size(0)
    whole_batch = max_seqlen is not None and table_len > max_seqlen

    def _positions() -> torch.Tensor:  # padding tokens past the table take its last row
        at = thd_positions(cu_seqlens, tokens, cp_size, cp_rank, from_batch_start=whole_batch)
        return at.clamp_(max=table_len - 1)

    key = ("positions", tokens, cp_size, cp_rank, table_len, whole_batch)
    at = batch.memo(key, (cu_seqlens,), _positions, layer_call)
    key = ("rotation", t.dtype, mscale, config.rotary_interleaved, inverse)
    rotation = layer_call.get(key)
    if rotation is None or rotation[0] is not freqs or rotation[1] is not at:
        table = rotation_table(freqs, t.dtype, mscale, config.rotary_interleaved, inverse)
        rotation = layer_call[key] = (freqs, at, table.index_select(0, at))
    remove_interleaving = bool(kwargs.get("mla_output_remove_interleaving", False))
    return rotate_packed(
        t, rotation[2], config.rotary_interleaved, mla_rotary_interleaved, remove_interleaving
    )


#: Per RoPE table (upstream's memoized ``freqs``, or the tensor a slice of it views): per view
#: and arithmetic, its :func:`rotation_table`. An entry lives as long as its table.
_ROTATIONS = WeakIdKeyDictionary()


def rotation_table(
    freqs: torch.Tensor,
    dtype: torch.dtype,
    mscale: float = 1.0,
    rotary_interleaved: bool = False,
    inverse: bool = False,
) -> torch.Tensor:
    """cos and sin of every position of ``freqs``, as :func:`rotate_packed` takes them.

    Upstream's values (cos/sin scaled by ``mscale``, rounded to ``dtype``; sin negated for the
    inverse rotation), side by side: ``[cos, sin]`` with sin negated where the rotation negates
    ``x`` (exactly: negation rounds nowhere), so a rotation is one product and one sum. Kept
    per table while it lives (made outside CUDA graph capture only; its values depend on the
    table alone).

    Args:
        freqs: ``[max_len, 1, 1, rot_dim]`` frequencies.
        dtype: The dtype of the tensors it rotates.
        mscale: YaRN's cos/sin scale.
        rotary_interleaved: Rotate interleaved pairs instead of halves.
        inverse: The inverse rotation (upstream's ``inverse=True``).

    Returns:
        ``[max_len, 2 * rot_dim]`` in ``dtype``.
    """
    base = freqs if freqs._base is None else freqs._base  # pylint: disable=protected-access
    view = (freqs.storage_offset(), tuple(freqs.shape), freqs.stride())
    key = (view, dtype, mscale, rotary_interleaved, inverse)
    kept = _ROTATIONS.get(base)
    found = None if kept is None else kept.get(key)
    if found is not None and found[0] == base._version:
        return found[1]
    rot_dim = freqs.size(-1)
    angles = freqs.reshape(freqs.size(0), rot_dim)
    cos, sin = torch.cos(angles), torch.sin(angles)
    if mscale != 1.0:  # x * 1.0 == x: upstream's product by 1 changes no bit
        cos, sin = cos * mscale, sin * mscale
    cos, sin = cos.to(dtype), sin.to(dtype)
    if inverse:
        sin = -sin
    if rotary_interleaved:  # x -> (-x1, x0, -x3, x2, ...)
        even, odd = sin.unflatten(-1, (-1, 2)).unbind(-1)
        table = torch.cat((cos, torch.stack((-even, odd), dim=-1).flatten(-2)), dim=-1)
    else:  # x -> (-x2, x1)
        first, second = sin.chunk(2, dim=-1)
        table = torch.cat((cos, -first, second), dim=-1)
    if not _capturing():
        _ROTATIONS.setdefault(base, {})[key] = (base._version, table)
    return table


def rotate_packed(
    t: torch.Tensor,
    rotation: torch.Tensor,
    rotary_interleaved: bool = False,
    mla_rotary_interleaved: bool = False,
    remove_interleaving: bool = False,
) -> torch.Tensor:
    """Rotate a packed ``[tokens, heads, dim]`` tensor by :func:`rotation_table`'s rows.

    ``x * cos + rotate(x) * sin`` as upstream computes it, each product rounded to ``t``'s
    dtype before the sum: the products of ``[x, swap(x)]`` with ``[cos, +-sin]``, added.

    Args:
        t: ``[tokens, heads, dim]`` (or ``[tokens, 1, dim]``); the first ``rot_dim`` channels
            rotate, the rest pass.
        rotation: ``[tokens, 2 * rot_dim]``: each token's row of :func:`rotation_table`.
        rotary_interleaved: Rotate interleaved pairs instead of halves.
        mla_rotary_interleaved: MLA's layout: de-interleave the rotary channels first.
        remove_interleaving: With ``mla_rotary_interleaved``, interleave the rotated channels
            back (upstream's ``mla_output_remove_interleaving``).

    Returns:
        The rotated tensor, same shape and dtype.
    """
    rot_dim = rotation.size(-1) // 2
    x = t if t.size(-1) == rot_dim else t.narrow(-1, 0, rot_dim)
    pairs = x.shape[:-1] + (rot_dim // 2, 2)  # views, not Python indexing: no host work
    if mla_rotary_interleaved:
        even, odd = x.reshape(pairs).unbind(-1)
        parts = [even, odd]
    else:
        parts = [x]
    if not rotary_interleaved:  # (x1, x2) -> (x2, x1)
        first, second = (even, odd) if mla_rotary_interleaved else x.chunk(2, dim=-1)
        both = torch.cat(parts + [second, first], dim=-1)
    else:  # (x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...)
        x = torch.cat(parts, dim=-1) if mla_rotary_interleaved else x
        even, odd = x.reshape(pairs).unbind(-1)
        both = torch.cat((x, torch.stack((odd, even), dim=-1).flatten(-2)), dim=-1)
    products = both * rotation.view(t.size(0), *([1] * (t.dim() - 2)), 2 * rot_dim)
    out = torch.add(*products.view(products.shape[:-1] + (2, rot_dim)).unbind(-2))
    if mla_rotary_interleaved and remove_interleaving:  # (x0, x2, .., x1, x3, ..) -> (x0, x1, ..)
        out = torch.stack(out.chunk(2, dim=-1), dim=-1).flatten(-2)
    if t.size(-1) == rot_dim:
        return out
    return torch.cat((out, t.narrow(-1, rot_dim, t.size(-1) - rot_dim)), dim=-1)


def apply_rotary_packed(
    t: torch.Tensor,
    freqs: torch.Tensor,
    positions: torch.Tensor,
    rotary_interleaved: bool = False,
    mla_rotary_interleaved: bool = False,
    mscale: float = 1.0,
) -> torch.Tensor:
    """Rotate a packed ``[tokens, heads, dim]`` tensor, each token at its own position.

    Upstream's arithmetic (cos/sin of ``freqs`` scaled by ``mscale``, rounded to ``t``'s dtype,
    ``t * cos + rotate_half(t) * sin``) for every token in one pass: :func:`rotation_table` at
    the positions, then :func:`rotate_packed`.

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
    positions = positions.clamp(max=freqs.size(0) - 1)  # padding tokens past the table
    table = rotation_table(freqs, t.dtype, mscale, rotary_interleaved)
    return rotate_packed(
        t, table.index_select(0, positions), rotary_interleaved, mla_rotary_interleaved
    )


# <<< THD RoPE one sequence at a time (H8) ---------------------------------------------------


# >>> until upstream: the unconditional V pad of packed batches (H5) -------------------------
# Obsolete-If: mla.value_pad_helper=false. Drop-When: upstream gates the pad on the selected
#     attention backend. Upstream: NVIDIA/Megatron-LM PR #3003 (the pad, core_v0.18.0).


def upstream_value_pad(attention: MultiLatentAttention, need_v_pad: bool) -> bool:
    """Hook H5: keep upstream's V pad (every THD call, 0.18+) off; the adapter pads where needed.

    Only FlashAttention-2 needs equal head dims; the pad costs time on cuDNN and unfused
    attention. The adapter's core attention pads as :attr:`BackendDecision.pad_value` says.

    Args:
        attention: The MLA module.
        need_v_pad: Upstream's own verdict.

    Returns:
        ``False`` when the core attention was built through the adapter, else ``need_v_pad``.
    """
    if getattr(attention.core_attention, "_mla_pad_value", None) is None:
        return need_v_pad
    return False


# <<< the unconditional V pad of packed batches (H5) -----------------------------------------


# >>> until upstream: MLA takes its input in the zigzag CP layout only (H10) ------------------
# Obsolete-If: mla.cp_layout=converts. Drop-When: MultiLatentAttention.forward converts its
#     input to the zigzag layout itself, as Attention.forward does, and TransformerConfig takes
#     cp_partition_mode='contiguous' with MLA. Upstream: none filed; the layouts are
#     NVIDIA/Megatron-LM PR #6387 (dev, 2026-08: MLA raises "CP partition conversion must be
#     handled before entering MLA", and the config refuses MLA outside dsv4_hybrid).

#: The context-parallel layout MLA's RoPE and core attention take (TE's THD context
#: parallelism and :data:`CP_LAYOUTS`): two chunks of every sequence per rank.
_MLA_CP_LAYOUT = "zigzag"

#: Attention variants whose MLA layers are ``MultiLatentAttention`` (H10 converts their input):
#: none, and the linear-attention hybrids whose full-attention layers are MLA. Other variants
#: build their own attention class (DSA's absorbed MLA), which upstream's rules govern.
_CONVERTED_VARIANTS = (None, "gated_delta_net")


def cp_layout_served(config: TransformerConfig) -> bool:
    """Hook H10 (``TransformerConfig.__post_init__``): whether MLA layers take the config's
    context-parallel layout.

    Upstream refuses ``cp_partition_mode='contiguous'`` with MLA under context parallelism
    (outside ``dsv4_hybrid``), since ``MultiLatentAttention`` takes zigzag batches only. With
    the adapter MLA converts its input to zigzag and its output back (:func:`zigzag_cp_input`),
    with upstream's converter, as upstream's ``Attention`` does. Called where upstream refuses.

    Args:
        config: The config being initialized.

    Returns:
        ``True`` where the adapter serves the layout (upstream's other rules for the layout
        stand), ``False`` for a variant building its own MLA class (upstream's refusal stands).

    Raises:
        MLACompatibilityError: The conversion cannot run with this config (a CUDA graph of the
            whole iteration); the message names the field and the value that works.
    """
    if getattr(config, "experimental_attention_variant", None) not in _CONVERTED_VARIANTS:
        return False
    if getattr(config, "cuda_graph_impl", None) == "full_iteration":
        raise MLACompatibilityError(
            f"cp_partition_mode={config.cp_partition_mode!r} with MLA under context parallelism: "
            f"MLA layers take their input in the {_MLA_CP_LAYOUT} layout, converted and converted "
            "back in every layer, which a CUDA graph of the whole iteration cannot hold "
            f"(cuda_graph_impl='full_iteration'). Use cp_partition_mode='{_MLA_CP_LAYOUT}' "
            f"(--cp-partition-mode {_MLA_CP_LAYOUT}), or another --cuda-graph-impl."
        )
    return True


def zigzag_cp_input(
    attention: MultiLatentAttention,
    hidden_states: torch.Tensor,
    packed_seq_params: Optional[PackedSeqParams],
    attention_mask: Optional[torch.Tensor] = None,
    key_value_states: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Any]:
    """Hook H10 (``MultiLatentAttention.forward``): MLA's input in the zigzag CP layout.

    The model's layout is ``config.cp_partition_mode``; where it is not zigzag (and the layer's
    context-parallel group has two ranks or more), upstream's
    ``convert_module_input_tensors_cp_partition_mode`` moves the rank's tokens to the zigzag
    layout, exactly as ``Attention.forward`` does (each rank then holds what upstream's zigzag
    path gives it: RoPE positions, chunks and kernels are that path's), and the converter it
    returns takes the output back (:func:`cp_layout_output`). A THD batch without a prebuilt
    route (``PackedSeqParams.cp_partition_route``) gets one, once per batch, with upstream's
    ``prebuild_thd_cp_partition_routes`` (one read of its offsets).

    Args:
        attention: The MLA module (its config and ``pg_collection``, the CP group already
            swapped for a dynamic one).
        hidden_states: The layer input in the model's layout.
        packed_seq_params: ``PackedSeqParams`` or ``None``.
        attention_mask: A dense mask (upstream refuses one where tokens move).
        key_value_states: Cross-attention states (upstream refuses them where tokens move).

    Returns:
        ``(hidden_states, back)``: the input in the zigzag layout, and upstream's converter back
        to the model's layout (``None`` where nothing moved).

    Raises:
        MLACompatibilityError: The batch says another layout than the model, or a route would
            have to be built inside a CUDA graph capture.
    """
    config = attention.config
    cp_group = attention.pg_collection.cp
    layout = getattr(config, "cp_partition_mode", _MLA_CP_LAYOUT)
    if cp_group is None or cp_group.size() < 2:
        return hidden_states, None
    thd = getattr(packed_seq_params, "qkv_format", None) == "thd"
    said = getattr(packed_seq_params, "cp_partition_mode", layout) if thd else layout
    if said != layout:
        raise MLACompatibilityError(
            f"PackedSeqParams.cp_partition_mode is {said!r} but the model's "
            f"config.cp_partition_mode is {layout!r}: MLA converts from the model's layout. "
            f"Build the batch in the model's layout (cp_partition_mode={layout!r}), or set "
            f"the config's cp_partition_mode to {said!r}."
        )
    if layout == _MLA_CP_LAYOUT:
        return hidden_states, None
    # pylint: disable=import-outside-toplevel
    from megatron.core.context_parallel_layout import (
        convert_module_input_tensors_cp_partition_mode,
        prebuild_thd_cp_partition_routes,
    )

    if thd and getattr(packed_seq_params, "cp_partition_route", None) is None:
        if _capturing():
            raise MLACompatibilityError(
                f"A THD batch in the {layout} CP layout without PackedSeqParams."
                "cp_partition_route inside a CUDA graph capture: building the route reads the "
                "offsets. Prebuild it with the batch (megatron.core.context_parallel_layout."
                "finalize_packed_seq_params, as Megatron's data path does)."
            )
        _log_once(
            logging.WARNING,
            f"mla-seam: THD batches in the {layout} CP layout without a prebuilt "
            "PackedSeqParams.cp_partition_route: MLA builds it once per batch (one read of the "
            "offsets); finalize_packed_seq_params builds it with the batch.",
        )
        prebuild_thd_cp_partition_routes(packed_seq_params, cp_group)
    pg_collection = attention.pg_collection
    return convert_module_input_tensors_cp_partition_mode(
        hidden_states=hidden_states,
        packed_seq_params=packed_seq_params,
        target_partition_mode=_MLA_CP_LAYOUT,
        sequence_parallel=config.sequence_parallel,
        config=config,
        cp_group=cp_group,
        tp_group=getattr(pg_collection, "tp", None),
        tp_cp_group=getattr(pg_collection, "tp_cp", None),
        attention_mask=attention_mask,
        key_value_states=key_value_states,
    )


def cp_layout_output(attention: MultiLatentAttention, back: Any, output: torch.Tensor) -> Any:
    """Hook H10 (end of ``MultiLatentAttention.forward``): the output in the input's CP layout.

    Args:
        attention: The MLA module.
        back: The converter :func:`zigzag_cp_input` returned (``None``: nothing moved).
        output: The attention output, ``[tokens, batch, hidden]`` in the zigzag layout.

    Returns:
        The output in the model's layout.
    """
    if back is None:
        return output
    return back.convert(output, seq_dim=0, sequence_parallel=attention.config.sequence_parallel)


# <<< MLA takes its input in the zigzag CP layout only (H10) ----------------------------------


# ---------------------------------------------------------------------------------------------
# Question 3: attention backend (H3; H1 and the core attention it builds)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackendFacts:
    """What the backend decision depends on, probed when it is made.

    Attributes:
        te_version: Transformer Engine version string, or ``None`` when TE is not importable.
        compute_capability: ``(major, minor)`` of the current CUDA device, or ``None``.
        flash_attn_2: Whether a FlashAttention-2 build (``flash_attn``) is importable.
        flash_attn_3: Whether a FlashAttention-3 build (``flash_attn_interface``) is importable.
        k_channels: q/k head width.
        v_channels: v head width.
        context_parallel: Context-parallel size.
        spec: ``"te"``, ``"local"`` or ``"other"``: which core attention the layer spec builds.
        cudnn_version: cuDNN version as an integer (90500 for 9.5.0), or ``None`` when unknown.
        te_pads_for_flash: Whether TE itself pads q/k/v to one head width for FlashAttention-2.
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
        spec: The layer spec's core attention (``"te"`` or ``"local"``) the decision is for.
    """

    requested: str
    backend: str
    reason: str
    pad_value: bool = False
    fallback: bool = False
    spec: str = "te"


class _BackendUnsupported(Exception):
    """The requested TE backend has no MLA path here; carries the restriction."""


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


def decide_backend(requested: str, facts: BackendFacts, policy: str = "strict") -> BackendDecision:
    """Question 3 as a pure function of the probed facts.

    Args:
        requested: ``flash``, ``fused``, ``unfused``, ``local`` or ``auto``.
        facts: What the decision depends on.
        policy: ``strict`` raises for an unsupported request; ``fallback`` takes the fastest
            supported backend (fused, FlashAttention, unfused).

    Returns:
        The decision.

    Raises:
        MLACompatibilityError: The request cannot run MLA (``strict``), or contradicts the spec.
    """
    if facts.spec == "local":
        if facts.context_parallel > 1:
            raise MLACompatibilityError(
                "The local layer spec (Megatron's DotProductAttention) does not support context "
                "parallelism; use the Transformer Engine spec (--transformer-impl "
                "transformer_engine) or --context-parallel-size 1."
            )
        note = "" if requested in ("local", "auto") else f"; {_BACKEND_FLAG} {requested} is ignored"
        return BackendDecision(
            requested, "local", f"local spec: Megatron DotProductAttention{note}"
        )
    if facts.spec == "te" and facts.te_version is None:
        raise MLACompatibilityError(
            "The layer spec builds TEDotProductAttention but Transformer Engine is not "
            "importable; install transformer-engine or use --transformer-impl local."
        )
    try:
        return _decide_te(requested, facts)
    except _BackendUnsupported as exc:
        if policy == "fallback":
            chosen = _fastest_supported(facts)
            why = f"fallback from {requested} ({exc}): {chosen.reason}"
            return dataclasses.replace(chosen, requested=requested, fallback=True, reason=why)
        cc = facts.compute_capability
        choices = [f"{_BACKEND_FLAG} fused"] if _fused_supports_mla(facts) else []
        choices += [f"{_BACKEND_FLAG} flash"] if _flash_path(facts) is not None else []
        choices += [f"{_BACKEND_FLAG} auto", f"{_BACKEND_FLAG} unfused"]
        raise MLACompatibilityError(
            f"{_BACKEND_FLAG} {requested} cannot run Multi-Latent Attention here: {exc} "
            f"(MLA head dims: q/k {facts.k_channels} vs v {facts.v_channels}; TE "
            f"{facts.te_version or 'not installed'}; GPU "
            f"{'sm%d%d' % cc if cc else 'none visible'}). Use {' or '.join(choices)}, or set "
            f"{POLICY_ENV}=fallback to switch to the fastest supported backend automatically."
        ) from None


def _fastest_supported(facts: BackendFacts) -> BackendDecision:
    for candidate in ("fused", "flash", "unfused"):
        try:
            return _decide_te(candidate, facts)
        except _BackendUnsupported:
            continue
    raise AssertionError("unfused attention always runs")  # pragma: no cover


def _decide_te(requested: str, facts: BackendFacts) -> BackendDecision:
    """The decision for the TE spec; raises :class:`_BackendUnsupported` with the restriction."""
    if requested == "local":
        raise MLACompatibilityError(
            f"{_BACKEND_FLAG} local turns every Transformer Engine backend off, but the layer "
            "spec builds TEDotProductAttention: TE would find no backend at the first step. "
            "Use --transformer-impl local for Megatron's own attention, or "
            f"{_BACKEND_FLAG} fused|unfused|auto."
        )
    if requested == "unfused":
        return BackendDecision(requested, "unfused", "TE unfused attention runs any head dims")
    no_device = facts.compute_capability is None
    flash = _flash_path(facts)
    if requested == "fused":
        if no_device:
            why = "no CUDA device visible at build; TE checks cuDNN support at first step"
            return BackendDecision(requested, "fused", why)
        if _fused_supports_mla(facts):
            why = "cuDNN fused attention runs q/k != v head dims on sm90+"
            return BackendDecision(requested, "fused", why)
        raise _BackendUnsupported(
            "cuDNN fused attention trains q/k != v head dims only on sm90 (cuDNN >= 9.5) and "
            f"sm100+ (cuDNN >= 9.11); cuDNN here: {facts.cudnn_version or 'unknown'}"
        )
    if requested == "flash":
        if flash is not None:
            return BackendDecision(requested, "flash", flash[1], pad_value=flash[0])
        fa3 = "installed" if facts.flash_attn_3 else "not installed"
        fa2 = "installed" if facts.flash_attn_2 else "not installed"
        raise _BackendUnsupported(
            "no FlashAttention build here runs MLA head dims (FlashAttention-3 on sm90: "
            f"{fa3}; FlashAttention-2 with V padded on sm80+: {fa2})"
        )
    if no_device or _fused_supports_mla(facts):
        return BackendDecision("auto", "auto", "TE picks per call; cuDNN fused runs MLA dims")
    if flash is not None:
        return BackendDecision("auto", "auto", f"TE picks per call; {flash[1]}", flash[0])
    return BackendDecision("auto", "auto", "TE picks per call; only unfused runs MLA dims here")


def _probe_facts(config: MLATransformerConfig, spec: str) -> BackendFacts:
    """This process's :class:`BackendFacts`: TE, GPU, cuDNN, FlashAttention builds."""
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
        # TE 2.17 pads q/k/v to one head width itself for FlashAttention-2 when q/k and v
        # widths differ (NVIDIA/TransformerEngine PR #2629). No public flag says so, its version
        # does (a 2.17 dev build reads as older, and the adapter pads V itself: still right).
        te_pads_for_flash=HAVE_TE and is_te_min_version("2.17.0"),
    )


def _te_version() -> Optional[str]:
    try:
        # pylint: disable=import-outside-toplevel,redefined-outer-name,reimported
        import transformer_engine
    except Exception:  # pylint: disable=broad-except
        return None
    return str(getattr(transformer_engine, "__version__", "unknown"))


def _compute_capability() -> Optional[Tuple[int, int]]:
    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def _cudnn_version() -> Optional[int]:
    return torch.backends.cudnn.version() if torch.cuda.is_available() else None


def resolve_attention_backend(
    config: TransformerConfig, spec: Optional[str] = None
) -> Optional[BackendDecision]:
    """Hook H3 (and H1): decide the MLA attention path before Megatron sets NVTE_* variables.

    Called from ``LanguageModule._set_attention_backend`` (spec inferred from the request) and
    when MLA builds its core attention (spec known). Under the fallback policy it rewrites
    ``config.attention_backend``, so Megatron exports the flags of the backend that runs. A
    config with an ``experimental_attention_variant`` is decided per layer only (H1): the
    variant's layers build their own core attention.

    Args:
        config: The model config (non-MLA configs are left alone).
        spec: ``"te"``, ``"local"`` or ``"other"`` when known.

    Returns:
        The decision, or ``None`` for a non-MLA config.
    """
    if not getattr(config, "multi_latent_attention", False):
        return None
    requested = _backend_name(config.attention_backend)
    if spec is None and getattr(config, "experimental_attention_variant", None) is not None:
        # An attention variant builds its own core attention (0.19+ DSA's DSAttention, dev's
        # dsv4_hybrid CompressedSparseAttention), which no backend flag reaches; a layer that
        # still builds (TE)DotProductAttention is decided by H1 when it is built.
        return None
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
    decision = decide_backend(requested, _probe_facts(config, spec), policy)
    decision = dataclasses.replace(decision, spec=spec)
    if decision.fallback:
        _log_once(logging.WARNING, f"mla-seam: {decision.reason}")
        config.attention_backend = getattr(AttnBackend, decision.backend)
    _state(config).backend = decision
    return decision


def backend_decision(config: TransformerConfig) -> Optional[BackendDecision]:
    """The backend decision made for ``config``, or ``None`` before the model was built.

    Args:
        config: A ``TransformerConfig``.

    Returns:
        The :class:`BackendDecision` or ``None``.
    """
    found = getattr(config, STATE_ATTR, None)
    return found.backend if isinstance(found, MLASeamState) else None


def _backend_name(value: Any) -> str:
    return value.name if isinstance(value, AttnBackend) else str(value).split(".")[-1]


# --- H1: the core attention MLA builds -------------------------------------------------------

# >>> until upstream: local DotProductAttention cannot run MLA (H1) ---------------------------
# Obsolete-If: none in the patch yet (contract dpa.local_accepts_k_channels watches its first
#     half). Drop-When: local DotProductAttention takes k_channels/v_channels and MLA honours
#     config.softmax_scale. Upstream: NVIDIA/Megatron-LM issue #1589, PR #6564 (k/v channels),
#     PR #3698 (softmax_scale). The SDPA path is the local backend's speed; the THD path stands
#     in for packed sequences, which upstream's class refuses (it asserts packed_seq_params is
#     None on main and dev, 2026-08; none filed upstream).


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


#: The local spec runs a THD batch as one padded SDPA batch while that holds at most this many
#: slots per token (``sequences * max_seqlen <= 2 * tokens``); beyond, one call per sequence.
_PADDED_SLOTS = 2


def _padded_layout(
    cu_seqlens: torch.Tensor, padded: Optional[torch.Tensor], tokens: int, longest: int
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Indices between a THD batch and its ``[longest, sequences]`` padded form, on the device.

    Args:
        cu_seqlens: Offsets of the sequences.
        padded: Padded offsets (where the sequences start), or ``None``.
        tokens: Tokens of the THD tensors.
        longest: Slots per sequence (``max_seqlen_q``).

    Returns:
        ``(gather, scatter, kept)``: per slot (row-major ``[longest, sequences]``) the token it
        takes (padding slots: token 0); per token its slot; per token whether it is a
        sequence's own (``[tokens, 1]`` bool; ``None`` without padded offsets: every token).
    """
    starts = cu_seqlens if padded is None else padded
    sequences = cu_seqlens.numel() - 1
    lengths = torch.diff(cu_seqlens)
    slot = torch.arange(longest, device=cu_seqlens.device, dtype=cu_seqlens.dtype).unsqueeze(1)
    gather = starts.narrow(0, 0, sequences).unsqueeze(0) + slot
    gather = torch.where(slot < lengths.unsqueeze(0), gather, 0).view(-1).clamp_(max=tokens - 1)
    sequence, local, _ = thd_tokens(starts, tokens)
    scatter = local.clamp(max=longest - 1) * sequences + sequence
    if padded is None:
        return gather, scatter, None
    return gather, scatter, (local < lengths.index_select(0, sequence)).unsqueeze(1)


class MLADotProductAttention(DotProductAttention):
    """Megatron's local ``DotProductAttention`` for MLA.

    Takes ``k_channels``/``v_channels`` (passed on where upstream accepts them) and sizes the
    output from ``v_channels``. Causal self-attention runs through ``scaled_dot_product_attention``
    (the same function: the adapter's scale, causal mask, dropout); other masks, windows, softmax
    variants and grouped queries keep Megatron's path. THD batches (question 2) with their sizes
    run as one right-padded SDPA batch, indices made on the device (no host read, capturable);
    others, and batches whose padded form would exceed ``_PADDED_SLOTS`` x their tokens, run
    sequence by sequence at the padded offsets (offsets read once per batch). Padding slots: 0.
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
        scale = self.softmax_scale * (getattr(self.scale_mask_softmax, "scale", None) or 1.0)
        dropout = self.attention_dropout.p if self.training else 0.0
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        rng = contextlib.nullcontext()
        if dropout and not self.config.sequence_parallel:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=scale
            )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, self.hidden_size_per_partition)

    def _forward_thd(self, query, key, value, packed: PackedSeqParams) -> torch.Tensor:
        """A THD batch: all sequences in one SDPA call where it fits, else one by one."""
        batch = packed_batch(packed)
        if self._thd_in_one_call(query, key, packed):
            return self._forward_thd_padded(query, key, value, packed, batch)
        why = "the local spec runs this THD batch one sequence at a time"
        if batch is not None:
            host = batch.offsets_on_host(packed, why)
        else:  # parameters that did not pass H2 (a caller outside MLA's forward)
            host = _read_offsets(packed, why)
        cu_q = host["cu_seqlens_q"]
        cu_kv = host["cu_seqlens_kv"] or cu_q
        pad_q = host["cu_seqlens_q_padded"] or cu_q
        pad_kv = host["cu_seqlens_kv_padded"] or cu_kv
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

    def _thd_in_one_call(self, query, key, packed: PackedSeqParams) -> bool:
        """Whether the batch runs as one padded SDPA batch (:meth:`_forward_thd_padded`).

        Causal self-attention over the same (q = kv) offsets with ``max_seqlen_q`` known, when
        the padded batch holds at most ``_PADDED_SLOTS`` times the tokens (always inside a CUDA
        graph capture, which cannot run sequence by sequence). All host-known sizes: no read.
        """
        longest = packed.max_seqlen_q
        if (
            longest is None
            or packed.cu_seqlens_kv is not packed.cu_seqlens_q
            or getattr(packed, "cu_seqlens_kv_padded", None)
            is not getattr(packed, "cu_seqlens_q_padded", None)
            or not self._sdpa_computes_this(query, key)
        ):
            return False
        slots = (packed.cu_seqlens_q.numel() - 1) * longest
        return slots <= _PADDED_SLOTS * query.size(0) or _capturing()

    def _forward_thd_padded(
        self, query, key, value, packed: PackedSeqParams, batch: Optional[PackedBatch]
    ) -> torch.Tensor:
        """All sequences of a THD batch as one ``[max_seqlen, sequences]`` causal SDPA batch.

        Each sequence is gathered into its column, right-padded; a causal row of a sequence
        sees only its own earlier tokens, so the padding (rows past a sequence, and the slots
        between padded offsets) changes no row that is kept. Padding rows are dropped on the
        way back (zeros where the offsets leave gaps) and get no gradient.
        """
        sequences = packed.cu_seqlens_q.numel() - 1
        longest, tokens = packed.max_seqlen_q, query.size(0)
        padded = getattr(packed, "cu_seqlens_q_padded", None)

        def _layout():
            return _padded_layout(packed.cu_seqlens_q, padded, tokens, longest)

        what = ("padded-layout", tokens, longest)
        gather, scatter, kept = (
            _layout() if batch is None else batch.memo(what, (packed.cu_seqlens_q, padded), _layout)
        )
        q, k, v = (
            x.index_select(0, gather).view(longest, sequences, *x.shape[1:])
            for x in (query, key, value)
        )
        out = self._sdpa(q, k, v).view(longest * sequences, self.hidden_size_per_partition)
        out = out.index_select(0, scatter)
        return out if kept is None else torch.where(kept, out, 0.0)

    def _sequence_mask(self, n_q: int, n_kv: int, device: torch.device) -> torch.Tensor:
        """Megatron's boolean mask (True = masked) for one sequence of a THD batch."""
        causal = self.attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        if causal:
            mask = torch.ones(n_q, n_kv, device=device, dtype=torch.bool).triu(1 + n_kv - n_q)
        else:
            mask = torch.zeros(n_q, n_kv, device=device, dtype=torch.bool)
        return mask.view(1, 1, n_q, n_kv)


# <<< local DotProductAttention cannot run MLA (H1) -------------------------------------------


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
            padded = query.size(-1)
            out = self._te_forward(query, key, F.pad(value, (0, padded - width)), *args, **kwargs)
            heads = out.shape[-1] // padded
            trimmed = out.reshape(*out.shape[:-1], heads, padded)[..., :width]
            return trimmed.reshape(*out.shape[:-1], heads * width)

        def _te_forward(self, query, key, value, *args: Any, **kwargs: Any):
            try:
                return super().forward(query, key, value, *args, **kwargs)
            except ValueError as exc:
                if "No dot product attention backend" not in str(exc):
                    raise
                decision = backend_decision(self.config)
                layout = getattr(kwargs.get("packed_seq_params"), "qkv_format", None) or "sbhd"
                shape = f"q {tuple(query.shape)} k {tuple(key.shape)} v {tuple(value.shape)}"
                chosen = f"{decision.backend} ({decision.reason})" if decision else "unknown"
                raise MLACompatibilityError(
                    "Transformer Engine found no attention backend for this MLA call: layout "
                    f"{layout}, {shape}, {_BACKEND_FLAG} decided as {chosen}. The build-time "
                    "decision holds for typical training shapes; this call's shape is outside "
                    f"it. Try {_BACKEND_FLAG} auto, and run with NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 "
                    "to see TE's reasons."
                ) from exc

else:
    MLATEDotProductAttention = None


def adapted_class(module: type) -> type:
    """The adapter's core-attention class for the class a layer spec names.

    ``DotProductAttention`` -> :class:`MLADotProductAttention`, ``TEDotProductAttention`` ->
    :class:`MLATEDotProductAttention` (subclasses: state-dict keys and ``isinstance`` checks hold);
    any other class (a fork's own included) is built as the spec says.

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

    Sets the layer's ``softmax_scale`` (question 1; the hook runs before the
    ``softmax_scale=self.softmax_scale`` argument after it), resolves the backend for the spec,
    logs :func:`describe` once per process and swaps the spec's class for :func:`adapted_class`.

    Args:
        attention: The ``MultiLatentAttention`` being built.
        spec: ``submodules.core_attention`` (a ``ModuleSpec`` or a class).

    Returns:
        A spec of the same kind that builds the adapted class.
    """
    config = attention.config
    attention.softmax_scale = layer_metadata(config).softmax_scale
    module = getattr(spec, "module", spec)
    if not isinstance(module, type):
        kind = "other"
    elif issubclass(module, DotProductAttention):
        kind = "local"
    else:
        kind = "te" if HAVE_TE and issubclass(module, TEDotProductAttention) else "other"
    resolve_attention_backend(config, kind)
    _log_once(logging.INFO, describe(config))
    adapted = adapted_class(module)
    if adapted is module:
        return spec
    return adapted if isinstance(spec, type) else dataclasses.replace(spec, module=adapted)


def describe(config: MLATransformerConfig) -> str:
    """One line for the build log: what the adapter answered for this config (questions 1, 3).

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


# ---------------------------------------------------------------------------------------------
# Question 4: pipeline offsets and per-layer lists (H7, H6)
# ---------------------------------------------------------------------------------------------

# >>> until upstream: the offset of an uneven pipeline split with virtual stages (H7) --------
# Obsolete-If: tl.layer_offset_middle_stages_guarded=true. Drop-When: the virtual-stage branch
#     guards middle_pipeline_stages > 0 as the other branch does. Upstream: none filed (every
#     release 0.13.0 - 0.19.2 divides by zero). The rank-1 count (contract
#     tl.layer_offset_vpp_middle_rank=rank-1) is 0.13.x only, fixed in core_v0.14.0; the 0.13
#     series' H7 says so with ``rank_minus_one=True``.


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

    Chunk by chunk: virtual stage 0 of ranks 0..pp-1, then stage 1, ..., each of
    :func:`_stage_layer_counts` layers; a virtual embedding layer takes the first slot.

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
    config: TransformerConfig, vp_stage: Optional[int], pp_rank: int, rank_minus_one: bool = False
) -> Optional[int]:
    """Hook H7: the layer offset of a pipeline stage where upstream's own count fails.

    Upstream's ``get_transformer_layer_offset`` asks here first, once it knows the pipeline
    rank. The adapter answers (:func:`layer_offset`) only for MLA models whose uneven split with
    virtual stages upstream gets wrong: no middle stage (upstream divides by zero), or middle
    stages counted from rank 1 (``rank_minus_one``).

    It answers through that function only, so a layer gets the offset once: layers whose caller
    already counted it never ask (MTP layers, ``is_mtp_layer=True``, number themselves; hybrid
    stacks pass ``add_layer_offset=False`` and their own ``pp_layer_offset``, 0.17+ and dev),
    and callers that ask for a stage's offset (the block's sharded state dict, layer specs) get
    the same answer as its layers.

    Args:
        config: The model config.
        vp_stage: Virtual pipeline stage (``None`` without interleaving).
        pp_rank: The pipeline rank upstream computes the offset for.
        rank_minus_one: The hook's release counts the middle stages from ``pipeline_rank - 1``
            when the first stage is not customized (0.13.x; its series passes ``True``).

    Returns:
        The offset to add to a 1-based local layer number, or ``None``: upstream's own count.
    """
    pp = config.pipeline_model_parallel_size
    first = config.num_layers_in_first_pipeline_stage
    last = config.num_layers_in_last_pipeline_stage
    if (
        not getattr(config, "multi_latent_attention", False)
        or pp <= 1
        or getattr(config, "pipeline_model_parallel_layout", None)
        or config.virtual_pipeline_model_parallel_size is None
        or (first is None and last is None)
    ):
        return None
    if pp == (first is not None) + (last is not None):
        failure = "divides by zero middle stages"
    elif first is None and rank_minus_one:
        failure = "counts the middle stages from rank 1"
    else:
        return None
    if _decoder_start() is not None:
        return None  # an encoder-decoder split: upstream's own count
    ours = layer_offset(config, vp_stage, pp_rank)
    if not _state(config).offset_logged:
        _state(config).offset_logged = True
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


def _decoder_start() -> Optional[int]:
    """The pipeline rank where an encoder-decoder model's decoder starts (``None``: no split)."""
    getter = getattr(parallel_state, "get_pipeline_model_parallel_decoder_start", None)
    try:
        return None if getter is None else getter()
    except (AssertionError, RuntimeError, AttributeError):
        return None


# <<< the offset of an uneven pipeline split with virtual stages (H7) ------------------------


# >>> until upstream: per-layer lists indexed off by one (H6) --------------------------------
# Obsolete-If: tl.cp_comm_type_index=layer_number-1. Drop-When: the line indexes with
#     self.layer_number - 1. Upstream: none filed (fixed in core_v0.17.0).


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


# <<< per-layer lists indexed off by one (H6) ------------------------------------------------
