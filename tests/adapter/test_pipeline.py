"""Question 4: pipeline offsets and per-layer lists, against upstream's own function."""

from __future__ import annotations

import inspect
import itertools

import pytest
from megatron.core.transformer import mla_adapter
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from mla_configs import SMALL, make_config


def _grid():
    """(num_layers, pp, vp, first, last, embedding, loss) combinations upstream accepts."""
    cases = []
    for layers, pp, vp in itertools.product((8, 12, 16, 24), (2, 4), (None, 2)):
        for first, last in ((None, None), (2, None), (None, 2), (2, 2), (4, 4)):
            if first is not None or last is not None:
                middle = pp - (first is not None) - (last is not None)
                rest = layers - (first or 0) - (last or 0)
                if middle < 0 or rest < 0 or (middle and rest % (middle * (vp or 1))):
                    continue
                if (middle == 0) != (rest == 0):
                    continue  # Megatron's config refuses empty middle stages and vice versa
                if any(x is not None and x % (vp or 1) for x in (first, last)):
                    continue
                cases.append((layers, pp, vp, first, last, False, False))
            else:
                for emb, loss in ((False, False), (True, True), (True, False)):
                    total = layers + emb + loss
                    if total % (pp * (vp or 1)) == 0:
                        cases.append((layers, pp, vp, None, None, emb, loss))
    return cases


def _upstream_offset(monkeypatch, config, vp_stage, rank):
    """Upstream's offset for ``rank``; releases without ``pp_rank`` (0.13, 0.14) read it from
    parallel_state, which is pointed at that rank for the call."""
    if "pp_rank" in inspect.signature(get_transformer_layer_offset).parameters:
        return get_transformer_layer_offset(config, vp_stage, rank)
    from megatron.core import parallel_state as ps

    def first_stage(ignore_virtual=True, vp_stage=None):
        return rank == 0 and (ignore_virtual or not vp_stage)

    monkeypatch.setattr(ps, "get_pipeline_model_parallel_rank", lambda *a, **k: rank)
    monkeypatch.setattr(ps, "is_pipeline_first_stage", first_stage)
    for name, value in (
        ("is_inside_encoder", False),
        ("get_pipeline_model_parallel_decoder_start", None),
    ):
        if hasattr(ps, name):
            monkeypatch.setattr(ps, name, lambda *a, _v=value, **k: _v)
    return get_transformer_layer_offset(config, vp_stage)


def _pipeline_config(layers, pp, vp, first, last, emb=False, loss=False):
    return make_config(
        SMALL,
        num_layers=layers,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        account_for_embedding_in_pipeline_split=emb,
        account_for_loss_in_pipeline_split=loss,
        pipeline_dtype=__import__("torch").float32,
    )


@pytest.mark.parametrize("layers,pp,vp,first,last,emb,loss", _grid())
def test_layer_offset_equals_upstream(layers, pp, vp, first, last, emb, loss, monkeypatch):
    config = _pipeline_config(layers, pp, vp, first, last, emb, loss)
    for rank in range(pp):
        for stage in range(vp or 1):
            vp_stage = stage if vp else None
            ours = mla_adapter.layer_offset(config, vp_stage, rank)
            try:
                theirs = _upstream_offset(monkeypatch, config, vp_stage, rank)
            except ZeroDivisionError:
                # Upstream divides by the number of middle stages, zero when first and last
                # stage are both set on pp=2 with interleaving; ours still places every layer.
                assert first is not None and last is not None and pp == 2 and vp
                assert ours == stage * (first + last) // vp + (rank and first // vp)
                continue
            assert ours == theirs, (rank, vp_stage)


def test_offsets_cover_every_layer_once():
    config = make_config(
        SMALL,
        num_layers=16,
        pipeline_model_parallel_size=4,
        virtual_pipeline_model_parallel_size=2,
        num_layers_in_first_pipeline_stage=2,
        num_layers_in_last_pipeline_stage=2,
        pipeline_dtype=__import__("torch").float32,
    )
    counts = mla_adapter._stage_layer_counts(config)
    starts = sorted(mla_adapter.layer_offset(config, v, r) for v in range(2) for r in range(4))
    assert sum(counts) * 2 == 16
    assert starts[0] == 0 and len(set(starts)) == 8


def test_no_pipeline_means_no_offset():
    assert mla_adapter.layer_offset(make_config(SMALL), None, 0) == 0


def test_per_layer_value_uses_one_based_layer_numbers():
    values = ["p2p", "a2a", "allgather"]
    assert [mla_adapter.per_layer_value(values, n) for n in (1, 2, 3)] == values
    assert mla_adapter.per_layer_value("p2p", 7) == "p2p"


@pytest.mark.parametrize("layer", [0, 4])
def test_per_layer_value_names_a_short_list(layer):
    with pytest.raises(mla_adapter.MLACompatibilityError, match="3 entries"):
        mla_adapter.per_layer_value(["p2p"] * 3, layer)


@pytest.mark.parametrize(
    "layers,pp,vp,first,last", [(8, 4, 2, None, 2), (14, 4, 2, None, 2), (12, 3, 2, None, 4)]
)
def test_upstream_offsets_tile_the_layers_with_uneven_vpp(layers, pp, vp, first, last, monkeypatch):
    """Uneven PP + VPP: every layer is held by exactly one chunk (0.13.x miscounts: hook H7)."""
    config = _pipeline_config(layers, pp, vp, first, last)
    counts = mla_adapter._stage_layer_counts(config)
    held = []
    for stage in range(vp):
        for rank in range(pp):
            start = _upstream_offset(monkeypatch, config, stage, rank)
            held += range(start, start + counts[rank])
    assert sorted(held) == list(range(layers))


def test_pipeline_offset_hook_leaves_other_models_alone():
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=8,
        hidden_size=64,
        num_attention_heads=4,
        pipeline_model_parallel_size=4,
        virtual_pipeline_model_parallel_size=2,
        num_layers_in_last_pipeline_stage=2,
        pipeline_dtype=__import__("torch").float32,
    )
    assert mla_adapter.pipeline_layer_offset(config, 1, 2, 99) == 99
    mla = _pipeline_config(8, 4, 2, None, 2)
    assert mla_adapter.pipeline_layer_offset(mla, 1, 2, 99) == mla_adapter.layer_offset(mla, 1, 2)
