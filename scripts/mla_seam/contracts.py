"""Contract probes: the upstream API the MLA adapter and its hooks rely on, read by AST.

Megatron is never imported here. Each probe parses one or two source files of a tree (a folder,
or a commit read through git) and returns a small JSON value: a bool, an int, a string, a list
of names or a flat ``{name: text}`` mapping. ``None`` means the probed thing is absent.

Two uses:

* :func:`probe_tree` gives every probe's value for one tree; :func:`diff` compares two such
  results (``mla-seam rebase`` reports it between the old and the new base, ``mla-seam drift``
  between consecutive tags);
* :func:`adapter_problems` checks the values against what the adapter handles (the
  ``expect`` of each :class:`Probe`), and :func:`obsolete_if` evaluates the ``Obsolete-If:``
  trailers of patch headers against them.

A probe's name and the meaning of its value are part of the drift report's schema: rename or
re-shape one only together with ``schemas/drift.schema.json``'s ``schema_version``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import git
from mla_seam import gitlayer

MLA = "megatron/core/transformer/multi_latent_attention.py"
DPA = "megatron/core/transformer/dot_product_attention.py"
TE = "megatron/core/extensions/transformer_engine.py"
LM = "megatron/core/models/common/language_module/language_module.py"
TL = "megatron/core/transformer/transformer_layer.py"
TC = "megatron/core/transformer/transformer_config.py"
ENUMS = "megatron/core/transformer/enums.py"
PSP = "megatron/core/packed_seq_params.py"
SPEC = "megatron/core/models/gpt/gpt_layer_specs.py"
QK_NORM = "megatron/core/transformer/mla_qk_norm_config.py"
ROPE = "megatron/core/models/common/embeddings/rope_utils.py"
#: Every file a probe reads (a survey of a partial clone fetches exactly these; a test checks
#: that probing reads nothing else).
PROBE_FILES: Tuple[str, ...] = (MLA, DPA, TE, LM, TL, TC, ENUMS, PSP, SPEC, QK_NORM, ROPE)

Value = Any  # JSON-able: None, bool, int, str, list of str/int, or dict of str -> str


# --- reading a tree ----------------------------------------------------------------------------


class Source:
    """Read-only access to the files of one tree; parsed modules are cached per instance."""

    label = "tree"

    def read(self, relpath: str) -> Optional[str]:
        """The text of ``relpath``, or ``None`` when the tree has no such file."""
        raise NotImplementedError

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one Source lives for one survey
    def module(self, relpath: str) -> Optional[ast.Module]:
        """The parsed module ``relpath`` (``None`` when absent or not valid Python)."""
        text = self.read(relpath)
        if text is None:
            return None
        try:
            return ast.parse(text)
        except SyntaxError:
            return None


class DirSource(Source):
    """A tree on disk (a checkout, an sdist folder, a site-packages folder)."""

    def __init__(self, root: os.PathLike) -> None:
        self.root = Path(root)
        self.label = str(self.root)

    def read(self, relpath: str) -> Optional[str]:
        path = self.root / relpath
        return path.read_text(encoding="utf-8") if path.is_file() else None


class GitSource(Source):
    """A tree at one commit, read from the object database (no checkout needed)."""

    def __init__(self, repo: git.Repo, rev: str) -> None:
        self.repo = repo
        self.rev = rev
        self.label = rev

    def read(self, relpath: str) -> Optional[str]:
        try:
            return gitlayer.read_blob(self.repo, self.rev, relpath).decode("utf-8")
        except KeyError:
            return None


# --- AST helpers -------------------------------------------------------------------------------


def _class(module: Optional[ast.Module], name: str) -> Optional[ast.ClassDef]:
    if module is None:
        return None
    for node in module.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    return None


def _function(scope: Optional[ast.AST], name: str) -> Optional[ast.FunctionDef]:
    if scope is None:
        return None
    for node in getattr(scope, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    return None


def _params(func: Optional[ast.FunctionDef]) -> Optional[List[str]]:
    """Parameter names in order, without ``self``; ``*args``/``**kw`` as ``*name``/``**name``."""
    if func is None:
        return None
    args = func.args
    names = [a.arg for a in (*args.posonlyargs, *args.args)]
    if args.vararg is not None:
        names.append(f"*{args.vararg.arg}")
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg is not None:
        names.append(f"**{args.kwarg.arg}")
    return [n for n in names if n != "self"]


def _own_nodes(func: ast.AST) -> Iterable[ast.AST]:
    """Nodes of ``func``'s body, not descending into nested functions, lambdas or classes."""
    stack = list(ast.iter_child_nodes(func))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _text(node: ast.AST) -> str:
    """Source text of ``node`` without spaces (``self.layer_number - 1`` -> ``layer_number-1``)."""
    return ast.unparse(node).replace(" ", "").replace("self.", "")


def _call_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


# --- the probes --------------------------------------------------------------------------------


def _mla_init(src: Source) -> Optional[ast.FunctionDef]:
    return _function(_class(src.module(MLA), "MultiLatentAttention"), "__init__")


def _mla_qkv(src: Source) -> Optional[ast.FunctionDef]:
    return _function(_class(src.module(MLA), "MLASelfAttention"), "get_query_key_value_tensors")


def _core_attention_call(init: Optional[ast.FunctionDef]) -> Optional[ast.Call]:
    for node in _own_nodes(init) if init is not None else ():
        if isinstance(node, ast.Call) and _call_name(node) == "build_module" and node.args:
            if "core_attention" in ast.unparse(node.args[0]):
                return node
    return None


def probe_mla_core_attention_kwargs(src: Source) -> Value:
    """Keyword names MLA passes when it builds core attention (H1's anchor; k/v channels)."""
    call = _core_attention_call(_mla_init(src))
    return None if call is None else sorted(k.arg for k in call.keywords if k.arg)


def probe_mla_softmax_scale_mscale(src: Source) -> Value:
    """Config field MLA feeds to YaRN's mscale for its softmax scale (mscale | mscale_all_dim)."""
    for node in _own_nodes(_mla_init(src)) if _mla_init(src) else ():
        if isinstance(node, ast.Call) and "yarn_get_mscale" in _call_name(node):
            if len(node.args) >= 2 and isinstance(node.args[1], ast.Attribute):
                return node.args[1].attr
    return None


def probe_mla_qkv_tensor_count(src: Source) -> Value:
    """How many tensors ``get_query_key_value_tensors`` returns (3 up to 0.15, 5 from 0.16)."""
    func = _mla_qkv(src)
    if func is None:
        return None
    sizes = [
        len(node.value.elts)
        for node in _own_nodes(func)
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple)
    ]
    return max(sizes) if sizes else None


def probe_mla_rope_cu_seqlens(src: Source) -> Value:
    """Which THD offsets MLA's RoPE uses: ``padded`` (when given) or ``unpadded`` (0.13.x)."""
    func = _mla_qkv(src)
    if func is None:
        return None
    attrs = {
        node.attr
        for node in ast.walk(func)
        if isinstance(node, ast.Attribute) and node.attr.startswith("cu_seqlens")
    }
    if not attrs:
        return None
    return "padded" if "cu_seqlens_q_padded" in attrs else "unpadded"


def probe_mla_value_pad_helper(src: Source) -> Value:
    """Whether MLA pads V itself for THD (``_prepare_mla_core_attention_value``, 0.18+; H5)."""
    module = src.module(MLA)
    return (
        None
        if module is None
        else _function(module, "_prepare_mla_core_attention_value") is not None
    )


def probe_mla_qk_norm_resolver(src: Source) -> Value:
    """Whether the 0.19 QK-norm resolver (``mla_qk_norm_config.py``) exists (layer-spec drift)."""
    return src.read(QK_NORM) is not None


def probe_dpa_local_accepts_k_channels(src: Source) -> Value:
    """Whether local ``DotProductAttention.__init__`` accepts ``k_channels`` (issue #1589)."""
    params = _params(_function(_class(src.module(DPA), "DotProductAttention"), "__init__"))
    return (
        None
        if params is None
        else "k_channels" in params or any(p.startswith("**") for p in params)
    )


def probe_te_dpa_init_params(src: Source) -> Value:
    """Parameters of ``TEDotProductAttention.__init__`` (the adapter's TE subclass wraps it)."""
    return _params(_function(_class(src.module(TE), "TEDotProductAttention"), "__init__"))


def probe_te_dpa_base(src: Source) -> Value:
    """Base class of ``TEDotProductAttention`` (the adapter finds TE's class in the MRO)."""
    cls = _class(src.module(TE), "TEDotProductAttention")
    return None if cls is None else [ast.unparse(b) for b in cls.bases]


def _lm_backend(src: Source) -> Optional[ast.FunctionDef]:
    return _function(_class(src.module(LM), "LanguageModule"), "_set_attention_backend")


def probe_lm_set_attention_backend(src: Source) -> Value:
    """Whether ``LanguageModule._set_attention_backend`` exists (H3's anchor)."""
    return None if src.module(LM) is None else _lm_backend(src) is not None


def probe_lm_backend_env_map(src: Source) -> Value:
    """The backend -> NVTE flags mapping of ``_set_attention_backend``'s if-chain."""
    func = _lm_backend(src)
    if func is None:
        return None
    mapping: Dict[str, str] = {}
    for node in _own_nodes(func):
        if not isinstance(node, ast.If):
            continue
        backend = [
            sub.attr
            for sub in ast.walk(node.test)
            if isinstance(sub, ast.Attribute) and _text(sub.value) == "AttnBackend"
        ]
        if len(backend) != 1:
            continue
        flags = []
        for stmt in node.body:
            call = stmt.value if isinstance(stmt, ast.Expr) else None
            if isinstance(call, ast.Call) and len(call.args) >= 2:
                name, value = call.args[0], call.args[1]
                if isinstance(name, ast.Constant) and isinstance(value, ast.Constant):
                    flags.append(f"{str(name.value).replace('NVTE_', '')}={value.value}")
        mapping[backend[0]] = ",".join(flags)
    return mapping


def probe_enums_attn_backend(src: Source) -> Value:
    """Members of ``AttnBackend`` (``--attention-backend`` choices)."""
    cls = _class(src.module(ENUMS), "AttnBackend")
    if cls is None:
        return None
    return [
        t.id
        for node in cls.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    ]


def _dataclass_fields(cls: Optional[ast.ClassDef]) -> Optional[Dict[str, str]]:
    if cls is None:
        return None
    return {
        node.target.id: (ast.unparse(node.value) if node.value is not None else "<required>")
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def probe_config_mla_fields(src: Source) -> Value:
    """Fields ``MLATransformerConfig`` declares, with their default's source text."""
    return _dataclass_fields(_class(src.module(TC), "MLATransformerConfig"))


def probe_packed_seq_params_fields(src: Source) -> Value:
    """Fields of ``PackedSeqParams`` (what THD callers can pass)."""
    fields = _dataclass_fields(_class(src.module(PSP), "PackedSeqParams"))
    return None if fields is None else list(fields)


def probe_packed_seq_params_cp_partition_modes(src: Source) -> Value:
    """Context-parallel layouts ``PackedSeqParams.cp_partition_mode`` names (dev; H10)."""
    cls = _class(src.module(PSP), "PackedSeqParams")
    for node in cls.body if cls is not None else ():
        if isinstance(node, ast.AnnAssign) and _text(node.target) == "cp_partition_mode":
            return [
                sub.value
                for sub in ast.walk(node.annotation)
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
            ]
    return None


def probe_mla_cp_layout(src: Source) -> Value:
    """How ``MultiLatentAttention.forward`` meets a context-parallel layout (H10).

    ``converts``: it converts its input with upstream's converter, as ``Attention.forward``
    does; ``zigzag-only``: it raises for a batch in any other layout than zigzag (dev); absent:
    no layout is named.
    """
    func = _function(_class(src.module(MLA), "MultiLatentAttention"), "forward")
    if func is None:
        return None
    nodes = list(_own_nodes(func))
    if any(
        isinstance(node, ast.Call)
        and _call_name(node) == "convert_module_input_tensors_cp_partition_mode"
        for node in nodes
    ):
        return "converts"
    for node in nodes:
        if isinstance(node, ast.If) and any(isinstance(stmt, ast.Raise) for stmt in node.body):
            test = ast.unparse(node.test)
            if "cp_partition_mode" in test and "zigzag" in test:
                return "zigzag-only"
    return None


def _layer_offset_function(src: Source) -> Optional[ast.FunctionDef]:
    return _function(src.module(TL), "get_transformer_layer_offset")


def probe_tl_layer_offset_params(src: Source) -> Value:
    """Parameters of ``get_transformer_layer_offset`` (``pp_rank`` from 0.15)."""
    return _params(_layer_offset_function(src))


def probe_tl_layer_offset_vpp_middle_rank(src: Source) -> Value:
    """How the uneven-PP + VPP branch counts middle ranks: ``rank-1`` (0.13.x bug) or not."""
    func = _layer_offset_function(src)
    if func is None:
        return None
    for node in ast.walk(func):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub):
            left, right = node.left, node.right
            rank = isinstance(left, ast.Name) and left.id in ("pipeline_rank", "pp_rank")
            if rank and isinstance(right, ast.Constant) and right.value == 1:
                if not _assigns_middle_rank(func, node):
                    return "rank-1"
    return "middle_pipeline_rank"


def _assigns_middle_rank(func: ast.FunctionDef, target: ast.AST) -> bool:
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "middle_pipeline_rank" for t in node.targets
        ):
            if any(sub is target for sub in ast.walk(node.value)):
                return True
    return False


def probe_tl_layer_offset_middle_stages_guarded(src: Source) -> Value:
    """Whether every division by the middle stage count is guarded by a test of it (H7).

    ``get_transformer_layer_offset`` divides by ``middle_pipeline_stages``, zero on PP=2 with
    both first and last stage sizes set: the branch without virtual stages tests it first
    (``if middle_pipeline_stages > 0``), the virtual-stage branch does not (0.13 - 0.19).
    ``false`` also when no such division is found, so H7 stays until the guard is seen.
    """
    func = _layer_offset_function(src)
    if func is None:
        return None
    parents = {child: node for node in ast.walk(func) for child in ast.iter_child_nodes(node)}
    divisions = [
        node
        for node in ast.walk(func)
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, (ast.FloorDiv, ast.Div))
        and isinstance(node.right, ast.Name)
        and node.right.id == "middle_pipeline_stages"
    ]
    return bool(divisions) and all(_guarded_by_middle_test(d, parents) for d in divisions)


def _guarded_by_middle_test(node: ast.AST, parents: Mapping[ast.AST, ast.AST]) -> bool:
    """Whether ``node`` sits in a branch of an ``if`` that tests ``middle_pipeline_stages``."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, (ast.If, ast.IfExp)) and child is not parent.test:
            names = {sub.id for sub in ast.walk(parent.test) if isinstance(sub, ast.Name)}
            if "middle_pipeline_stages" in names:
                return True
        child, parent = parent, parents.get(parent)
    return False


def probe_tl_offset_call(src: Source) -> Value:
    """How ``TransformerLayer.__init__`` computes its global layer number (a moving anchor)."""
    init = _function(_class(src.module(TL), "TransformerLayer"), "__init__")
    for node in _own_nodes(init) if init is not None else ():
        if isinstance(node, ast.Assign) and _text(node.targets[0]) == "layer_number":
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Call) and "offset" in _call_name(sub):
                    return _text(sub)
    return None


def probe_tl_cp_comm_type_index(src: Source) -> Value:
    """Index ``TransformerLayer`` uses on a per-layer ``cp_comm_type`` list (H6)."""
    init = _function(_class(src.module(TL), "TransformerLayer"), "__init__")
    for node in _own_nodes(init) if init is not None else ():
        if isinstance(node, ast.Subscript) and _text(node.value) == "config.cp_comm_type":
            return _text(node.slice)
        if isinstance(node, ast.Call) and any(
            _text(arg) == "config.cp_comm_type" for arg in node.args
        ):
            return f"call:{_text(node.func)}"
    return None


def probe_spec_mla_builders(src: Source) -> Value:
    """Layer-spec functions taking ``multi_latent_attention`` (SPEC refactored at 0.17)."""
    module = src.module(SPEC)
    if module is None:
        return None
    return sorted(
        node.name
        for node in module.body
        if isinstance(node, ast.FunctionDef) and "multi_latent_attention" in (_params(node) or [])
    )


def probe_rope_thd_params(src: Source) -> Value:
    """Parameters of rope_utils' ``_apply_rotary_pos_emb_thd`` (THD RoPE path)."""
    return _params(_function(src.module(ROPE), "_apply_rotary_pos_emb_thd"))


# --- what the adapter handles ------------------------------------------------------------------


def _superset(required: Sequence[str]) -> Callable[[Value], Optional[str]]:
    def check(value: Value) -> Optional[str]:
        if value is None:
            return "absent"
        missing = [name for name in required if name not in value]
        return f"lacks {', '.join(missing)}" if missing else None

    return check


def _within(*known: str) -> Callable[[Value], Optional[str]]:
    """Every name of a list value is one the adapter knows (absent: nothing to know)."""

    def check(value: Value) -> Optional[str]:
        unknown = [name for name in value or () if name not in known]
        return f"names {', '.join(unknown)}, unknown to the adapter" if unknown else None

    return check


def _one_of(*allowed: Value) -> Callable[[Value], Optional[str]]:
    def check(value: Value) -> Optional[str]:
        if value in allowed:
            return None
        shown = " or ".join(format_value(a) for a in allowed)
        return f"is {format_value(value)}; the adapter handles {shown}"

    return check


@dataclasses.dataclass(frozen=True)
class Probe:
    """One contract probe.

    Attributes:
        name: Stable dotted name (part of the drift schema).
        file: The source file it reads (relative to the tree root).
        func: ``(Source) -> value``.
        expect: ``(value) -> None | reason``: ``None`` when the adapter and hooks handle the
            value; ``None`` itself (no check) for informational probes.
        why: Who relies on it.
    """

    name: str
    file: str
    func: Callable[[Source], Value]
    expect: Optional[Callable[[Value], Optional[str]]]
    why: str

    @property
    def description(self) -> str:
        """The probe function's docstring (first line)."""
        return (self.func.__doc__ or "").strip().splitlines()[0]


PROBES: Tuple[Probe, ...] = (
    Probe(
        "mla.core_attention_kwargs",
        MLA,
        probe_mla_core_attention_kwargs,
        _superset(["k_channels", "v_channels", "softmax_scale", "config"]),
        "H1 and the adapter's core-attention subclasses",
    ),
    Probe(
        "mla.softmax_scale_mscale",
        MLA,
        probe_mla_softmax_scale_mscale,
        _one_of("mscale", "mscale_all_dim"),
        "adapter question 1 overrides the scale either way",
    ),
    Probe(
        "mla.qkv_tensor_count",
        MLA,
        probe_mla_qkv_tensor_count,
        _one_of(3, 5),
        "H2 sits at the top of get_query_key_value_tensors",
    ),
    Probe(
        "mla.rope_cu_seqlens",
        MLA,
        probe_mla_rope_cu_seqlens,
        _one_of("padded", "unpadded"),
        "H2 hands RoPE the padded offsets on every line",
    ),
    Probe(
        "mla.value_pad_helper",
        MLA,
        probe_mla_value_pad_helper,
        _one_of(True, False),
        "H5 (Obsolete-If: mla.value_pad_helper=false)",
    ),
    Probe("mla.qk_norm_resolver", QK_NORM, probe_mla_qk_norm_resolver, None, "layer-spec drift"),
    Probe(
        "dpa.local_accepts_k_channels",
        DPA,
        probe_dpa_local_accepts_k_channels,
        _one_of(True, False),
        "the adapter's local subclass passes k/v channels only where accepted",
    ),
    Probe(
        "te.dpa_init_params",
        TE,
        probe_te_dpa_init_params,
        _superset(["config", "softmax_scale", "k_channels", "v_channels"]),
        "the adapter's TE subclass rewrites v_channels for the V pad",
    ),
    Probe("te.dpa_base", TE, probe_te_dpa_base, None, "adapter _spec_kind (MRO search)"),
    Probe(
        "lm.set_attention_backend",
        LM,
        probe_lm_set_attention_backend,
        _one_of(True),
        "H3's anchor",
    ),
    Probe(
        "lm.backend_env_map",
        LM,
        probe_lm_backend_env_map,
        _superset(["flash", "fused", "unfused", "local"]),
        "adapter question 3 (decides before these flags are set)",
    ),
    Probe(
        "enums.attn_backend",
        ENUMS,
        probe_enums_attn_backend,
        _superset(["flash", "fused", "unfused", "local", "auto"]),
        "adapter question 3",
    ),
    Probe(
        "config.mla_fields",
        TC,
        probe_config_mla_fields,
        _superset(
            [
                "q_lora_rank",
                "kv_lora_rank",
                "qk_head_dim",
                "qk_pos_emb_head_dim",
                "v_head_dim",
                "rope_type",
                "rotary_scaling_factor",
                "mscale",
                "mscale_all_dim",
            ]
        ),
        "adapter question 1 and H4",
    ),
    Probe(
        "packed_seq_params.fields",
        PSP,
        probe_packed_seq_params_fields,
        _superset(
            [
                "qkv_format",
                "cu_seqlens_q",
                "cu_seqlens_kv",
                "cu_seqlens_q_padded",
                "cu_seqlens_kv_padded",
                "max_seqlen_q",
                "max_seqlen_kv",
            ]
        ),
        "adapter question 2 (H2)",
    ),
    Probe(
        "packed_seq_params.cp_partition_modes",
        PSP,
        probe_packed_seq_params_cp_partition_modes,
        _within("zigzag", "contiguous"),
        "H10 converts either layout to the zigzag one MLA runs",
    ),
    Probe(
        "mla.cp_layout",
        MLA,
        probe_mla_cp_layout,
        _one_of(None, "zigzag-only", "converts"),
        "H10 (Obsolete-If: mla.cp_layout=converts)",
    ),
    Probe(
        "tl.layer_offset_params",
        TL,
        probe_tl_layer_offset_params,
        _superset(["config", "vp_stage"]),
        "adapter question 4 (layer_offset mirrors it)",
    ),
    Probe(
        "tl.layer_offset_vpp_middle_rank",
        TL,
        probe_tl_layer_offset_vpp_middle_rank,
        _one_of("rank-1", "middle_pipeline_rank"),
        "H7 on rank-1 lines (0.13.x): the adapter answers the uneven split with virtual stages",
    ),
    Probe(
        "tl.layer_offset_middle_stages_guarded",
        TL,
        probe_tl_layer_offset_middle_stages_guarded,
        _one_of(True, False),
        "H7 (Obsolete-If: tl.layer_offset_middle_stages_guarded=true)",
    ),
    Probe("tl.offset_call", TL, probe_tl_offset_call, None, "moving anchor (TL offset call)"),
    Probe(
        "tl.cp_comm_type_index",
        TL,
        probe_tl_cp_comm_type_index,
        _one_of("layer_number", "layer_number-1", "call:mla_adapter.per_layer_value"),
        "H6 (Obsolete-If: tl.cp_comm_type_index=layer_number-1)",
    ),
    Probe("spec.mla_builders", SPEC, probe_spec_mla_builders, None, "moving anchor (SPEC)"),
    Probe(
        "rope.thd_params",
        ROPE,
        probe_rope_thd_params,
        _within(
            "t",
            "cu_seqlens",
            "freqs",
            "rotary_interleaved",
            "mla_rotary_interleaved",
            "multi_latent_attention",
            "mscale",
            "cp_group",
            "inverse",
            "mla_output_remove_interleaving",
            "max_seqlen",
        ),
        "H8's one-pass THD RoPE computes these (a call with another goes to upstream's)",
    ),
)

PROBES_BY_NAME: Mapping[str, Probe] = {p.name: p for p in PROBES}


def probe_tree(src: Source) -> Dict[str, Value]:
    """Every probe's value for one tree, in :data:`PROBES` order."""
    return {p.name: p.func(src) for p in PROBES}


def probe_dir(root: os.PathLike) -> Dict[str, Value]:
    """:func:`probe_tree` for a folder."""
    return probe_tree(DirSource(root))


def probe_rev(repo: git.Repo, rev: str) -> Dict[str, Value]:
    """:func:`probe_tree` for a commit of ``repo``."""
    return probe_tree(GitSource(repo, rev))


# --- comparing and checking --------------------------------------------------------------------


def format_value(value: Value) -> str:
    """One-line text of a probe value: ``absent``, ``true``, ``3``, ``a,b``, ``{"k": "v"}``."""
    if value is None:
        return "absent"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


@dataclasses.dataclass(frozen=True)
class Change:
    """One probe whose value differs between two trees (``key`` set for one entry of a mapping)."""

    probe: str
    old: Value
    new: Value
    key: Optional[str] = None
    adapter: Optional[str] = None  # None: handled; else why the adapter needs work

    def describe(self) -> str:
        """``probe[key]: old -> new`` plus the adapter's verdict."""
        where = f"{self.probe}[{self.key}]" if self.key else self.probe
        verdict = f" (adapter: needs work, {self.adapter})" if self.adapter else ""
        if isinstance(self.old, list) and isinstance(self.new, list):
            added = [f"+{v}" for v in self.new if v not in self.old]
            removed = [f"-{v}" for v in self.old if v not in self.new]
            moved = "" if added or removed else " (order)"
            return f"{where}: {' '.join(added + removed)}{moved}{verdict}"
        return f"{where}: {format_value(self.old)} -> {format_value(self.new)}{verdict}"

    def to_json(self) -> Dict[str, Value]:
        """The drift schema's ``contract_changes`` entry."""
        return {
            "probe": self.probe,
            "key": self.key,
            "old": self.old,
            "new": self.new,
            "adapter": "ok" if self.adapter is None else "needs_work",
            "reason": self.adapter,
        }


def diff(old: Mapping[str, Value], new: Mapping[str, Value]) -> List[Change]:
    """Probes whose value changed from ``old`` to ``new``; mappings are compared per key."""
    changes: List[Change] = []
    for name in [p.name for p in PROBES]:
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        problem = _problem(name, after)
        if isinstance(before, dict) and isinstance(after, dict):
            for key in sorted(set(before) | set(after)):
                if before.get(key) != after.get(key):
                    changes.append(Change(name, before.get(key), after.get(key), key, problem))
        else:
            changes.append(Change(name, before, after, None, problem))
    return changes


def _problem(name: str, value: Value) -> Optional[str]:
    probe = PROBES_BY_NAME[name]
    return probe.expect(value) if probe.expect is not None else None


def adapter_problems(values: Mapping[str, Value]) -> List[str]:
    """Reasons the adapter needs work for a tree with these probe values (empty: supported)."""
    problems = []
    for probe in PROBES:
        problem = _problem(probe.name, values.get(probe.name))
        if problem:
            problems.append(f"contract {probe.name} {problem} ({probe.why})")
    return problems


# --- Obsolete-If trailers ----------------------------------------------------------------------

OBSOLETE_TRAILER = "Obsolete-If:"


def obsolete_conditions(message: str) -> List[Tuple[str, str]]:
    """``(probe, value)`` pairs of every ``Obsolete-If: probe=value`` trailer in a message."""
    pairs = []
    for line in message.splitlines():
        if line.startswith(OBSOLETE_TRAILER):
            probe, _, value = line[len(OBSOLETE_TRAILER) :].strip().partition("=")
            pairs.append((probe.strip(), value.strip()))
    return pairs


def obsolete_if(message: str, values: Mapping[str, Value]) -> Optional[str]:
    """The first ``Obsolete-If`` condition of ``message`` that holds for ``values``, as text.

    A patch is obsolete on a tree when ANY of its conditions holds: the problem it works around
    is gone there. Unknown probe names never hold (and are reported by :func:`unknown_probes`).
    """
    for probe, value in obsolete_conditions(message):
        if probe in values and format_value(values[probe]) == value:
            return f"{probe}={value}"
    return None


def unknown_probes(message: str) -> List[str]:
    """Probe names in ``Obsolete-If`` trailers that this mla-seam does not know."""
    return [probe for probe, _ in obsolete_conditions(message) if probe not in PROBES_BY_NAME]
