"""Upstream's ``get_transformer_layer_offset`` over every (pp_rank, vp_stage) of a layout.

Shared by ``test_pipeline.py`` (inside a patched tree) and ``tests/test_adapter_lines.py``,
which runs this file as a script in a VANILLA checkout of each release (one Megatron per
interpreter):

    python tests/adapter/pipeline_offsets.py MEGATRON_TREE

prints ``{layout: {"pp_rank,vp_stage": offset or "ZeroDivisionError: ..."}}`` for
:data:`LAYOUTS`, MLA and non-MLA configs, as one JSON line.

Upstream's real function is called: with ``pp_rank`` where its signature takes it (0.15+);
on 0.13 and 0.14 the rank (and the virtual pipeline size, read by the embedding branch) is set
through ``parallel_state``'s own setters for the call and restored after it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

HERE = Path(__file__).resolve().parent

#: ``name -> (num_layers, pp, vp, first, last)``.
LAYOUTS = {
    # No middle stage: upstream's virtual-stage branch divides by zero on pp_rank 1 (H7).
    "pp2-vpp2-first4-last2": (6, 2, 2, 4, 2),
    # Two middle stages: upstream counts right on every line.
    "pp4-vpp2-first2-last2": (12, 4, 2, 2, 2),
    # First stage not customized: 0.13.x counts the middle stages from rank 1 (H7).
    "pp4-vpp2-last2": (8, 4, 2, None, 2),
}

#: The offsets of :data:`LAYOUTS`, counted by hand: layers go chunk by chunk, virtual stage 0
#: of every rank first; the first / last rank holds ``first`` / ``last`` layers split evenly
#: over its virtual stages, the middle ranks share the rest evenly.
EXPECTED = {
    # chunks of 2, 1 | 2, 1 layers
    "pp2-vpp2-first4-last2": {(0, 0): 0, (1, 0): 2, (0, 1): 3, (1, 1): 5},
    # chunks of 1, 2, 2, 1 | 1, 2, 2, 1 layers
    "pp4-vpp2-first2-last2": {
        (0, 0): 0, (1, 0): 1, (2, 0): 3, (3, 0): 5,
        (0, 1): 6, (1, 1): 7, (2, 1): 9, (3, 1): 11,
    },
    # chunks of 1, 1, 1, 1 | 1, 1, 1, 1 layers
    "pp4-vpp2-last2": {
        (0, 0): 0, (1, 0): 1, (2, 0): 2, (3, 0): 3,
        (0, 1): 4, (1, 1): 5, (2, 1): 6, (3, 1): 7,
    },
}  # fmt: skip


def chunk_sizes(name: str) -> Dict[Tuple[int, int], int]:
    """Layers of every ``(pp_rank, vp_stage)`` chunk of layout ``name``, counted by hand."""
    layers, pp, vp, first, last = LAYOUTS[name]
    middle = pp - (first is not None) - (last is not None)
    rest = layers - (first or 0) - (last or 0)
    per_rank = [rest // middle if middle else 0] * pp
    if first is not None:
        per_rank[0] = first
    if last is not None:
        per_rank[-1] = last
    return {(r, s): per_rank[r] // vp for r in range(pp) for s in range(vp)}


def make(name: str, mla: bool = True):
    """A config of layout ``name``: MLA (the adapter's tests' small dims) or a plain GPT one."""
    import torch

    layers, pp, vp, first, last = LAYOUTS[name]
    layout = dict(
        num_layers=layers,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        pipeline_dtype=torch.float32,
    )
    if mla:
        sys.path.insert(0, str(HERE))
        from mla_configs import SMALL, make_config  # pylint: disable=C0415

        return make_config(SMALL, **layout)
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(hidden_size=64, num_attention_heads=4, **layout)


@contextlib.contextmanager
def pipeline_rank(rank: int, vp_size: Optional[int]) -> Iterator[None]:
    """``parallel_state``'s pipeline rank and virtual pipeline size set for a call, restored."""
    from megatron.core import parallel_state as ps

    saved = (ps._MPU_PIPELINE_MODEL_PARALLEL_RANK, ps._VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE)
    ps.set_pipeline_model_parallel_rank(rank)
    ps.set_virtual_pipeline_model_parallel_world_size(vp_size)
    try:
        yield
    finally:
        ps.set_pipeline_model_parallel_rank(saved[0])
        ps.set_virtual_pipeline_model_parallel_world_size(saved[1])


def upstream_offset(config, vp_stage: Optional[int], rank: int) -> int:
    """Upstream's ``get_transformer_layer_offset(config, vp_stage)`` on pipeline rank ``rank``."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if "pp_rank" in inspect.signature(get_transformer_layer_offset).parameters:
        return get_transformer_layer_offset(config, vp_stage, rank)
    with pipeline_rank(rank, config.virtual_pipeline_model_parallel_size):
        return get_transformer_layer_offset(config, vp_stage)


def offsets(config) -> Dict[Tuple[int, int], Union[int, str]]:
    """``{(pp_rank, vp_stage): offset}`` of every chunk; an exception as ``"Type: message"``."""
    out: Dict[Tuple[int, int], Union[int, str]] = {}
    for stage in range(config.virtual_pipeline_model_parallel_size or 1):
        for rank in range(config.pipeline_model_parallel_size):
            vp_stage = stage if config.virtual_pipeline_model_parallel_size else None
            try:
                out[(rank, stage)] = int(upstream_offset(config, vp_stage, rank))
            except ZeroDivisionError as exc:
                out[(rank, stage)] = f"{type(exc).__name__}: {exc}"
    return out


def init_parallel_state() -> None:
    """A one-process gloo group and Megatron's parallel state (TP=PP=CP=1) on the CPU."""
    import torch
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 200))
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()


def main(argv) -> int:
    """Print every layout's offsets in the tree ``argv[1]`` as one JSON line."""
    sys.path.insert(0, str(Path(argv[1]).resolve()))
    init_parallel_state()
    doc = {}
    for name in LAYOUTS:
        for mla in (True, False):
            table = offsets(make(name, mla))
            doc[f"{name}/{'mla' if mla else 'gpt'}"] = {
                f"{r},{s}": v for (r, s), v in table.items()
            }
    sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
