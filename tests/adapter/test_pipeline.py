"""Question 4: pipeline offsets and per-layer lists, against upstream's own function."""

from __future__ import annotations

import inspect
import itertools
import logging

import pytest
from megatron.core.transformer import mla_adapter
from mla_configs import SMALL, make_config
from pipeline_offsets import EXPECTED, LAYOUTS, chunk_sizes, make, offsets, upstream_offset


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


def _own_offset(monkeypatch, config, vp_stage, rank):
    """Upstream's own count: its function with H7's question answered ``None`` (the adapter
    out of the way), on pipeline rank ``rank``."""
    with monkeypatch.context() as patch:
        patch.setattr(mla_adapter, "pipeline_layer_offset", lambda *args, **kwargs: None)
        return upstream_offset(config, vp_stage, rank)


def _hook_answer(monkeypatch, config, vp_stage, rank):
    """The adapter's answer to H7 as this tree's hook asks it (with the arguments its line's
    patch passes: 0.13's says ``rank_minus_one=True``), on pipeline rank ``rank``."""
    answers = []

    def ask(*args, **kwargs):
        answers.append(real(*args, **kwargs))
        return answers[-1]

    real = mla_adapter.pipeline_layer_offset
    with monkeypatch.context() as patch:
        patch.setattr(mla_adapter, "pipeline_layer_offset", ask)
        upstream_offset(config, vp_stage, rank)
    assert len(answers) == 1, answers  # the hook asks once, on entry
    return answers[0]


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
def test_layer_offset_equals_upstream(
    layers, pp, vp, first, last, emb, loss, monkeypatch, parallel_state
):
    """In the patched tree upstream's function gives the adapter's offsets on every layout, and
    the adapter answers (H7) exactly the layouts upstream's own count gets wrong."""
    config = _pipeline_config(layers, pp, vp, first, last, emb, loss)
    upstream_wrong = answered = False
    for rank in range(pp):
        for stage in range(vp or 1):
            vp_stage = stage if vp else None
            ours = mla_adapter.layer_offset(config, vp_stage, rank)
            assert upstream_offset(config, vp_stage, rank) == ours, (rank, vp_stage)
            answer = _hook_answer(monkeypatch, config, vp_stage, rank)
            answered |= answer is not None
            try:
                own = _own_offset(monkeypatch, config, vp_stage, rank)
            except ZeroDivisionError:
                # Upstream divides by the number of middle stages, zero when first and last
                # stage are both set on pp=2 with interleaving.
                assert first is not None and last is not None and pp == 2 and vp
                assert answer == ours == stage * (first + last) // vp + (rank and first // vp)
                upstream_wrong = True
                continue
            upstream_wrong |= own != ours
            assert answer in (None, ours)
    assert answered == upstream_wrong


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
def test_upstream_offsets_tile_the_layers_with_uneven_vpp(
    layers, pp, vp, first, last, parallel_state
):
    """Uneven PP + VPP: every layer is held by exactly one chunk (0.13.x miscounts: hook H7)."""
    config = _pipeline_config(layers, pp, vp, first, last)
    counts = mla_adapter._stage_layer_counts(config)
    held = []
    for stage in range(vp):
        for rank in range(pp):
            start = upstream_offset(config, stage, rank)
            held += range(start, start + counts[rank])
    assert sorted(held) == list(range(layers))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_patched_offsets_place_every_layer_once(name, parallel_state):
    """Upstream's function in the patched tree, every (pp_rank, vp_stage) of an MLA model:
    PP=2 without a middle stage (upstream divides by zero) and PP=4 with middle stages."""
    table = offsets(make(name))
    assert table == EXPECTED[name]
    sizes = chunk_sizes(name)
    held = sorted(
        layer for key, start in table.items() for layer in range(start, start + sizes[key])
    )
    assert held == list(range(LAYOUTS[name][0]))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_other_models_keep_upstreams_count(name, monkeypatch, parallel_state):
    """A non-MLA model gets upstream's own count, ZeroDivisionError and 0.13's count included."""
    gpt = make(name, mla=False)
    with monkeypatch.context() as patch:
        patch.setattr(mla_adapter, "pipeline_layer_offset", lambda *args, **kwargs: None)
        own = offsets(gpt)
    assert offsets(gpt) == own
    if name == "pp2-vpp2-first4-last2":
        assert own[(0, 0)] == 0 and own[(0, 1)] == 3
        assert own[(1, 0)].startswith("ZeroDivisionError") and own[(1, 1)] == own[(1, 0)]
    assert mla_adapter.pipeline_layer_offset(gpt, 1, 1) is None


def test_pipeline_offset_hook_answers_only_where_upstream_fails(monkeypatch, parallel_state):
    zero_middle = make("pp2-vpp2-first4-last2")
    assert mla_adapter.pipeline_layer_offset(zero_middle, 1, 1) == 5
    assert mla_adapter.pipeline_layer_offset(zero_middle, 0, 0) == 0
    assert mla_adapter.pipeline_layer_offset(make("pp4-vpp2-first2-last2"), 1, 2) is None
    not_interleaved = _pipeline_config(6, 2, None, 4, 2)
    assert mla_adapter.pipeline_layer_offset(not_interleaved, None, 1) is None
    monkeypatch.setattr(
        mla_adapter.parallel_state,
        "get_pipeline_model_parallel_decoder_start",
        lambda: 1,
        raising=False,
    )
    assert mla_adapter.pipeline_layer_offset(zero_middle, 1, 1) is None  # encoder-decoder split


def test_pipeline_offset_answer_is_logged_once_per_config(caplog, parallel_state):
    config = make("pp2-vpp2-first4-last2")
    with caplog.at_level(logging.WARNING, logger=mla_adapter.__name__):
        for stage in range(2):
            for rank in range(2):
                upstream_offset(config, stage, rank)
    lines = [r.getMessage() for r in caplog.records if "layer offsets" in r.getMessage()]
    assert lines == [
        "mla-seam: layer offsets from the adapter (upstream divides by zero middle stages); "
        "pipeline rank 0, virtual stage 0 starts at layer 0"
    ]


def test_layers_numbered_by_their_caller_are_placed_once(monkeypatch, cpu_device):
    """On a layout where H7 answers (no middle stage), a decoder layer gets the adapter's offset
    once; an MTP layer and a hybrid stack's layer (``add_layer_offset=False`` with its own
    ``pp_layer_offset``) are numbered by their caller and never ask (0.17+, main, dev)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_layer import TransformerLayer

    if "add_layer_offset" not in inspect.signature(TransformerLayer.__init__).parameters:
        pytest.skip("this release's TransformerLayer takes no add_layer_offset (0.17+)")
    config = make("pp2-vpp2-first4-last2")
    asked = []
    real = mla_adapter.pipeline_layer_offset

    def ask(cfg, vp_stage, pp_rank, *args, **kwargs):
        asked.append((vp_stage, pp_rank))
        return real(cfg, vp_stage, pp_rank, *args, **kwargs)

    monkeypatch.setattr(mla_adapter, "pipeline_layer_offset", ask)
    spec = get_gpt_layer_local_spec(multi_latent_attention=True)
    plain = build_module(spec, config=config, layer_number=1, vp_stage=1)
    assert asked == [(1, 0)]  # pipeline rank 0 (one process), virtual stage 1: layer 3 + 1
    assert (
        plain.layer_number
        == plain.self_attention.layer_number
        == EXPECTED["pp2-vpp2-first4-last2"][(0, 1)] + 1
    )
    mtp = build_module(spec, config=config, layer_number=1, vp_stage=1, is_mtp_layer=True)
    assert asked == [(1, 0)]
    assert mtp.layer_number == mtp.self_attention.layer_number == 1
    if "pp_layer_offset" not in inspect.signature(MLASelfAttention.__init__).parameters:
        return  # 0.17: upstream's MLA takes no pp_layer_offset, so no hybrid stack passes one
    hybrid = build_module(
        spec, config=config, layer_number=6, vp_stage=1, add_layer_offset=False, pp_layer_offset=5
    )
    assert asked == [(1, 0)]
    assert hybrid.layer_number == hybrid.self_attention.layer_number == 6
    assert hybrid.self_attention._pp_layer_offset == 5  # pylint: disable=protected-access
