"""Independent oracles for Megatron's Multi-Latent Attention (MLA); importable without Megatron.

Two oracles, neither derived from Megatron's code:

* :func:`reference_mla`: plain PyTorch, written from the DeepSeek-V2 definition (paper section 2.1
  and the reference ``modeling_deepseek.py`` of DeepSeek-V2): low-rank query (optional) and
  key/value compression, RMSNorm on the latents, decoupled RoPE on a ``qk_rope_head_dim`` slice
  shared by all heads (rotary pairs interleaved ``(x0, x1), (x2, x3), ...``), YaRN frequencies
  and cos/sin temperature, and the softmax scale given explicitly by :func:`softmax_scale`
  (``mscale(factor, mscale_all_dim)^2 / sqrt(qk_head_dim)`` for YaRN, ``1/sqrt(qk_head_dim)``
  for plain RoPE). Runs in float32 or float64; every parameter it is given must be read
  (:class:`Consumed`).
* :func:`hf_attention`: HuggingFace transformers' ``DeepseekV3Attention`` (eager attention, an
  explicit additive causal mask), loaded with the same weights by ``load_state_dict(strict=True)``.

Parameters are held under DeepSeek's names (``q_proj``, ``q_a_proj``, ``q_a_layernorm``,
``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), which HF
uses too. :data:`MEGATRON_TO_DEEPSEEK` maps Megatron's parameter names onto them. The tensor
layouts agree (checked numerically by ``tests/gpu/test_oracles.py``, not assumed):

* ``kv_b_proj`` / ``linear_kv_up_proj`` rows are per head ``[k_nope | v]``, both sides;
* ``q_proj`` / ``linear_q_proj`` (and ``q_b_proj`` / ``linear_q_up_proj``) rows are per head
  ``[q_nope | q_rope]``; ``kv_a_proj_with_mqa`` / ``linear_kv_down_proj`` rows are
  ``[latent | k_rope]``;
* RoPE: DeepSeek de-interleaves the rotary slice (``view(d/2, 2).transpose``) before
  ``rotate_half``; HF's ``apply_rotary_pos_emb_interleave`` computes the same rotation on the
  even/odd slices; Megatron's ``mla_rotary_interleaved`` does the de-interleave. The rotated
  slice is left in the de-interleaved order on every side; q.k is unchanged by a permutation
  applied to both, and values carry no RoPE, so the layer output does not depend on that order.

Everything here is plain PyTorch (HF only inside :func:`hf_attention`), so the oracles run on a
CPU too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from mla_seam import deepseek

# ---------------------------------------------------------------------------------------------
# Hyperparameters (DeepSeek / HF names)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary position embedding of the ``qk_rope_head_dim`` slice.

    Attributes:
        kind: ``"rope"`` (plain RoPE, no scaling) or ``"yarn"``.
        theta: RoPE base.
        factor: YaRN context extension factor (ignored by plain RoPE).
        original_max_position_embeddings: YaRN pretraining context length.
        beta_fast: YaRN ramp bound (extrapolation side).
        beta_slow: YaRN ramp bound (interpolation side).
        mscale: YaRN cos/sin temperature numerator coefficient.
        mscale_all_dim: YaRN temperature denominator coefficient; also sets the softmax scale.
    """

    kind: str = deepseek.YARN["rope_type"]
    theta: float = 10000.0
    factor: float = deepseek.YARN["rotary_scaling_factor"]
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = deepseek.YARN["mscale"]
    mscale_all_dim: float = deepseek.YARN["mscale_all_dim"]


@dataclasses.dataclass(frozen=True)
class MLAHyper:
    """One MLA layer as DeepSeek defines it.

    Attributes:
        hidden_size: Model width.
        num_heads: Attention heads.
        q_lora_rank: Query compression rank, ``None`` for a direct ``q_proj``.
        kv_lora_rank: Key/value latent width.
        qk_nope_head_dim: Per-head q/k width without RoPE.
        qk_rope_head_dim: Width of the RoPE slice (shared key across heads).
        v_head_dim: Per-head value width.
        rope: The rotary embedding.
        rms_eps: RMSNorm epsilon of the latent norms.
        latent_norms: Whether the latents are RMS-normalized (DeepSeek: always). ``False`` only
            describes a Megatron model built without them (``qk_layernorm=False``).
        q_input_norm: An extra RMSNorm on the query input (not DeepSeek; describes Megatron
            0.19's QK-norm resolver for ``q_lora_rank=None`` with ``qk_layernorm=True``).
    """

    hidden_size: int = deepseek.V2_LITE["hidden_size"]
    num_heads: int = deepseek.V2_LITE["num_attention_heads"]
    q_lora_rank: Optional[int] = deepseek.V2_LITE["q_lora_rank"]
    kv_lora_rank: int = deepseek.V2_LITE["kv_lora_rank"]
    qk_nope_head_dim: int = deepseek.V2_LITE["qk_head_dim"]
    qk_rope_head_dim: int = deepseek.V2_LITE["qk_pos_emb_head_dim"]
    v_head_dim: int = deepseek.V2_LITE["v_head_dim"]
    rope: Rope = Rope()
    rms_eps: float = 1e-6
    latent_norms: bool = True
    q_input_norm: bool = False

    @property
    def qk_head_dim(self) -> int:
        """Width of one q/k head."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def replace(self, **changes) -> "MLAHyper":
        """A copy with ``changes`` applied (``rope=`` takes a :class:`Rope`)."""
        return dataclasses.replace(self, **changes)


YARN = Rope()  # mscale 0.707 != mscale_all_dim 1.0, factor 40 (mla_seam.deepseek.YARN)
PLAIN_ROPE = Rope(kind="rope")
#: DeepSeek-V2-Lite attention (mla_seam.deepseek.V2_LITE): hidden 2048, 16 heads, kv_lora 512,
#: no q_lora, 128/64/128.
V2_LITE = MLAHyper()
#: De-aliased: 32 heads, so hidden/heads (64) equals neither q/k (192) nor v (128).
DEALIASED = V2_LITE.replace(num_heads=32)
#: With a query LoRA (DeepSeek-V2 / V3 q path).
Q_LORA = V2_LITE.replace(q_lora_rank=1536)
DIMS = {"v2lite": V2_LITE, "dealiased": DEALIASED, "qlora": Q_LORA}
ROPES = {"yarn": YARN, "rope": PLAIN_ROPE}

#: Tolerances per compute dtype of the model under test, against a float64 oracle:
#: max |got - want| / max |want| for the output and for every gradient (input and parameters).
#: float64: Megatron's RoPE tables are float32 (angles and cos/sin), ~1e-6 at 64 positions.
#: float32: plus float32 accumulation; RoPE angles at position p are off by ~p * 6e-8 rad,
#: measured <= 6e-6 at 64 positions and <= 6e-5 at 1500 on CPU.
#: tf32: Transformer Engine runs float32 GEMMs as TF32 (cuBLASLt FAST_TF32, 10-bit mantissa).
#: bfloat16: 8-bit mantissa on weights, inputs and intermediates, float32 accumulation in the
#: attention kernels (TE). Measured on CPU, local spec, 64 positions: <= 1.3e-2 / 5.8e-2.
#: bfloat16-softmax: Megatron's local attention also takes the softmax in bf16 by default
#: (attention_softmax_in_fp32=False); measured on CPU at 1500 positions: 4.3e-2 / 7.7e-2.
TOLERANCES: Dict[str, Tuple[float, float]] = {
    "float64": (1e-5, 1e-5),
    "float32": (2e-4, 4e-4),
    "tf32": (5e-3, 1e-2),
    "bfloat16": (3e-2, 1e-1),
    "bfloat16-softmax": (8e-2, 1.5e-1),
}


def tolerance(
    dtype: torch.dtype, tf32: bool = False, bf16_softmax: bool = False
) -> Tuple[float, float]:
    """``(output, gradient)`` tolerance for a model computing in ``dtype``.

    Args:
        dtype: Parameter/activation dtype of the model under test.
        tf32: Whether its float32 GEMMs run as TF32 (TE spec, or torch with TF32 allowed).
        bf16_softmax: Whether a bfloat16 model also takes the softmax in bfloat16 (Megatron's
            local attention with ``attention_softmax_in_fp32=False``).
    """
    name = str(dtype).replace("torch.", "")
    if name == "float32" and tf32:
        name = "tf32"
    if name == "bfloat16" and bf16_softmax:
        name = "bfloat16-softmax"
    return TOLERANCES[name]


# ---------------------------------------------------------------------------------------------
# Softmax scale and RoPE, from the DeepSeek-V2 definition
# ---------------------------------------------------------------------------------------------


def yarn_get_mscale(scale: float, mscale: float) -> float:
    """YaRN temperature: ``0.1 * mscale * ln(scale) + 1`` above scale 1, else 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(hyper: MLAHyper) -> float:
    """The softmax scale DeepSeek-V2 uses (given explicitly to every oracle).

    ``qk_head_dim^-0.5``; with YaRN and a non-zero ``mscale_all_dim`` multiplied by
    ``yarn_get_mscale(factor, mscale_all_dim)^2``. Plain RoPE has no YaRN factor.
    """
    scale = hyper.qk_head_dim**-0.5
    rope = hyper.rope
    if rope.kind == "yarn" and rope.mscale_all_dim:
        m = yarn_get_mscale(rope.factor, rope.mscale_all_dim)
        scale *= m * m
    return scale


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_inv_freq(hyper: MLAHyper) -> Tuple[torch.Tensor, float]:
    """Inverse frequencies (float64) of the RoPE slice and the cos/sin temperature.

    Returns:
        ``(inv_freq [dim/2], temperature)``; YaRN blends interpolated and extrapolated
        frequencies with a linear ramp between the correction dims of ``beta_fast`` and
        ``beta_slow`` and scales cos/sin by ``mscale(factor, mscale) / mscale(factor,
        mscale_all_dim)``.
    """
    rope, dim = hyper.rope, hyper.qk_rope_head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    extra = 1.0 / (rope.theta**exponents)
    if rope.kind == "rope":
        return extra, 1.0
    if rope.kind != "yarn":
        raise ValueError(f"unknown RoPE kind {rope.kind!r}")
    inter = 1.0 / (rope.factor * rope.theta**exponents)
    low = math.floor(
        _correction_dim(rope.beta_fast, dim, rope.theta, rope.original_max_position_embeddings)
    )
    high = math.ceil(
        _correction_dim(rope.beta_slow, dim, rope.theta, rope.original_max_position_embeddings)
    )
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp
    inv_freq = inter * (1 - extrapolate) + extra * extrapolate
    temperature = yarn_get_mscale(rope.factor, rope.mscale) / yarn_get_mscale(
        rope.factor, rope.mscale_all_dim
    )
    return inv_freq, temperature


def rope_cos_sin(hyper: MLAHyper, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` (float64, ``[..., dim]`` as ``cat(freqs, freqs)``) at integer positions."""
    inv_freq, temperature = rope_inv_freq(hyper)
    freqs = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * temperature, emb.sin() * temperature


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2's ``apply_rotary_pos_emb``: de-interleave the pairs, then rotate half."""
    *lead, d = x.shape
    x = x.reshape(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def parameter_shapes(hyper: MLAHyper) -> Dict[str, Tuple[int, ...]]:
    """Every parameter of the layer, DeepSeek names, ``nn.Linear`` ``[out, in]`` layout."""
    h, n = hyper.hidden_size, hyper.num_heads
    shapes: Dict[str, Tuple[int, ...]] = {}
    if hyper.q_lora_rank is None:
        if hyper.q_input_norm:
            shapes["q_input_layernorm.weight"] = (h,)
        shapes["q_proj.weight"] = (n * hyper.qk_head_dim, h)
    else:
        shapes["q_a_proj.weight"] = (hyper.q_lora_rank, h)
        if hyper.latent_norms:
            shapes["q_a_layernorm.weight"] = (hyper.q_lora_rank,)
        shapes["q_b_proj.weight"] = (n * hyper.qk_head_dim, hyper.q_lora_rank)
    shapes["kv_a_proj_with_mqa.weight"] = (hyper.kv_lora_rank + hyper.qk_rope_head_dim, h)
    if hyper.latent_norms:
        shapes["kv_a_layernorm.weight"] = (hyper.kv_lora_rank,)
    shapes["kv_b_proj.weight"] = (
        n * (hyper.qk_nope_head_dim + hyper.v_head_dim),
        hyper.kv_lora_rank,
    )
    shapes["o_proj.weight"] = (h, n * hyper.v_head_dim)
    return shapes


def init_params(
    hyper: MLAHyper,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
) -> Dict[str, torch.Tensor]:
    """Random parameters: linear weights ``N(0, 1/fan_in)``, norm weights ``U(0.5, 1.5)``.

    Norm weights are deliberately not ones, so a norm whose weight is dropped or swapped shows.
    """
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in parameter_shapes(hyper).items():
        if "layernorm" in name:
            value = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
        else:
            value = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[1])
        params[name] = value.to(device=device, dtype=dtype)
    return params


def make_input(
    shape: Sequence[int], seed: int = 1, dtype: torch.dtype = torch.float64, device: str = "cpu"
) -> torch.Tensor:
    """An input whose per-token RMS spans 0.25..4 with a non-zero mean: never only unit RMS.

    An extra or missing RMSNorm on an input is invisible on unit-RMS inputs with unit norm
    weights; this input makes it a large difference.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    log_rms = torch.empty(*shape[:-1], 1, dtype=torch.float64).uniform_(
        math.log(0.25), math.log(4.0), generator=gen
    )
    x = (x + 0.3) * log_rms.exp()
    return x.to(device=device, dtype=dtype)


class Consumed(dict):
    """A parameter dict that remembers which entries were read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read: set = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)

    def unread(self) -> List[str]:
        """Names never read."""
        return sorted(set(self) - self.read)


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(variance + eps) * weight


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x @ weight.t()


def causal_layout(batch: int, seq: int, device: str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(positions [b, s], allowed [b, s, s])`` for causal attention within each row."""
    positions = torch.arange(seq, device=device).expand(batch, seq)
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril().expand(batch, seq, seq)
    return positions, allowed


def packed_layout(
    lengths: Sequence[int], padded: Optional[Sequence[int]] = None, device: str = "cpu"
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """THD packing as one row: positions restart per sequence, attention stays inside it.

    Args:
        lengths: Tokens of each sequence.
        padded: Slots each sequence occupies (``>= lengths``); ``None`` for no padding.
        device: Where the tensors go.

    Returns:
        ``(positions [1, t], allowed [1, t, t], real [t])``: ``real`` marks tokens that belong
        to a sequence (padding slots attend only to themselves and are zeroed in the output).
    """
    padded = list(padded or lengths)
    total = sum(padded)
    segment = torch.full((total,), -1, dtype=torch.long)
    positions = torch.zeros(total, dtype=torch.long)
    start = 0
    for i, (n, p) in enumerate(zip(lengths, padded)):
        segment[start : start + n] = i
        positions[start : start + n] = torch.arange(n)
        start += p
    index = torch.arange(total)
    same = segment[:, None] == segment[None, :]
    allowed = same & (segment[:, None] >= 0) & (index[None, :] <= index[:, None])
    real = segment >= 0
    allowed[index[~real], index[~real]] = True
    return positions[None].to(device), allowed[None].to(device), real.to(device)


def reference_mla(
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    hyper: MLAHyper,
    positions: Optional[torch.Tensor] = None,
    allowed: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """DeepSeek-V2 MLA forward.

    Args:
        params: Parameters under DeepSeek names (a :class:`Consumed` to track reads).
        x: Input ``[b, s, hidden]`` (batch first, as DeepSeek).
        hyper: The layer's hyperparameters.
        positions: Integer positions ``[b, s]``; default ``0..s-1``.
        allowed: Bool ``[b, s, s]``: query i may attend key j; default causal.
        scale: Softmax scale; default :func:`softmax_scale`.

    Returns:
        ``[b, s, hidden]`` in ``x``'s dtype.
    """
    b, s, _ = x.shape
    n, d_nope, d_rope, d_v = (
        hyper.num_heads,
        hyper.qk_nope_head_dim,
        hyper.qk_rope_head_dim,
        hyper.v_head_dim,
    )
    if positions is None or allowed is None:
        positions, allowed = causal_layout(b, s, x.device)
    scale = softmax_scale(hyper) if scale is None else scale

    # Query: direct projection, or down -> RMSNorm -> up.
    if hyper.q_lora_rank is None:
        q_in = x
        if hyper.q_input_norm:
            q_in = _rms_norm(x, params["q_input_layernorm.weight"], hyper.rms_eps)
        q = _linear(q_in, params["q_proj.weight"])
    else:
        c_q = _linear(x, params["q_a_proj.weight"])
        if hyper.latent_norms:
            c_q = _rms_norm(c_q, params["q_a_layernorm.weight"], hyper.rms_eps)
        q = _linear(c_q, params["q_b_proj.weight"])
    q = q.view(b, s, n, d_nope + d_rope).transpose(1, 2)  # [b, n, s, d]
    q_nope, q_pe = q.split([d_nope, d_rope], dim=-1)

    # Key/value: joint compression to a latent plus a shared RoPE key.
    kv_a = _linear(x, params["kv_a_proj_with_mqa.weight"])
    c_kv, k_pe = kv_a.split([hyper.kv_lora_rank, d_rope], dim=-1)
    if hyper.latent_norms:
        c_kv = _rms_norm(c_kv, params["kv_a_layernorm.weight"], hyper.rms_eps)
    kv = _linear(c_kv, params["kv_b_proj.weight"]).view(b, s, n, d_nope + d_v).transpose(1, 2)
    k_nope, v = kv.split([d_nope, d_v], dim=-1)

    cos, sin = rope_cos_sin(hyper, positions)  # [b, s, d_rope]
    q_pe = apply_rope(q_pe, cos[:, None], sin[:, None])
    k_pe = apply_rope(k_pe[:, None], cos[:, None], sin[:, None])  # [b, 1, s, d_rope]

    query = torch.cat([q_nope, q_pe], dim=-1)
    key = torch.cat([k_nope, k_pe.expand(b, n, s, d_rope)], dim=-1)
    scores = (query @ key.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, s, n * d_v)
    return _linear(out, params["o_proj.weight"])


def reference_packed(
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    hyper: MLAHyper,
    lengths: Sequence[int],
    padded: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """:func:`reference_mla` on THD input ``[t, hidden]``; padding slots come out zero."""
    positions, allowed, real = packed_layout(lengths, padded, x.device)
    out = reference_mla(params, x[None], hyper, positions, allowed)[0]
    return out * real[:, None].to(out.dtype)


# ---------------------------------------------------------------------------------------------
# Megatron <-> DeepSeek names
# ---------------------------------------------------------------------------------------------

#: Megatron MLASelfAttention parameter -> DeepSeek parameter. Local spec and TE spec names;
#: TE fuses the latent norms into the following up projection (``layer_norm_weight``).
MEGATRON_TO_DEEPSEEK: Dict[str, str] = {
    "linear_q_proj.weight": "q_proj.weight",
    "linear_q_down_proj.weight": "q_a_proj.weight",
    "q_layernorm.weight": "q_a_layernorm.weight",
    "linear_q_up_proj.layer_norm_weight": "q_a_layernorm.weight",
    "linear_q_up_proj.weight": "q_b_proj.weight",
    "linear_kv_down_proj.weight": "kv_a_proj_with_mqa.weight",
    "kv_layernorm.weight": "kv_a_layernorm.weight",
    "linear_kv_up_proj.layer_norm_weight": "kv_a_layernorm.weight",
    "linear_kv_up_proj.weight": "kv_b_proj.weight",
    "linear_proj.weight": "o_proj.weight",
    # Not DeepSeek: Megatron 0.19 fuses an RMSNorm on the query input into linear_q_proj when
    # q_lora_rank is None and qk_layernorm is True (QK-norm resolver, PR #4452).
    "linear_q_proj.layer_norm_weight": "q_input_layernorm.weight",
}


class MappingError(AssertionError):
    """Megatron's parameters and the reference's do not correspond one to one."""


def map_parameters(megatron_names: Iterable[str], reference_names: Iterable[str]) -> Dict[str, str]:
    """Megatron name -> DeepSeek name for every Megatron parameter, checked both ways.

    Args:
        megatron_names: Names of the Megatron module's non-empty parameters.
        reference_names: Names of the reference's parameters.

    Returns:
        The mapping.

    Raises:
        MappingError: A Megatron parameter has no DeepSeek counterpart (the Megatron model has
            something DeepSeek's does not), or a reference parameter is not covered (the
            Megatron model lacks something DeepSeek's has), or two map to one.
    """
    reference = set(reference_names)
    mapping, unknown = {}, []
    for name in megatron_names:
        target = MEGATRON_TO_DEEPSEEK.get(name)
        if target is None or target not in reference:
            unknown.append(name)
        else:
            mapping[name] = target
    targets = list(mapping.values())
    doubled = sorted({t for t in targets if targets.count(t) > 1})
    missing = sorted(reference - set(targets))
    if unknown or missing or doubled:
        raise MappingError(
            f"Megatron parameters without a reference counterpart: {unknown}; reference "
            f"parameters Megatron lacks: {missing}; mapped twice: {doubled}"
        )
    return mapping


# ---------------------------------------------------------------------------------------------
# HuggingFace transformers' DeepseekV3Attention
# ---------------------------------------------------------------------------------------------


def hf_available() -> Tuple[bool, str]:
    """Whether HF's ``DeepseekV3Attention`` imports here, and why not."""
    try:
        from transformers.models.deepseek_v3 import (  # noqa: F401  pylint: disable=C0415
            modeling_deepseek_v3,
        )
    except Exception as exc:  # pylint: disable=broad-except
        return False, f"HF transformers' DeepseekV3Attention does not import: {exc}"
    return True, ""


def hf_config(hyper: MLAHyper):
    """The ``DeepseekV3Config`` describing ``hyper`` (eager attention, no dropout)."""
    from transformers import DeepseekV3Config  # pylint: disable=C0415

    rope = hyper.rope
    if rope.kind == "yarn":
        rope_parameters = {
            "rope_type": "yarn",
            "rope_theta": rope.theta,
            "factor": rope.factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
            "beta_fast": rope.beta_fast,
            "beta_slow": rope.beta_slow,
            "mscale": rope.mscale,
            "mscale_all_dim": rope.mscale_all_dim,
        }
        max_positions = int(rope.original_max_position_embeddings * rope.factor)
    else:
        rope_parameters = {"rope_type": "default", "rope_theta": rope.theta}
        max_positions = 163840
    config = DeepseekV3Config(
        hidden_size=hyper.hidden_size,
        num_attention_heads=hyper.num_heads,
        num_key_value_heads=hyper.num_heads,
        q_lora_rank=hyper.q_lora_rank,
        kv_lora_rank=hyper.kv_lora_rank,
        qk_nope_head_dim=hyper.qk_nope_head_dim,
        qk_rope_head_dim=hyper.qk_rope_head_dim,
        v_head_dim=hyper.v_head_dim,
        rms_norm_eps=hyper.rms_eps,
        rope_parameters=rope_parameters,
        rope_interleave=True,
        max_position_embeddings=max_positions,
        attention_bias=False,
        attention_dropout=0.0,
        num_hidden_layers=1,
    )
    config._attn_implementation = "eager"  # pylint: disable=protected-access
    return config


def hf_attention(hyper: MLAHyper, params: Mapping[str, torch.Tensor]):
    """HF ``DeepseekV3Attention`` (+ its rotary embedding) holding ``params``.

    Args:
        hyper: Must describe a DeepSeek layer (latent norms, no query input norm).
        params: DeepSeek-named parameters; loaded with ``strict=True``.

    Returns:
        ``(attention, rotary)`` modules in ``params``' dtype and device.
    """
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # pylint: disable=C0415
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    if not hyper.latent_norms or hyper.q_input_norm:
        raise ValueError("HF's DeepseekV3Attention describes DeepSeek's layer only")
    config = hf_config(hyper)
    attention = DeepseekV3Attention(config, layer_idx=0)
    first = next(iter(params.values()))
    attention.to(dtype=first.dtype, device=first.device)
    attention.load_state_dict(dict(params), strict=True)
    rotary = DeepseekV3RotaryEmbedding(config).to(first.device)
    return attention, rotary


def hf_forward(
    modules, x: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Run :func:`hf_attention`'s modules on ``x [b, s, hidden]`` with an explicit mask."""
    attention, rotary = modules
    cos, sin = rotary(x, positions)
    mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
    mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min)[:, None]
    out, _ = attention(x, position_embeddings=(cos, sin), attention_mask=mask)
    return out


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` in float64 (0 when both are zero)."""
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    if scale == 0.0:
        return diff
    return diff / scale
