"""Question 2, hook H10: dev's context-parallel layouts (zigzag, contiguous) reach MLA.

dev's ``PackedSeqParams.cp_partition_mode`` says how a packed batch is split over the
context-parallel ranks; upstream's MLA runs zigzag only and its config refuses
``contiguous`` with MLA. With H10 MLA converts its input to zigzag and its output back with
upstream's converter, as upstream's ``Attention`` does. Here:

* on 2 and 4 CPU processes (gloo; ``cp_layouts.py`` run by ``torch.distributed.run``): for
  both layouts, the tokens and RoPE positions each rank gets equal upstream's zigzag path bit
  for bit (also with q's ``max_seqlen`` below kv's), the output and gradients come back in the
  batch's layout, and a real MLA layer on the contiguous batch equals it on the zigzag one;
* the config: ``contiguous`` with MLA passes where MLA layers convert (a gated DeltaNet
  hybrid), upstream's other rules stand, and a config the conversion cannot serve (a CUDA
  graph of the whole iteration) fails naming ``cp_partition_mode`` and ``zigzag``.

The layer under test sets ``config.cp_partition_mode`` after the config is built: a config
with ``contiguous`` under context parallelism also needs a sequence-packing scheduler, whose
check wants Transformer Engine 2.9+ (not on a CPU machine); which layout a layer sees is the
field's value either way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import mla_adapter
from mla_configs import SMALL, make_config

HERE = Path(__file__).resolve().parent
LAYOUTS = {f.name for f in dataclasses.fields(PackedSeqParams)}
pytestmark = pytest.mark.skipif(
    "cp_partition_mode" not in LAYOUTS,
    reason="this tree's PackedSeqParams has no cp_partition_mode (dev's context-parallel layouts)",
)

#: Checks every rank of ``cp_layouts.py`` must report, each for both layouts where it applies.
CHECKS = {
    "zigzag-is-upstream-layout",
    "mismatch-named",
    "route-kept",
    "no-route-in-capture",
    "layer/forward",
    "layer/input-grad",
    "layer/weight-grads",
    "layer/says-contiguous-after",
    "zigzag/untouched",
    "zigzag/q-below-kv/untouched",
} | {
    f"{layout}{variant}/{check}"
    for layout in ("zigzag", "contiguous")
    for variant in ("", "/q-below-kv")
    for check in (
        "chunks",
        "says-zigzag-inside",
        "positions",
        "rope-vs-upstream-zigzag",
        "rope-vs-whole-batch",
        "one-pass",
        "back",
        f"says-{layout}-after",
        "grad",
    )
}


@pytest.mark.parametrize("nproc", [2, 4])
def test_both_layouts_on_cpu_process_groups(nproc, tmp_path):
    env = dict(os.environ, MLA_SEAM_MEGATRON_TREE=os.environ["MLA_SEAM_MEGATRON_TREE"])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", str(HERE / "cp_layouts.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(nproc):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text(encoding="utf-8"))
        failed = {name: r.get("detail", "") for name, r in results.items() if not r["ok"]}
        assert not failed, f"rank {rank}: {failed}"
        assert set(results) == CHECKS, f"rank {rank}: {set(results) ^ CHECKS}"


def _contiguous(**overrides):
    return make_config(
        SMALL,
        context_parallel_size=2,
        cp_partition_mode="contiguous",
        sequence_packing_scheduler="dp_balanced",
        **overrides,
    )


TE_FOR_PACKING = "SFT sequence packing requires Transformer Engine >= 2.9.0"


def test_contiguous_with_mla_where_its_layers_convert(parallel_state):
    """A gated DeltaNet hybrid with MLA layers: upstream refuses it; patched, every layout rule
    passes (on a CPU machine the packing scheduler's Transformer Engine check, the last rule,
    then stops it; with TE 2.9+ the config is built)."""
    try:
        config = _contiguous(
            experimental_attention_variant="gated_delta_net", linear_attention_freq=2
        )
    except ValueError as exc:
        assert TE_FOR_PACKING in str(exc), str(exc)
    else:
        assert config.cp_partition_mode == "contiguous"
    assert mla_adapter.cp_layout_served(make_config(SMALL))


def test_upstreams_other_rules_stand(parallel_state):
    """Plain MLA: upstream's rule for every attention (contiguous needs a linear-attention or
    DSv4 variant). DSA builds its own absorbed MLA class, which H10 does not reach: upstream's
    MLA refusal stands."""
    with pytest.raises(ValueError, match="requires experimental_attention_variant"):
        _contiguous()
    with pytest.raises(ValueError, match="not supported with multi_latent_attention"):
        _contiguous(experimental_attention_variant="dsa")


def test_whole_iteration_graphs_name_the_layout_that_works(parallel_state):
    with pytest.raises(mla_adapter.MLACompatibilityError) as info:
        _contiguous(
            experimental_attention_variant="gated_delta_net",
            linear_attention_freq=2,
            cuda_graph_impl="full_iteration",
        )
    assert "cp_partition_mode='zigzag'" in str(info.value)
    assert "cuda_graph_impl='full_iteration'" in str(info.value)


def test_one_rank_takes_the_input_as_it_is(parallel_state):
    """Without context parallelism nothing moves, whatever the layout says."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    config = make_config(SMALL)
    config.cp_partition_mode = "contiguous"
    layer = type("Layer", (), {})()
    layer.config, layer.pg_collection = config, ProcessGroupCollection.use_mpu_process_groups()
    x = torch.randn(8, 1, 128)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32))
    hidden, back = mla_adapter.zigzag_cp_input(layer, x, params, None, None)
    assert hidden is x and back is None
    assert mla_adapter.cp_layout_output(layer, back, x) is x
