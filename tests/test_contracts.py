"""Contract probes on real release checkouts (built from the PyPI sdists), read by AST only.

The expected values are the per-line facts the project brief lists (measured on upstream), so a
probe that stops seeing one of them fails here rather than silently in a drift report.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
from mla_seam import contracts, gitlayer

# release -> {probe: expected value} (only the facts that identify the line)
FACTS = {
    "0.13.1": {
        "mla.softmax_scale_mscale": "mscale",
        "mla.rope_cu_seqlens": "unpadded",
        "mla.qkv_tensor_count": 3,
        "tl.layer_offset_params": ["config", "vp_stage"],
        "tl.layer_offset_vpp_middle_rank": "rank-1",
        "tl.cp_comm_type_index": "layer_number",
        "mla.value_pad_helper": False,
    },
    "0.14.0": {
        "mla.softmax_scale_mscale": "mscale_all_dim",
        "mla.rope_cu_seqlens": "padded",
        "tl.layer_offset_vpp_middle_rank": "middle_pipeline_rank",
        "tl.layer_offset_params": ["config", "vp_stage"],
    },
    "0.15.3": {
        "mla.qkv_tensor_count": 3,
        "tl.layer_offset_params": ["config", "vp_stage", "pp_rank"],
    },
    "0.16.1": {"mla.qkv_tensor_count": 5, "tl.cp_comm_type_index": "layer_number"},
    "0.17.1": {"tl.cp_comm_type_index": "layer_number-1", "mla.value_pad_helper": False},
    "0.18.2": {"mla.value_pad_helper": True, "mla.qk_norm_resolver": False},
    "0.19.2": {"mla.value_pad_helper": True, "mla.qk_norm_resolver": True},
}
MSCALE_DEFAULTS = {"0.13.1": ("0.707", "0.707"), "0.14.0": ("1.0", "0.0"), "0.19.2": ("1.0", "0.0")}


@pytest.mark.parametrize("release", sorted(FACTS))
def test_probes_see_the_measured_facts(release: str, megatron_checkout: Callable[[str], Path]):
    values = contracts.probe_dir(megatron_checkout(release))
    for probe, expected in FACTS[release].items():
        assert values[probe] == expected, (release, probe)
    assert values["dpa.local_accepts_k_channels"] is False, "local DPA takes no k_channels (#1589)"
    assert values["tl.layer_offset_middle_stages_guarded"] is False, "H7: divides by zero"
    assert contracts.adapter_problems(values) == [], release
    assert values["lm.set_attention_backend"] is True
    assert {"flash", "fused", "unfused", "local", "auto"} <= set(values["enums.attn_backend"])
    if release in MSCALE_DEFAULTS:
        fields = values["config.mla_fields"]
        assert (fields["mscale"], fields["mscale_all_dim"]) == MSCALE_DEFAULTS[release]


def test_git_and_folder_sources_agree(megatron_checkout: Callable[[str], Path]):
    checkout = megatron_checkout("0.16.1")
    repo = gitlayer.open_repo(checkout)
    assert contracts.probe_rev(repo, "core_v0.16.1") == contracts.probe_dir(checkout)


def test_diff_reports_mapping_entries_and_adapter_verdicts(megatron_checkout):
    old = contracts.probe_dir(megatron_checkout("0.13.1"))
    new = contracts.probe_dir(megatron_checkout("0.14.0"))
    changes = {(c.probe, c.key): c for c in contracts.diff(old, new)}
    assert changes[("config.mla_fields", "mscale_all_dim")].new == "0.0"
    assert changes[("mla.softmax_scale_mscale", None)].describe() == (
        "mla.softmax_scale_mscale: mscale -> mscale_all_dim"
    )
    assert all(c.adapter is None for c in changes.values())
    assert contracts.diff(new, new) == []


def test_broken_contract_is_reported(megatron_checkout, tmp_path: Path):
    """A tree whose MLA stops passing k_channels to core attention: the adapter needs work."""
    src = megatron_checkout("0.19.2")
    rel = contracts.MLA
    (tmp_path / rel).parent.mkdir(parents=True)
    text = (src / rel).read_text()
    assert text.count("            k_channels=self.q_head_dim,\n") == 1
    (tmp_path / rel).write_text(text.replace("            k_channels=self.q_head_dim,\n", ""))
    for other in (contracts.LM, contracts.ENUMS, contracts.TC, contracts.PSP, contracts.TL):
        (tmp_path / other).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / other, tmp_path / other)
    problems = contracts.adapter_problems(contracts.probe_dir(tmp_path))
    assert any("mla.core_attention_kwargs lacks k_channels" in p for p in problems), problems
    assert any("te.dpa_init_params absent" in p for p in problems), problems  # TE file missing


def test_middle_stage_guard_makes_h7_obsolete(megatron_checkout, tmp_path: Path):
    """Once the virtual-stage branch guards its division by the middle stage count, the probe
    sees it and every line's H7 header says the patch is obsolete there."""
    src = megatron_checkout("0.19.2")
    text = (src / contracts.TL).read_text()
    division = "                            // middle_pipeline_stages\n                        )\n"
    assert text.count(division) == 1
    guarded = (
        "                            // middle_pipeline_stages\n"
        "                            if middle_pipeline_stages > 0\n"
        "                            else 0\n"
        "                        )\n"
    )
    (tmp_path / contracts.TL).parent.mkdir(parents=True)
    (tmp_path / contracts.TL).write_text(text.replace(division, guarded))
    values = contracts.probe_dir(tmp_path)
    assert values["tl.layer_offset_middle_stages_guarded"] is True
    assert contracts.probe_dir(src)["tl.layer_offset_middle_stages_guarded"] is False
    root = Path(__file__).resolve().parents[1] / "patches"
    headers = sorted(root.glob("*/*-H7-*.patch"))
    # every release line and both moving targets (dev, main) carry H7
    assert [h.parent.name for h in headers] == [f"core_v0.1{n}" for n in range(3, 10)] + [
        "dev",
        "main",
    ]
    for header in headers:
        held = contracts.obsolete_if(header.read_text(), values)
        assert held == "tl.layer_offset_middle_stages_guarded=true", header


def test_a_tree_without_the_qk_norm_resolver_makes_h9_obsolete(megatron_checkout, tmp_path):
    """H9 works around the query-input norm of 0.19's QK-norm resolver; where the resolver file
    is gone (dev, and every release before 0.19) the header says the patch is obsolete, which
    is why dev's series has no H9."""
    assert contracts.probe_dir(megatron_checkout("0.19.2"))["mla.qk_norm_resolver"] is True
    without = contracts.probe_dir(tmp_path)
    assert without["mla.qk_norm_resolver"] is False
    root = Path(__file__).resolve().parents[1] / "patches"
    headers = sorted(root.glob("*/*-H9-*.patch"))
    assert [h.parent.name for h in headers] == ["core_v0.19", "main"]
    for header in headers:
        assert contracts.obsolete_if(header.read_text(), without) == "mla.qk_norm_resolver=false"
        with_resolver = contracts.probe_dir(megatron_checkout("0.19.2"))
        assert contracts.obsolete_if(header.read_text(), with_resolver) is None


#: dev's MultiLatentAttention.forward (d48bd6be0a, 2026-08) as the H10 probe reads it: the
#: refusal of a batch in another context-parallel layout than zigzag.
MLA_ZIGZAG_ONLY = """
class MultiLatentAttention(Attention):
    def forward(self, hidden_states, attention_mask, packed_seq_params=None):
        if (
            packed_seq_params is not None
            and packed_seq_params.qkv_format == "thd"
            and packed_seq_params.cp_partition_mode != "zigzag"
        ):
            raise ValueError("CP partition conversion must be handled before entering MLA")
        return hidden_states, None
"""
#: The same forward converting its input itself, as dev's Attention.forward does.
MLA_CONVERTS = """
class MultiLatentAttention(Attention):
    def forward(self, hidden_states, attention_mask, packed_seq_params=None):
        hidden_states, back = convert_module_input_tensors_cp_partition_mode(
            hidden_states=hidden_states, target_partition_mode="zigzag"
        )
        return back.convert(hidden_states), None
"""
PSP_LAYOUTS = """
@dataclass
class PackedSeqParams:
    qkv_format: str = None
    cp_partition_mode: Literal[{modes}] = "zigzag"
"""


def _tree(tmp_path: Path, name: str, files) -> Path:
    root = tmp_path / name
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_h10_probes_see_dev_layouts_and_its_obsolete_if(megatron_checkout, tmp_path):
    """H10 (dev only) lets MLA take both context-parallel layouts; its header's Obsolete-If
    holds once MultiLatentAttention.forward converts its input itself, not while it refuses
    other layouts (dev) nor on a release that has no layouts (0.19.2: both probes absent). A
    layout the adapter does not know is reported."""
    release = contracts.probe_dir(megatron_checkout("0.19.2"))
    assert release["mla.cp_layout"] is None
    assert release["packed_seq_params.cp_partition_modes"] is None
    psp = PSP_LAYOUTS.format(modes='"zigzag", "contiguous"')
    dev = contracts.probe_dir(
        _tree(tmp_path, "dev", {contracts.MLA: MLA_ZIGZAG_ONLY, contracts.PSP: psp})
    )
    assert dev["mla.cp_layout"] == "zigzag-only"
    assert dev["packed_seq_params.cp_partition_modes"] == ["zigzag", "contiguous"]
    converts = contracts.probe_dir(_tree(tmp_path, "converts", {contracts.MLA: MLA_CONVERTS}))
    assert converts["mla.cp_layout"] == "converts"
    headers = sorted((Path(__file__).resolve().parents[1] / "patches").glob("*/*-H10-*.patch"))
    assert [h.parent.name for h in headers] == ["dev"]
    header = headers[0].read_text()
    assert contracts.obsolete_if(header, converts) == "mla.cp_layout=converts"
    assert contracts.obsolete_if(header, dev) is None
    assert contracts.obsolete_if(header, release) is None
    striped = PSP_LAYOUTS.format(modes='"zigzag", "contiguous", "striped"')
    values = contracts.probe_dir(_tree(tmp_path, "striped", {contracts.PSP: striped}))
    problems = contracts.adapter_problems(values)
    assert any("striped, unknown to the adapter" in p for p in problems), problems


def test_obsolete_if_trailers():
    message = "Hook: H6\nObsolete-If: tl.cp_comm_type_index=layer_number-1\nObsolete-If: nope.x=1\n"
    assert contracts.obsolete_conditions(message) == [
        ("tl.cp_comm_type_index", "layer_number-1"),
        ("nope.x", "1"),
    ]
    assert contracts.obsolete_if(message, {"tl.cp_comm_type_index": "layer_number-1"}) == (
        "tl.cp_comm_type_index=layer_number-1"
    )
    assert contracts.obsolete_if(message, {"tl.cp_comm_type_index": "layer_number"}) is None
    assert contracts.obsolete_if(
        "Obsolete-If: mla.value_pad_helper=false", {"mla.value_pad_helper": False}
    )
    assert contracts.unknown_probes(message) == ["nope.x"]


def test_every_series_trailer_names_a_known_probe():
    root = Path(__file__).resolve().parents[1] / "patches"
    for patch in root.glob("*/*.patch"):
        text = patch.read_text()
        assert contracts.unknown_probes(text) == [], patch


def test_probe_files_are_every_file_a_probe_reads(megatron_checkout):
    """A survey of a partial clone fetches PROBE_FILES before probing: nothing else is read."""

    class Recording(contracts.DirSource):
        def __init__(self, root):
            super().__init__(root)
            self.seen = set()

        def read(self, relpath):
            self.seen.add(relpath)
            return super().read(relpath)

    for release in ("0.13.1", "0.19.2"):
        source = Recording(megatron_checkout(release))
        contracts.probe_tree(source)
        assert source.seen <= set(contracts.PROBE_FILES), source.seen - set(contracts.PROBE_FILES)
    assert {p.file for p in contracts.PROBES} <= set(contracts.PROBE_FILES)
