"""The GPU suite's config builder works on every release line (it runs on CPU too).

``tests/gpu/mla_build.py`` builds the MLA configs of every GPU phase. Its fields must exist on
each line's ``MLATransformerConfig``: 0.13 has no ``original_max_position_embeddings`` (YaRN
reads ``max_position_embeddings`` there), and a field the class lacks fails every GPU test of
the line at construction. Checked here, in the patched tree of each line, without a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

GPU_TESTS = Path(__file__).resolve().parents[1] / "gpu"


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(GPU_TESTS))
    try:
        import mla_build  # pylint: disable=import-outside-toplevel
        import oracles  # pylint: disable=import-outside-toplevel

        yield mla_build, oracles
    finally:
        sys.path.remove(str(GPU_TESTS))


@pytest.mark.parametrize("q_lora", [None, 64])
def test_megatron_config_builds_with_yarn_context(harness, q_lora):
    import dataclasses  # pylint: disable=import-outside-toplevel

    import torch  # pylint: disable=import-outside-toplevel

    mla_build, oracles = harness
    hyper = dataclasses.replace(oracles.V2_LITE, q_lora_rank=q_lora)
    config = mla_build.megatron_config(hyper, dtype=torch.float32, backend="auto")
    context = getattr(config, "original_max_position_embeddings", None)
    if context is None:  # 0.13: YaRN's pretraining context is max_position_embeddings
        context = config.max_position_embeddings
    assert context == hyper.rope.original_max_position_embeddings
    assert config.rotary_scaling_factor == hyper.rope.factor
    assert config.q_lora_rank == q_lora


def test_column_parallel_down_projections_are_told_by_inspection():
    """0.13's TE spec builds MLA's down projections column-parallel (its TP2+SP gradients are
    upstream's #1699 there, 2 x H200 2026-11-29); 0.14 on, ``TELinear``. The multi-GPU worker
    selects that known issue by this check, in the tree it runs."""
    multigpu = str(GPU_TESTS / "multigpu")
    sys.path[:0] = [multigpu, str(GPU_TESTS)]
    try:
        import dist_cases  # pylint: disable=import-outside-toplevel
        from megatron.core import package_info  # pylint: disable=import-outside-toplevel

        line = tuple(int(x) for x in package_info.__version__.split(".")[:2])
        assert dist_cases.te_down_projections_column_parallel() == (line == (0, 13))
        case = {"known_issue": {"ref": "#1699", "when": "te_down_projections_column_parallel"}}
        judged = dist_cases.for_side(case, "patched")["known_issue"]
        assert (judged is not None) == (line == (0, 13))
    finally:
        sys.path.remove(multigpu)
        sys.path.remove(str(GPU_TESTS))
