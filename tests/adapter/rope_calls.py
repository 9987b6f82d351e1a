"""Upstream's THD RoPE called as the tree's own MLA calls it (``test_rope.py``, ``test_thd_host.py``).

MLA's ``get_query_key_value_tensors`` hands ``apply_rotary_pos_emb`` (through hook H8) the
packed offsets, ``mscale`` and the CP group, plus what the release's function takes:
``mla_rotary_interleaved=True`` (0.19+) and ``max_seqlen`` (upstream main: the larger of
``max_seqlen_q/kv`` for q and k; dev: ``max_seqlen_q`` for q, ``max_seqlen_kv`` for k; dev's
THD RoPE refuses a call without it). :func:`mla_rope_kwargs` gives those keywords for this
tree, by the signature of its function, so the adapter's one-pass path and upstream's are
called alike.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Sequence

import torch
from megatron.core.models.common.embeddings import rope_utils


class CPGroup:
    """The two questions RoPE asks a context-parallel group (no collective is run)."""

    def __init__(self, size: int = 1, rank: int = 0) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def offsets(lengths: Sequence[int], device: str = "cpu") -> torch.Tensor:
    """``cu_seqlens`` of ``lengths``: int32, starting at 0."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def freqs(max_len: int, dim: int = 16, device: str = "cpu") -> torch.Tensor:
    """A RoPE table ``[max_len, 1, 1, dim]`` as Megatron's ``RotaryEmbedding`` lays it out."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :].to(device)


def takes(name: str) -> bool:
    """Whether this tree's ``apply_rotary_pos_emb`` has a parameter ``name``."""
    return name in inspect.signature(rope_utils.apply_rotary_pos_emb).parameters


def mla_rope_kwargs(max_seqlen: Optional[int], **extra: Any) -> Dict[str, Any]:
    """The keywords MLA adds to ``cu_seqlens``/``mscale``/``cp_group`` on this tree.

    Args:
        max_seqlen: The ``max_seqlen`` MLA passes for this side (dropped where the tree's
            function has no such parameter).
        extra: Further options (``inverse``, ...), kept only where the function takes them.

    Returns:
        Keyword arguments for ``apply_rotary_pos_emb`` and the adapter's function alike.
    """
    kwargs: Dict[str, Any] = {}
    if takes("mla_rotary_interleaved"):
        kwargs["mla_rotary_interleaved"] = True
    if takes("max_seqlen"):
        kwargs["max_seqlen"] = max_seqlen
    kwargs.update({k: v for k, v in extra.items() if takes(k)})
    return kwargs


def upstream(
    t: torch.Tensor,
    table: torch.Tensor,
    config: Any,
    cu: torch.Tensor,
    cp_group: Any = None,
    mscale: float = 1.0,
    max_seqlen: Optional[int] = None,
    **extra: Any,
) -> torch.Tensor:
    """Upstream's ``apply_rotary_pos_emb`` on a THD tensor, called as MLA calls it."""
    return rope_utils.apply_rotary_pos_emb(
        t,
        table,
        config=config,
        cu_seqlens=cu,
        mscale=mscale,
        cp_group=cp_group or CPGroup(),
        **mla_rope_kwargs(max_seqlen, **extra),
    )
