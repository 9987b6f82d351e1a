"""Build and run Megatron's MLA layer from an :class:`oracles.MLAHyper`, inside one Megatron tree.

Shared by ``test_oracles``, ``test_matrix``, ``test_golden`` and ``bench``. Megatron is imported
lazily (the tree is on ``sys.path`` through ``conftest.py``), so this module imports anywhere.
Works on the patched tree and on a vanilla one (``bench`` measures both): adapter-only calls are
guarded by :func:`have_adapter`.

What Megatron builds is read back from its parameters, not assumed: :func:`build_attention`
returns the :class:`~oracles.MLAHyper` that describes the module actually built, with a note when
it differs from the one asked for (upstream structure drift, reported by the tests).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from oracles import MLAHyper, init_params, map_parameters

TREE = os.environ.get("MLA_SEAM_MEGATRON_TREE")
NO_TREE = "needs MLA_SEAM_MEGATRON_TREE (a Megatron checkout, patched by mla-seam)"
NO_CUDA = "needs a CUDA device"
NO_TE = "needs Transformer Engine"
NO_ADAPTER = "needs the mla-seam adapter in the tree (this tree is vanilla)"

NVTE_FLAGS = (
    "NVTE_FLASH_ATTN",
    "NVTE_FUSED_ATTN",
    "NVTE_UNFUSED_ATTN",
    "NVTE_FLASH_ATTN_V2",
    "NVTE_FLASH_ATTN_V3",
    "NVTE_FLASH_ATTN_V4",
)
NO_BACKEND = "No dot product attention backend"


def have_adapter() -> bool:
    """Whether this tree carries the mla-seam adapter (a patched tree, not a vanilla one)."""
    try:
        return importlib.util.find_spec("megatron.core.transformer.mla_adapter") is not None
    except ImportError:
        return False


def flash_build_installed() -> bool:
    """Whether a FlashAttention build the adapter counts (``flash_attn``, ``flash_attn_interface``)
    is importable: then ``--attention-backend flash`` is a supported MLA path."""
    return any(
        importlib.util.find_spec(m) is not None for m in ("flash_attn", "flash_attn_interface")
    )


def have_te() -> bool:
    """Whether Transformer Engine imports in this process."""
    try:
        import transformer_engine  # noqa: F401  pylint: disable=C0415,W0611
    except Exception:  # pylint: disable=broad-except
        return False
    return True


def cpu_blocker() -> str:
    """Why this tree's MLA cannot be built on the CPU, or ``""``.

    Megatron 0.16.x: ``MultiLatentAttention.__init__`` calls ``isinstance(.., TELinear)`` on the
    MagicMock upstream puts there without Transformer Engine.
    """
    from megatron.core.transformer import multi_latent_attention as mla  # pylint: disable=C0415

    if getattr(mla, "HAVE_TE", False) and not isinstance(getattr(mla, "TELinear", None), type):
        return (
            "this release's MultiLatentAttention needs Transformer Engine to build (isinstance "
            "against a TE class that is a stand-in without TE); runs on the GPU machine"
        )
    return ""


def device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class Built:
    """An MLA layer and what it is.

    Attributes:
        module: The ``MLASelfAttention``.
        config: Its ``MLATransformerConfig``.
        hyper: The DeepSeek description of the layer actually built.
        spec: ``"local"`` or ``"te"``.
        notes: Structural differences from the requested hyperparameters, one line each.
        mapping: Megatron parameter name -> DeepSeek name.
    """

    module: Any
    config: Any
    hyper: MLAHyper
    spec: str
    notes: List[str]
    mapping: Dict[str, str]

    @property
    def decision(self) -> Any:
        """The adapter's backend decision (``None`` on a vanilla tree)."""
        state = getattr(self.config, "_mla_seam", None)
        return getattr(state, "backend", None)


def megatron_config(
    hyper: MLAHyper,
    dtype: torch.dtype,
    backend: str = "auto",
    recompute: Optional[str] = None,
    qk_layernorm: bool = True,
    num_layers: int = 1,
    **overrides: Any,
):
    """The ``MLATransformerConfig`` for ``hyper``; every DeepSeek field set explicitly.

    Args:
        hyper: The layer.
        dtype: ``params_dtype`` (``bf16=True`` for bfloat16).
        backend: ``--attention-backend`` value.
        recompute: ``None``, ``"core_attn"`` or ``"mla_up_proj"`` (selective recompute).
        qk_layernorm: Whether Megatron builds the latent norms.
        num_layers: Layers (1 for a single attention module).
        **overrides: Further config fields.
    """
    from megatron.core.transformer.enums import AttnBackend  # pylint: disable=C0415
    from megatron.core.transformer.transformer_config import (  # pylint: disable=C0415
        MLATransformerConfig,
    )

    rope = hyper.rope
    kwargs: Dict[str, Any] = dict(
        num_layers=num_layers,
        hidden_size=hyper.hidden_size,
        num_attention_heads=hyper.num_heads,
        q_lora_rank=hyper.q_lora_rank,
        kv_lora_rank=hyper.kv_lora_rank,
        qk_head_dim=hyper.qk_nope_head_dim,
        qk_pos_emb_head_dim=hyper.qk_rope_head_dim,
        v_head_dim=hyper.v_head_dim,
        rope_type=rope.kind,
        rotary_base=rope.theta,
        rotary_scaling_factor=rope.factor,
        beta_fast=rope.beta_fast,
        beta_slow=rope.beta_slow,
        mscale=rope.mscale,
        mscale_all_dim=rope.mscale_all_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hyper.rms_eps,
        qk_layernorm=qk_layernorm,
        add_bias_linear=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        apply_rope_fusion=False,
        attention_backend=getattr(AttnBackend, backend),
    )
    # YaRN's pretraining context: ``original_max_position_embeddings`` from 0.14 on; 0.13 reads
    # ``max_position_embeddings`` for it (no separate field). Detected on the config class.
    fields = {f.name for f in dataclasses.fields(MLATransformerConfig)}
    if "original_max_position_embeddings" in fields:
        kwargs["original_max_position_embeddings"] = rope.original_max_position_embeddings
    else:
        kwargs["max_position_embeddings"] = rope.original_max_position_embeddings
    if recompute:
        kwargs.update(recompute_granularity="selective", recompute_modules=[recompute])
    kwargs.update(overrides)
    return MLATransformerConfig(**kwargs)


def set_backend(config: Any) -> None:
    """Run ``LanguageModule._set_attention_backend`` (hook H3 on a patched tree) for ``config``.

    Clears the NVTE_* flags first (Megatron asserts pre-set flags match) and marks TE's cached
    backend selection stale (TE caches per input shape, not per flag).
    """
    from megatron.core.models.common.language_module.language_module import (  # noqa: C0415
        LanguageModule,
    )

    for name in NVTE_FLAGS:
        os.environ.pop(name, None)
    LanguageModule._set_attention_backend(  # pylint: disable=protected-access
        types.SimpleNamespace(config=config)
    )
    reset_te_backend_cache()


def reset_te_backend_cache() -> None:
    """Make TE re-select its attention backend at the next call (no-op without TE)."""
    try:
        from transformer_engine.pytorch.attention.dot_product_attention import (  # noqa: C0415
            dot_product_attention as te_dpa,
        )

        te_dpa._attention_backends[  # pylint: disable=protected-access
            "backend_selection_requires_update"
        ] = True
    except Exception:  # pylint: disable=broad-except
        pass


def layer_spec(spec: str, qk_layernorm: bool):
    """Upstream's GPT layer spec with MLA, local or TE."""
    from megatron.core.models.gpt import gpt_layer_specs  # pylint: disable=C0415

    make = (
        gpt_layer_specs.get_gpt_layer_local_spec
        if spec == "local"
        else gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
    )
    return make(multi_latent_attention=True, qk_layernorm=qk_layernorm)


def _local_spec_rejects_latent_norms(exc: Exception) -> bool:
    """Megatron 0.19's QK-norm resolver: local spec, ``q_lora_rank=None``, ``qk_layernorm``."""
    text = str(exc)
    return "q_lora_rank is None" in text or "qk_layernorm requires TransformerEngine" in text


def build_attention(
    hyper: MLAHyper,
    spec: str,
    dtype: torch.dtype,
    backend: str = "auto",
    recompute: Optional[str] = None,
    seed: int = 0,
    set_flags: bool = True,
    **overrides: Any,
) -> Built:
    """Build ``MLASelfAttention`` for ``hyper`` and load :func:`oracles.init_params` into it.

    The latent norms (``qk_layernorm=True``) are asked for. Where upstream cannot build them
    (0.19's local spec without ``q_lora``) the layer is built without, and the returned
    ``hyper`` says so; where upstream builds an extra query-input norm (0.19's TE spec without
    ``q_lora``) the returned ``hyper`` has ``q_input_norm=True``. Both are listed in ``notes``.

    Args:
        hyper: The requested layer.
        spec: ``"local"`` or ``"te"``.
        dtype: Parameter dtype.
        backend: ``--attention-backend``.
        recompute: Selective recompute module, or ``None``.
        seed: Seed of :func:`oracles.init_params` (the same seed gives the same weights).
        set_flags: Run :func:`set_backend` first (hook H3), as ``GPTModel`` would.
        **overrides: Further ``MLATransformerConfig`` fields (e.g. ``apply_rope_fusion``).

    Returns:
        The :class:`Built` layer on :func:`device`, in training mode.
    """
    from megatron.core.transformer.spec_utils import build_module  # pylint: disable=C0415

    notes: List[str] = []
    qk_layernorm = hyper.latent_norms
    config = megatron_config(hyper, dtype, backend, recompute, qk_layernorm, **overrides)
    if set_flags:
        set_backend(config)
    try:
        module = build_module(
            layer_spec(spec, qk_layernorm).submodules.self_attention,
            config=config,
            layer_number=1,
        )
    except (ValueError, RuntimeError, AttributeError) as exc:
        if not (spec == "local" and qk_layernorm and _local_spec_rejects_latent_norms(exc)):
            raise
        notes.append(
            "upstream local spec cannot build the latent RMSNorms without q_lora "
            f"({type(exc).__name__}: {str(exc)[:120]}); built with qk_layernorm=False"
        )
        hyper = hyper.replace(latent_norms=False)
        config = megatron_config(hyper, dtype, backend, recompute, False, **overrides)
        if set_flags:
            set_backend(config)
        module = build_module(
            layer_spec(spec, False).submodules.self_attention, config=config, layer_number=1
        )
    names = [n for n, p in module.named_parameters() if p.numel() > 0]
    if "linear_q_proj.layer_norm_weight" in names and not hyper.q_input_norm:
        notes.append(
            "upstream builds linear_q_proj as a fused RMSNorm+linear: an RMSNorm on the query "
            "input that DeepSeek does not have (QK-norm resolver, q_lora_rank=None)"
        )
        hyper = hyper.replace(q_input_norm=True)
    module = module.to(device())
    mapping = map_parameters(names, init_params_names(hyper))
    load_params(module, mapping, init_params(hyper, seed, torch.float64, device()))
    module.train()
    return Built(module, config, hyper, spec, notes, mapping)


def init_params_names(hyper: MLAHyper) -> List[str]:
    """Parameter names of the reference for ``hyper``."""
    from oracles import parameter_shapes  # pylint: disable=C0415

    return list(parameter_shapes(hyper))


def load_params(module: Any, mapping: Dict[str, str], params: Dict[str, torch.Tensor]) -> None:
    """Copy DeepSeek-named ``params`` into ``module`` through ``mapping`` (shapes checked)."""
    own = dict(module.named_parameters())
    with torch.no_grad():
        for name, target in mapping.items():
            value = params[target]
            if tuple(own[name].shape) != tuple(value.shape):
                raise AssertionError(
                    f"{name} {tuple(own[name].shape)} vs {target} {tuple(value.shape)}"
                )
            own[name].copy_(value.to(own[name].dtype))


def reference_params(built: Built, requires_grad: bool = True) -> Dict[str, torch.Tensor]:
    """The layer's own weights under DeepSeek names, float64 leaves (as the module rounded them)."""
    own = dict(built.module.named_parameters())
    out = {}
    for name, target in built.mapping.items():
        out[target] = own[name].detach().double().clone().requires_grad_(requires_grad)
    return out


def megatron_grads(built: Built) -> Dict[str, torch.Tensor]:
    """Parameter gradients under DeepSeek names."""
    own = dict(built.module.named_parameters())
    grads = {}
    for name, target in built.mapping.items():
        param = own[name]
        grad = getattr(param, "main_grad", None)
        grad = param.grad if param.grad is not None else grad
        if grad is None:
            raise AssertionError(f"{name} ({target}) received no gradient")
        grads[target] = grad.detach()
    return grads


def causal_mask(seq: int, dev: str) -> torch.Tensor:
    """Megatron's boolean mask (True = masked) for causal attention, ``[1, 1, s, s]``."""
    return torch.ones(seq, seq, dtype=torch.bool, device=dev).triu(1).view(1, 1, seq, seq)


def packed_seq_params(
    lengths: Optional[Sequence[int]] = None,
    padded: Optional[Sequence[int]] = None,
    with_max: bool = True,
    dev: Optional[str] = None,
    *,
    cu: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    pad_between_seqs: Optional[bool] = None,
    **fields: Any,
):
    """``PackedSeqParams(qkv_format='thd')``: the one builder of the tests.

    Args:
        lengths: Tokens per sequence (offsets built on ``dev``, default :func:`device`).
        padded: Slot per sequence (``cu_seqlens_*_padded``), when sequences are padded.
        with_max: Give ``max_seqlen_q/kv`` (the longest slot) for ``lengths``.
        dev: Device of the offsets built from ``lengths``.
        cu: Offsets already made (a static buffer, a CPU tensor), instead of ``lengths``; the
            same tensor serves q and kv, and nothing is read back from it.
        max_seqlen: ``max_seqlen_q/kv`` as given (with ``cu``, the only way to set them).
        pad_between_seqs: Set where the release's class has the field (0.19+), else left out.
        **fields: Further ``PackedSeqParams`` fields, as given.
    """
    from megatron.core.packed_seq_params import PackedSeqParams  # pylint: disable=C0415

    def offsets(values: Sequence[int]) -> torch.Tensor:
        out = [0]
        for v in values:
            out.append(out[-1] + int(v))
        return torch.tensor(out, dtype=torch.int32, device=dev or device())

    if cu is None:
        if lengths is None:
            raise TypeError("packed_seq_params needs lengths or cu")
        cu = offsets(lengths)
        if with_max and max_seqlen is None:
            max_seqlen = max(padded or lengths)
    kwargs: Dict[str, Any] = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    if padded:
        kwargs.update(cu_seqlens_q_padded=offsets(padded), cu_seqlens_kv_padded=offsets(padded))
    if max_seqlen is not None:
        kwargs.update(max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    if pad_between_seqs is not None and "pad_between_seqs" in {
        f.name for f in dataclasses.fields(PackedSeqParams)
    }:
        kwargs["pad_between_seqs"] = pad_between_seqs
    kwargs.update(fields)
    return PackedSeqParams(**kwargs)


def forward(built: Built, x: torch.Tensor, packed: Any = None) -> torch.Tensor:
    """Run the layer on Megatron-layout ``x`` (``[s, b, h]``, or ``[t, 1, h]`` with ``packed``)."""
    mask = None
    if built.spec == "local" and packed is None:
        mask = causal_mask(x.size(0), x.device.type)
    kwargs = {"packed_seq_params": packed} if packed is not None else {}
    try:
        out, bias = built.module(x, mask, **kwargs)
    except Exception as exc:  # pylint: disable=broad-except
        if NO_BACKEND in str(exc):
            raise AssertionError(
                f"TE fell through to NoBackend at the first forward: {exc}; the adapter must "
                "decide the backend at build"
            ) from exc
        raise
    if bias is not None:
        out = out + bias
    return out


def run_fwd_bwd(
    built: Built, x: torch.Tensor, grad_out: torch.Tensor, packed: Any = None
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor], float]:
    """Forward + backward with upstream gradient ``grad_out``; gradients zeroed first.

    Returns:
        ``(output, input gradient, parameter gradients by DeepSeek name, milliseconds)``.
    """
    built.module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    sync()
    start = time.perf_counter()
    out = forward(built, x, packed)
    out.backward(grad_out.to(out.dtype))
    sync()
    ms = (time.perf_counter() - start) * 1e3
    return out.detach(), x.grad.detach(), megatron_grads(built), ms


def sync() -> None:
    """``torch.cuda.synchronize()`` where there is a GPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
