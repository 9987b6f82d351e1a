"""The multi-GPU cases: each parallel layout against a single-GPU reference in the same process.

Every case builds its reference first (TP=PP=CP=1; the rest of the world is data parallel,
every rank computes it, rank 0's weights are broadcast), then the parallel layout with the same
weights (split by Megatron's own parameter attributes, :mod:`dist_env`), runs the same inputs
and compares. A case is a dict from the launcher's plan (``mla_seam.suite.dist``: layout,
model, spec, dtype, tolerance); :func:`run_case` returns the record rank 0 writes.

Kinds:

* ``tp_layer``: one ``MLASelfAttention``, TP with sequence parallelism: output, input gradient
  and every parameter gradient (gathered) against TP=1.
* ``tp_gpt``: a tiny MLA ``GPTModel``: first-step loss and gradients, then loss and grad norm
  per training step (AdamW) against TP=1.
* ``pipeline``: the tiny GPT split into pipeline stages with virtual stages and uneven
  first/last stage layer counts, trained through Megatron's interleaved schedule: every rank's
  layer numbers against an independent count, the adapter's ``layer_offset`` and upstream's
  ``get_transformer_layer_offset``; every weight placed exactly once; loss and grad norm per
  step against PP=1 (optionally with full recompute).
* ``cp_block``: a block of MLA layers on THD packed sequences split over context-parallel
  ranks the way Transformer Engine expects (each sequence in 2*CP chunks, rank r holding
  chunks r and 2*CP-1-r): output and gradients against CP=1, CP=1 THD against per-sequence
  bshd, the ``cp_comm_type`` each layer got, and loss / grad norm per training step.
* ``cp_sweep``: one MLA layer at CP on 1..256 packed sequences of one token budget: output and
  gradients against CP=1 per count, and the fwd+bwd time (recorded, never asserted).

Each case built on a patched tree also reports the adapter's backend decision and summary line
of every rank and how many ranks logged the summary (:func:`adapter_consensus`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import dist_env as env
import torch
import torch.distributed as dist

ADAPTER_LOGGER = "megatron.core.transformer.mla_adapter"
_LAYER_NAME = re.compile(r"^(decoder\.)?layers\.(\d+)\.")


_OUTCOME = "mla-seam-outcome"


class Desync(RuntimeError):
    """The ranks fell out of step inside a case; the process group must be torn down."""


class BuildError(Exception):
    """Megatron could not build the model (the case's outcome is ``build_error``).

    ``extra`` carries what the case learned before the build failed (e.g. offset tables).
    """

    def __init__(self, message: str, extra: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.extra = dict(extra or {})


def on_every_rank(make: Callable[[], Any]) -> Any:
    """``make()`` where a build error on any rank is a build error on every rank (collective).

    Some upstream failures happen on one pipeline rank only; the ranks agree before going on,
    so none waits in a collective the other never reaches.
    """
    try:
        result, error = make(), None
    except BuildError as exc:
        result, error = None, str(exc)
    errors = env.all_ranks(error)
    first = next((e for e in errors if e), None)
    if first is not None:
        raise BuildError(error or f"(on another rank) {first}")
    return result


# --- building --------------------------------------------------------------------------------


def _dtype(case: Dict[str, Any]) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[case["dtype"]]


def hyper(case: Dict[str, Any]):
    """The case's layer as an :class:`oracles.MLAHyper`."""
    from oracles import YARN, MLAHyper  # pylint: disable=C0415

    m = case["model"]
    return MLAHyper(
        hidden_size=m["hidden"],
        num_heads=m["heads"],
        q_lora_rank=m.get("q_lora"),
        kv_lora_rank=m["kv_lora"],
        qk_nope_head_dim=m["qk"],
        qk_rope_head_dim=m["rope"],
        v_head_dim=m["v"],
        rope=YARN,
    )


def make_config(case: Dict[str, Any], parallel: bool, **extra: Any):
    """``MLATransformerConfig`` of the case; ``parallel=False`` gives its single-GPU reference."""
    from mla_build import megatron_config  # pylint: disable=C0415

    m, lay = case["model"], case["layout"]
    fields: Dict[str, Any] = dict(
        num_layers=m["layers"],
        init_method_std=m.get("init_std", 0.02),
        ffn_hidden_size=m.get("ffn", 4 * m["hidden"]),
    )
    if parallel:
        fields.update(
            tensor_model_parallel_size=lay["tp"],
            sequence_parallel=bool(lay.get("sp")),
            context_parallel_size=lay["cp"],
            pipeline_model_parallel_size=lay["pp"],
            virtual_pipeline_model_parallel_size=lay.get("vp"),
            num_layers_in_first_pipeline_stage=lay.get("first"),
            num_layers_in_last_pipeline_stage=lay.get("last"),
        )
        if lay["pp"] > 1:
            fields["pipeline_dtype"] = _dtype(case)
            if lay.get("vp"):
                # Megatron-LM training's setting for interleaved schedules (--overlap-p2p-
                # communication, batch_p2p_comm = not overlap_p2p_comm): with PP=2 the previous
                # and next stage are one rank, and the batched exchange pairs the activation
                # and the gradient FIFO in the wrong order (NVIDIA/Megatron-LM#750, #1450).
                fields.update(overlap_p2p_comm=True, batch_p2p_comm=False)
        if case.get("cp_comm_type") is not None:
            fields["cp_comm_type"] = case["cp_comm_type"]
        if case.get("recompute") == "full":
            fields.update(
                recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
            )
    fields.update(extra)
    return megatron_config(hyper(case), _dtype(case), backend=case["backend"], **fields)


def _layer_spec(case: Dict[str, Any]):
    from mla_build import layer_spec  # pylint: disable=C0415

    return layer_spec(case["spec"], qk_layernorm=True)


def _prepare_backend(config: Any) -> None:
    """Hook H3 as ``GPTModel`` runs it, with stale NVTE_* flags of an earlier case cleared."""
    import os  # pylint: disable=C0415

    from mla_build import NVTE_FLAGS, set_backend  # pylint: disable=C0415

    set_backend(config)
    for name in NVTE_FLAGS:
        os.environ.pop(name, None)


def _built(make: Callable[[], torch.nn.Module], dev: str, config: Any) -> torch.nn.Module:
    """``make()`` on ``dev`` in training mode; anything Megatron or the adapter raises while
    deciding the backend or building is the case's build error."""
    try:
        _prepare_backend(config)
        module = make()
    except Exception as exc:  # pylint: disable=broad-except
        raise BuildError(f"{type(exc).__name__}: {exc}") from exc
    return module.to(dev).train()


def build_layer(case: Dict[str, Any], config: Any, dev: str) -> torch.nn.Module:
    """``MLASelfAttention`` of the spec (layer number 1)."""
    from megatron.core.transformer.spec_utils import build_module  # pylint: disable=C0415

    spec = _layer_spec(case).submodules.self_attention
    return _built(lambda: build_module(spec, config=config, layer_number=1), dev, config)


def build_block(case: Dict[str, Any], config: Any, dev: str) -> torch.nn.Module:
    """A ``TransformerBlock`` of ``num_layers`` MLA layers with the final norm."""
    from megatron.core.transformer.transformer_block import (  # pylint: disable=C0415
        TransformerBlock,
    )

    return _built(lambda: TransformerBlock(config, spec=_layer_spec(case)), dev, config)


def build_gpt(
    case: Dict[str, Any],
    config: Any,
    dev: str,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
) -> torch.nn.Module:
    """The tiny MLA ``GPTModel`` (or one pipeline chunk of it); untied output layer."""
    from megatron.core.models.gpt.gpt_model import GPTModel  # pylint: disable=C0415

    m = case["model"]
    kwargs: Dict[str, Any] = {"vp_stage": vp_stage} if vp_stage is not None else {}
    return _built(
        lambda: GPTModel(
            config=config,
            transformer_layer_spec=_layer_spec(case),
            vocab_size=m["vocab"],
            max_sequence_length=m["seq"],
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            **kwargs,
        ),
        dev,
        config,
    )


class _Capture(logging.Handler):
    """Collects the adapter's log lines while a model is built."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _install_process_log() -> List[str]:
    """Attach one capture to the adapter's logger for the whole process; its live line list."""
    handler = _Capture()
    logger = logging.getLogger(ADAPTER_LOGGER)
    logger.setLevel(min(logger.level or logging.DEBUG, logging.INFO))
    logger.addHandler(handler)
    return handler.lines


# Installed at import, before any model (reference models included) is built: the adapter logs
# its summary once per process, on rank 0 only, whichever build comes first.
_PROCESS_LOG = _install_process_log()


@contextlib.contextmanager
def capture_adapter_log() -> Iterator[List[str]]:
    """``with capture_adapter_log() as lines``: every line the adapter logged in this process.

    A case counts the lines equal to its own summary: the summary of a config built earlier in
    the process (by its single-GPU reference or another case) was logged then, not again.
    """
    yield _PROCESS_LOG


def have_adapter() -> bool:
    """Whether this tree carries the mla-seam adapter."""
    from mla_build import have_adapter as _have  # pylint: disable=C0415

    return _have()


def adapter_consensus(config: Any, logged: Sequence[str]) -> Dict[str, Any]:
    """Every rank's backend decision and summary line, and who logged the summary.

    Collective: every rank must call it. Returns ``{}`` on a vanilla tree.
    """
    if not have_adapter():
        return {}
    from megatron.core.transformer import mla_adapter  # pylint: disable=C0415

    decision = mla_adapter.backend_decision(config)
    mine = {
        "decision": None if decision is None else [decision.backend, decision.reason],
        "pad_value": None if decision is None else bool(decision.pad_value),
        "summary": mla_adapter.describe(config),
        "logged": sum(1 for line in logged if line == mla_adapter.describe(config)),
    }
    ranks = env.all_ranks(mine)
    logged_per_rank = [r["logged"] for r in ranks]
    return {
        "decision": mine["decision"],
        "summary": mine["summary"],
        "logged_per_rank": logged_per_rank,
        "checks": {
            "decision_identical_on_every_rank": all(
                (r["decision"], r["pad_value"]) == (mine["decision"], mine["pad_value"])
                for r in ranks
            ),
            "summary_identical_on_every_rank": all(r["summary"] == mine["summary"] for r in ranks),
            "summary_logged_once": sum(logged_per_rank) == 1,
        },
    }


# --- running ---------------------------------------------------------------------------------


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _input(shape: Sequence[int], seed: int, dtype: torch.dtype, dev: str) -> torch.Tensor:
    from oracles import make_input  # pylint: disable=C0415

    return make_input(shape, seed=seed, device=dev).to(dtype)


def _causal_mask(seq: int, dev: str) -> torch.Tensor:
    return torch.ones(seq, seq, dtype=torch.bool, device=dev).triu(1).view(1, 1, seq, seq)


def _mask_for(case: Dict[str, Any], seq: int, dev: str) -> Optional[torch.Tensor]:
    """Megatron's local spec takes an explicit causal mask; TE builds its own."""
    return _causal_mask(seq, dev) if case["spec"] == "local" else None


def _layer_forward(module, x, mask, packed=None):
    kwargs = {"packed_seq_params": packed} if packed is not None else {}
    out, bias = module(x, mask, **kwargs)
    return out if bias is None else out + bias


def _fwd_bwd(run: Callable[[torch.Tensor], torch.Tensor], module, x, grad_out):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = run(x)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), x.grad.detach()


def _grad_rel(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> Dict[str, float]:
    missing = sorted(set(want) - set(got))
    if missing:
        raise AssertionError(f"no gradient for {missing[:5]}")
    return {f"grad:{name}": env.max_rel(got[name], want[name]) for name in sorted(want)}


def _summarize(rel: Dict[str, float]) -> Dict[str, float]:
    grads = {k: v for k, v in rel.items() if k.startswith("grad:")}
    out = {k: v for k, v in rel.items() if not k.startswith("grad:")}
    if grads:
        worst = max(grads, key=grads.get)
        out["grads"] = grads[worst]
        out["worst_grad"] = worst
    return out


#: Metrics compared against the output tolerance; the rest against the gradient tolerance.
FORWARD_METRICS = ("out", "loss", "loss_step1", "out_vs_bshd", "thd_vs_bshd_cp1")
#: Metrics that a wrong gradient changes (a known upstream gradient bug exempts them).
GRADIENT_METRICS = ("grad_x", "grads", "grad_norm", "loss")


def _within(rel: Dict[str, Any], tol: Sequence[float]) -> Dict[str, bool]:
    checks = {}
    for key, value in rel.items():
        if isinstance(value, (int, float)):
            limit = tol[0] if key in FORWARD_METRICS else tol[1]
            checks[f"{key}<={limit:g}"] = bool(value <= limit)
    return checks


# --- TP --------------------------------------------------------------------------------------


def tp_layer(case: Dict[str, Any], dev: str) -> Dict[str, Any]:
    """MLA layer at TP (with sequence parallelism) against TP=1."""
    m, lay = case["model"], case["layout"]
    dtype = _dtype(case)
    seq, batch, hidden = m["seq"], m["batch"], m["hidden"]
    x = _input((seq, batch, hidden), 1, dtype, dev)
    grad_out = _input((seq, batch, hidden), 2, dtype, dev)
    with env.parallel(dev):
        config = make_config(case, parallel=False)
        ref = build_layer(case, config, dev)
        env.broadcast_module(ref)
        full = env.full_params(ref)
        mask = _mask_for(case, seq, dev)
        out_ref, dx_ref = _fwd_bwd(lambda t: _layer_forward(ref, t, mask), ref, x, grad_out)
        grads_ref = env.gathered_grads(ref)
    with env.parallel(dev, tp=lay["tp"]) as ps:
        config = make_config(case, parallel=True)
        with capture_adapter_log() as logged:
            layer = on_every_rank(lambda: build_layer(case, config, dev))
        consensus = adapter_consensus(config, logged)
        env.load_full(layer, full)
        tp, tp_rank = lay["tp"], ps.get_tensor_model_parallel_rank()
        part = (lambda t: t.chunk(tp, dim=0)[tp_rank]) if lay.get("sp") else (lambda t: t)
        out, dx = _fwd_bwd(lambda t: _layer_forward(layer, t, mask), layer, part(x), part(grad_out))
        env.reduce_sequence_parallel_grads(layer, config)
        grads = env.gathered_grads(layer)
        rel = {
            "out": env.sharded_max_rel(out, part(out_ref)),
            "grad_x": env.sharded_max_rel(dx, part(dx_ref)),
            **_grad_rel(grads, grads_ref),
        }
    return {"max_rel": _summarize(rel), "adapter": consensus}


def _batch(case: Dict[str, Any], step: int, micro: int, dev: str):
    """Tokens and labels of one micro-batch: ``x_{i+1} = (x_i + d) mod 64`` per row."""
    m = case["model"]
    gen = torch.Generator().manual_seed(1234 * 1000 + step * 16 + micro)
    start = torch.randint(0, 64, (m["batch"], 1), generator=gen)
    stride = torch.randint(1, 4, (m["batch"], 1), generator=gen)
    seq = (start + stride * torch.arange(m["seq"] + 1)) % 64
    return seq[:, :-1].to(dev), seq[:, 1:].to(dev)


def _gpt_loss(case, model, tokens, labels, dev):
    seq = tokens.size(1)
    positions = torch.arange(seq, device=dev).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, _mask_for(case, seq, dev), labels=labels).float().mean()


def grad_norm(modules: Sequence[torch.nn.Module], group: Any = None) -> float:
    """Global L2 norm of the gradients of a model split over ``group`` (model-parallel ranks).

    Parameters split over TP count on every TP rank; replicated ones only on TP rank 0.
    """
    from megatron.core import parallel_state  # pylint: disable=C0415

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    total = torch.zeros((), dtype=torch.float64)
    for module in modules:
        for param in module.parameters():
            grad = env.param_grad(param)
            if grad is None or (tp_rank != 0 and not env.is_tp_split(param, tp)):
                continue
            total += grad.double().square().sum().cpu()
    if group is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        total = total.to(device)
        dist.all_reduce(total, group=group)
    return float(total.sqrt().item())


def _train_gpt(case, model, config, dev, first_grads: bool):
    """Loss and grad norm per step; the first step's full gradients when asked."""
    from megatron.core import parallel_state  # pylint: disable=C0415

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    metrics: Dict[str, List[float]] = {"lm loss": [], "grad norm": []}
    grads = None
    group = parallel_state.get_model_parallel_group()
    for step in range(1, case["steps"] + 1):
        model.zero_grad(set_to_none=True)
        tokens, labels = _batch(case, step, 0, dev)
        loss = _gpt_loss(case, model, tokens, labels, dev)
        loss.backward()
        env.reduce_sequence_parallel_grads(model, config)
        if first_grads and step == 1:
            grads = env.gathered_grads(model)
        metrics["grad norm"].append(grad_norm([model], group))
        metrics["lm loss"].append(float(loss.item()))
        optimizer.step()
    return metrics, grads


def _metric_rel(got: Dict[str, List[float]], want: Dict[str, List[float]]) -> Dict[str, float]:
    out = {}
    for name in want:
        pairs = list(zip(got.get(name, []), want[name]))
        if len(pairs) != len(want[name]):
            raise AssertionError(f"{name}: {len(got.get(name, []))} steps, want {len(want[name])}")
        rel = [abs(a - b) / max(abs(b), 1e-30) for a, b in pairs]
        key = "loss" if "loss" in name else "grad_norm"
        out[key] = max(rel)
        if key == "loss":
            out["loss_step1"] = rel[0]
    return out


def tp_gpt(case: Dict[str, Any], dev: str) -> Dict[str, Any]:
    """Tiny MLA GPT at TP (sequence parallel): first-step gradients and per-step loss."""
    lay = case["layout"]
    with env.parallel(dev):
        config = make_config(case, parallel=False)
        ref = build_gpt(case, config, dev)
        env.broadcast_module(ref)
        full = env.full_params(ref)
        ref_metrics, ref_grads = _train_gpt(case, ref, config, dev, first_grads=True)
    with env.parallel(dev, tp=lay["tp"]):
        config = make_config(case, parallel=True)
        with capture_adapter_log() as logged:
            model = on_every_rank(lambda: build_gpt(case, config, dev))
        consensus = adapter_consensus(config, logged)
        env.load_full(model, full)
        metrics, grads = _train_gpt(case, model, config, dev, first_grads=True)
        rel = {**_metric_rel(metrics, ref_metrics), **_grad_rel(grads, ref_grads)}
    return {
        "max_rel": _summarize(rel),
        "adapter": consensus,
        "metrics": metrics,
        "reference_metrics": ref_metrics,
    }


# --- PP --------------------------------------------------------------------------------------


def expected_layer_numbers(num_layers: int, pp: int, vp: Optional[int], first, last):
    """``{(pp_rank, vp_stage): [layer numbers]}`` counted independently of Megatron.

    Layers go chunk by chunk, virtual stage 0 of every rank first; the first and last ranks
    hold ``first`` / ``last`` layers in all (split evenly over their virtual stages), the
    middle ranks share the rest evenly.
    """
    vps = vp or 1
    per_rank = [None] * pp
    if first is None and last is None:
        per_rank = [num_layers // pp] * pp
    else:
        middle = [r for r in range(pp) if not (r == 0 and first) and not (r == pp - 1 and last)]
        rest = num_layers - (first or 0) - (last or 0)
        for r in range(pp):
            per_rank[r] = rest // len(middle) if r in middle else None
        if first is not None:
            per_rank[0] = first
        if last is not None:
            per_rank[-1] = last
    table, number = {}, 1
    for stage in range(vps):
        for r in range(pp):
            count = per_rank[r] // vps
            table[(r, stage)] = list(range(number, number + count))
            number += count
    return table


def _upstream_offset(config, vp_stage, pp_rank) -> Tuple[Optional[int], Optional[str]]:
    import inspect  # pylint: disable=C0415

    from megatron.core.transformer.transformer_layer import (  # pylint: disable=C0415
        get_transformer_layer_offset,
    )

    params = inspect.signature(get_transformer_layer_offset).parameters
    try:
        if "pp_rank" in params:
            return int(get_transformer_layer_offset(config, vp_stage, pp_rank)), None
        return int(get_transformer_layer_offset(config, vp_stage)), None
    except Exception as exc:  # pylint: disable=broad-except
        return None, f"{type(exc).__name__}: {exc}"


def _chunk_names(chunk: torch.nn.Module) -> Dict[str, str]:
    """This chunk's parameter names -> the PP=1 model's, through each layer's ``layer_number``."""
    numbers = [layer.layer_number for layer in chunk.decoder.layers]
    names = {}
    for name, _ in chunk.named_parameters():
        match = re.match(r"^decoder\.layers\.(\d+)\.", name)
        if match:
            global_index = numbers[int(match.group(1))] - 1
            name_ref = f"decoder.layers.{global_index}." + name[match.end() :]
            names[name] = name_ref
        else:
            names[name] = name
    return names


def _pipeline_step(case, chunks, config, dev, step: int) -> Optional[float]:
    """One training step through Megatron's schedule; the mean loss on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: C0415

    m = case["model"]
    micro = case["microbatches"]
    batches = [_batch(case, step, i, dev) for i in range(micro)]

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        positions = torch.arange(tokens.size(1), device=dev).unsqueeze(0).expand_as(tokens)
        output = model(tokens, positions, _mask_for(case, tokens.size(1), dev), labels=labels)

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(batches) for _ in chunks],
        model=list(chunks),
        num_microbatches=micro,
        seq_length=m["seq"],
        micro_batch_size=m["batch"],
        forward_only=False,
    )
    if not losses:
        return None
    return float(torch.stack([d["lm loss"].float() for d in losses]).mean().item())


def pipeline(case: Dict[str, Any], dev: str) -> Dict[str, Any]:
    """Tiny MLA GPT over PP (virtual stages, uneven first/last) against PP=1, per step."""
    lay, m = case["layout"], case["model"]
    stages = list(range(lay.get("vp") or 1))
    # The offset table first: it exists even where a tree cannot build the model at all (the
    # vanilla tree's local spec, #1589), so upstream's own offset errors are always recorded.
    with env.parallel(dev, tp=lay["tp"], pp=lay["pp"], vp=lay.get("vp")) as ps:
        pp_rank = ps.get_pipeline_model_parallel_rank()
        offsets = _offset_table(make_config(case, parallel=True), stages, pp_rank, lay)
    with env.parallel(dev):
        config = make_config(case, parallel=False)
        try:
            ref = build_gpt(case, config, dev)
        except BuildError as exc:
            raise BuildError(str(exc), {"offsets": offsets}) from exc
        env.broadcast_module(ref)
        full = env.full_params(ref)
        ref_metrics = {"lm loss": [], "grad norm": []}
        optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        for step in range(1, case["steps"] + 1):
            ref.zero_grad(set_to_none=True)
            total = 0.0
            for i in range(case["microbatches"]):
                loss = _gpt_loss(case, ref, *_batch(case, step, i, dev), dev)
                (loss / case["microbatches"]).backward()
                total += float(loss.item())
            ref_metrics["lm loss"].append(total / case["microbatches"])
            ref_metrics["grad norm"].append(grad_norm([ref]))
            optimizer.step()
    with env.parallel(dev, tp=lay["tp"], pp=lay["pp"], vp=lay.get("vp")) as ps:
        config = make_config(case, parallel=True)

        def build_chunks():
            return [
                build_gpt(
                    case,
                    config,
                    dev,
                    pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                    vp_stage=stage if lay.get("vp") else None,
                )
                for stage in stages
            ]

        with capture_adapter_log() as logged:
            try:
                chunks = on_every_rank(build_chunks)
            except BuildError as exc:
                raise BuildError(str(exc), {"offsets": offsets}) from exc
        consensus = adapter_consensus(config, logged)
        built = env.all_ranks(
            [[int(layer.layer_number) for layer in chunk.decoder.layers] for chunk in chunks]
        )
        _built_numbers(offsets, built, stages, ps)
        loaded: List[str] = []
        for chunk in chunks:
            loaded += env.load_full(chunk, full, _chunk_names(chunk))
        placed = sorted(
            sum(env.all_ranks(loaded if ps.get_tensor_model_parallel_rank() == 0 else []), [])
        )
        metrics = {"lm loss": [], "grad norm": []}
        params = [p for chunk in chunks for p in chunk.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        last = ps.get_pipeline_model_parallel_last_rank()
        for step in range(1, case["steps"] + 1):
            for chunk in chunks:
                chunk.zero_grad(set_to_none=True)
            loss = _pipeline_step(case, chunks, config, dev, step)
            for chunk in chunks:
                env.reduce_sequence_parallel_grads(chunk, config)
            box = [loss]
            dist.broadcast_object_list(box, src=last, group=ps.get_pipeline_model_parallel_group())
            metrics["lm loss"].append(box[0])
            metrics["grad norm"].append(grad_norm(chunks, ps.get_model_parallel_group()))
            optimizer.step()
    rel = _metric_rel(metrics, ref_metrics)
    checks = {"every_weight_placed_once": placed == sorted(full)}
    return {
        "max_rel": rel,
        "adapter": consensus,
        "metrics": metrics,
        "reference_metrics": ref_metrics,
        "offsets": offsets,
        "checks": checks,
        "layers": m["layers"],
    }


def _offset_table(config, stages, pp_rank, lay) -> Dict[str, Any]:
    """Offsets of every (rank, virtual stage): the adapter's, upstream's and counted (collective).

    Computed before any model is built, so the table exists when upstream cannot build.
    """
    adapter = None
    if have_adapter():
        from megatron.core.transformer import mla_adapter  # pylint: disable=C0415

        adapter = mla_adapter.layer_offset
    mine = []
    for stage in stages:
        vp_stage = stage if lay.get("vp") else None
        upstream, error = _upstream_offset(config, vp_stage, pp_rank)
        mine.append(
            {
                "pp_rank": pp_rank,
                "vp_stage": stage,
                "adapter_offset": None if adapter is None else adapter(config, vp_stage, pp_rank),
                "upstream_offset": upstream,
                "upstream_error": error,
            }
        )
    rows = {(r["pp_rank"], r["vp_stage"]): r for rows_ in env.all_ranks(mine) for r in rows_}
    expected = expected_layer_numbers(
        config.num_layers, lay["pp"], lay.get("vp"), lay.get("first"), lay.get("last")
    )
    table = []
    for key in sorted(expected):
        row = dict(rows.get(key) or {"pp_rank": key[0], "vp_stage": key[1]})
        row["expected"] = expected[key]
        table.append(row)

    def offset_ok(row, field):
        return not row["expected"] or row.get(field) == row["expected"][0] - 1

    # Where upstream's function raises (a known upstream issue of the case), it is not counted.
    checks = {
        "upstream_offset_as_counted": all(
            offset_ok(r, "upstream_offset") for r in table if not r.get("upstream_error")
        )
    }
    if adapter is not None:
        checks["adapter_offset_as_counted"] = all(offset_ok(r, "adapter_offset") for r in table)
    return {"table": table, "checks": checks}


def _built_numbers(offsets: Dict[str, Any], built: List[Any], stages, ps) -> None:
    """Add the layer numbers the chunks actually got to the offset table."""
    pp_of_rank = env.all_ranks(ps.get_pipeline_model_parallel_rank())
    numbers = {}
    for global_rank, chunks in enumerate(built):
        for stage, layer_numbers in zip(stages, chunks):
            numbers[(pp_of_rank[global_rank], stage)] = layer_numbers
    for row in offsets["table"]:
        row["layer_numbers"] = numbers.get((row["pp_rank"], row["vp_stage"]))
    offsets["checks"]["layer_numbers_as_counted"] = all(
        row["layer_numbers"] == row["expected"] for row in offsets["table"]
    )


# --- CP --------------------------------------------------------------------------------------


def cp_indices(lengths: Sequence[int], cp: int, cp_rank: int, dev: str) -> torch.Tensor:
    """Token indices of ``cp_rank``: each sequence in ``2*cp`` chunks, chunks r and 2cp-1-r."""
    parts, start = [], 0
    for length in lengths:
        chunk = length // (2 * cp)
        for piece in (cp_rank, 2 * cp - 1 - cp_rank):
            parts.append(torch.arange(start + piece * chunk, start + (piece + 1) * chunk))
        start += length
    return torch.cat(parts).to(dev)


def _packed(lengths: Sequence[int], dev: str):
    from mla_build import packed_seq_params  # pylint: disable=C0415

    return packed_seq_params(lengths, padded=list(lengths), dev=dev)


def _block_forward(block, x, packed, mask=None):
    out = block(hidden_states=x, attention_mask=mask, packed_seq_params=packed)
    return out[0] if isinstance(out, tuple) else out


def _cp_parts(ps, lay, lengths, dev):
    """Index of this rank's tokens (CP split, then the SP split over TP) in the full batch."""
    idx = cp_indices(lengths, lay["cp"], ps.get_context_parallel_rank(), dev)
    if lay.get("sp") and lay["tp"] > 1:
        idx = idx.chunk(lay["tp"])[ps.get_tensor_model_parallel_rank()]
    return idx


def _cp_reduce_grads(module: torch.nn.Module, ps) -> None:
    if ps.get_context_parallel_world_size() < 2:
        return
    group = ps.get_context_parallel_group()
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)


def _block_train(case, block, config, x, target, packed, idx, ps):
    """Loss and grad norm per AdamW step of ``sum((block(x) - target)^2) / x.numel()``."""
    optimizer = torch.optim.AdamW(block.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    scale = x.numel()
    mine = x if idx is None else x[idx]
    want = target if idx is None else target[idx]
    metrics: Dict[str, List[float]] = {"loss": [], "grad norm": []}
    for _ in range(case["steps"]):
        block.zero_grad(set_to_none=True)
        out = _block_forward(block, mine, packed)
        loss = (out.float() - want.float()).square().sum() / scale
        loss.backward()
        _cp_reduce_grads(block, ps)
        env.reduce_sequence_parallel_grads(block, config)
        metrics["loss"].append(_sum_loss(loss.detach().double(), ps, config))
        metrics["grad norm"].append(_block_norm(block, ps))
        optimizer.step()
    return metrics


def _sum_loss(value: torch.Tensor, ps, config) -> float:
    """The loss summed over the ranks that hold different tokens (CP, and TP under SP)."""
    groups = []
    if ps.get_context_parallel_world_size() > 1:
        groups.append(ps.get_context_parallel_group())
    if config.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
        groups.append(ps.get_tensor_model_parallel_group())
    for group in groups:
        dist.all_reduce(value, group=group)
    return float(value.item())


def _block_norm(block, ps) -> float:
    group = (
        ps.get_tensor_model_parallel_group()
        if ps.get_tensor_model_parallel_world_size() > 1
        else None
    )
    return grad_norm([block], group)


def cp_block(case: Dict[str, Any], dev: str) -> Dict[str, Any]:
    """MLA block on THD packed sequences at CP against CP=1 and against per-sequence bshd."""
    m, lay = case["model"], case["layout"]
    dtype = _dtype(case)
    lengths = m["lengths"]
    tokens = sum(lengths)
    x = _input((tokens, 1, m["hidden"]), 1, dtype, dev)
    grad_out = _input((tokens, 1, m["hidden"]), 2, dtype, dev)
    target = _input((tokens, 1, m["hidden"]), 3, dtype, dev)
    packed = _packed(lengths, dev)
    with env.parallel(dev) as ps:
        config = make_config(case, parallel=False)
        ref = build_block(case, config, dev)
        env.broadcast_module(ref)
        full = env.full_params(ref)
        out_ref, dx_ref = _fwd_bwd(lambda t: _block_forward(ref, t, packed), ref, x, grad_out)
        grads_ref = env.gathered_grads(ref)
        pieces, start = [], 0
        with torch.no_grad():
            for length in lengths:
                mask = _mask_for(case, length, dev)
                pieces.append(_block_forward(ref, x[start : start + length], None, mask))
                start += length
        thd_vs_bshd = env.max_rel(out_ref, torch.cat(pieces, dim=0))
        ref_metrics = _block_train(case, ref, config, x, target, packed, None, ps)
    with env.parallel(dev, tp=lay["tp"], cp=lay["cp"]) as ps:
        config = make_config(case, parallel=True)
        with capture_adapter_log() as logged:
            block = on_every_rank(lambda: build_block(case, config, dev))
        consensus = adapter_consensus(config, logged)
        env.load_full(block, full)
        comm = [
            getattr(layer.self_attention.core_attention, "cp_comm_type", None)
            for layer in block.layers
        ]
        idx = _cp_parts(ps, lay, lengths, dev)
        out, dx = _fwd_bwd(lambda t: _block_forward(block, t, packed), block, x[idx], grad_out[idx])
        _cp_reduce_grads(block, ps)
        env.reduce_sequence_parallel_grads(block, config)
        grads = env.gathered_grads(block)
        rel = {
            "out": env.sharded_max_rel(out, out_ref[idx]),
            "grad_x": env.sharded_max_rel(dx, dx_ref[idx]),
            "out_vs_bshd": env.sharded_max_rel(out, torch.cat(pieces, dim=0)[idx]),
            **_grad_rel(grads, grads_ref),
        }
        metrics = _block_train(case, block, config, x, target, packed, idx, ps)
        deterministic = None
        if case.get("golden"):
            env.load_full(block, full)
            again = _block_train(case, block, config, x, target, packed, idx, ps)
            deterministic = again == metrics
    want_comm = case.get("cp_comm_type")
    if isinstance(want_comm, (list, tuple)):
        expected_comm = list(want_comm)
    else:
        expected_comm = [want_comm or "p2p"] * len(comm)
    rel.update(_metric_rel(metrics, ref_metrics))
    rel["thd_vs_bshd_cp1"] = thd_vs_bshd
    # The TE class keeps the cp_comm_type it was given; where it does not expose it, the
    # per-layer list is still exercised (upstream's off-by-one indexing fails at build).
    checks = {"cp_comm_type_per_layer": comm == expected_comm} if any(comm) else {}
    return {
        "max_rel": _summarize(rel),
        "adapter": consensus,
        "cp_comm_type_per_layer": comm,
        "checks": checks,
        "metrics": metrics,
        "reference_metrics": ref_metrics,
        "deterministic": deterministic,
    }


def cp_sweep(case: Dict[str, Any], dev: str) -> Dict[str, Any]:
    """One MLA layer at CP on 1..256 packed sequences of one token budget, against CP=1."""
    m, lay = case["model"], case["layout"]
    dtype = _dtype(case)
    tokens = m["tokens"]
    x = _input((tokens, 1, m["hidden"]), 1, dtype, dev)
    grad_out = _input((tokens, 1, m["hidden"]), 2, dtype, dev)
    counts = list(case["sweep"])
    refs = {}
    with env.parallel(dev):
        config = make_config(case, parallel=False)
        ref = build_layer(case, config, dev)
        env.broadcast_module(ref)
        full = env.full_params(ref)
        for count in counts:
            lengths = [tokens // count] * count
            packed = _packed(lengths, dev)
            out_ref, dx_ref = _fwd_bwd(
                lambda t: _layer_forward(ref, t, None, packed), ref, x, grad_out
            )
            refs[count] = (lengths, out_ref, dx_ref, env.gathered_grads(ref))
    rows = []
    with env.parallel(dev, tp=lay["tp"], cp=lay["cp"]) as ps:
        config = make_config(case, parallel=True)
        with capture_adapter_log() as logged:
            layer = on_every_rank(lambda: build_layer(case, config, dev))
        consensus = adapter_consensus(config, logged)
        env.load_full(layer, full)
        for count in counts:
            lengths, out_ref, dx_ref, grads_ref = refs[count]
            packed = _packed(lengths, dev)
            idx = _cp_parts(ps, lay, lengths, dev)
            run = lambda t: _layer_forward(layer, t, None, packed)  # noqa: E731
            out, dx = _fwd_bwd(run, layer, x[idx], grad_out[idx])
            _cp_reduce_grads(layer, ps)
            env.reduce_sequence_parallel_grads(layer, config)
            rel = {
                "out": env.sharded_max_rel(out, out_ref[idx]),
                "grad_x": env.sharded_max_rel(dx, dx_ref[idx]),
                **_grad_rel(env.gathered_grads(layer), grads_ref),
            }
            times = []
            for _ in range(case.get("reps", 5)):
                _sync(dev)
                dist.barrier()
                start = time.perf_counter()
                _fwd_bwd(run, layer, x[idx], grad_out[idx])
                _sync(dev)
                times.append((time.perf_counter() - start) * 1e3)
            slowest = env.all_ranks(statistics.median(times))
            rows.append({"sequences": count, "ms_median": max(slowest), **_summarize(rel)})
    worst = {key: max(r[key] for r in rows) for key in ("out", "grad_x", "grads") if key in rows[0]}
    return {"max_rel": worst, "adapter": consensus, "sweep": rows}


KINDS: Dict[str, Callable[[Dict[str, Any], str], Dict[str, Any]]] = {
    "tp_layer": tp_layer,
    "tp_gpt": tp_gpt,
    "pipeline": pipeline,
    "cp_block": cp_block,
    "cp_sweep": cp_sweep,
}


def blocker(case: Dict[str, Any], dev: str) -> str:
    """Why this case cannot run in this process (``""``: it can)."""
    from mla_build import have_te  # pylint: disable=C0415

    needs = case.get("needs") or []
    if "cuda" in needs and dev != "cuda":
        return "needs CUDA devices (NCCL)"
    if "te" in needs and not have_te():
        return "needs Transformer Engine"
    if dev == "cpu":
        from mla_build import cpu_blocker  # pylint: disable=C0415

        return cpu_blocker()
    return ""


def te_down_projections_column_parallel() -> bool:
    """Whether this tree's TE spec builds MLA's q/kv down projections column-parallel (0.13).

    Read from the spec function's source: building the spec needs Transformer Engine, and the
    answer is needed on CPU-only machines too (the known issue it selects is judged per tree).
    """
    from megatron.core.models.gpt import gpt_layer_specs  # pylint: disable=C0415

    source = inspect.getsource(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec)
    return bool(re.search(r"linear_kv_down_proj\s*=\s*backend\.column_parallel_linear\(", source))


#: Conditions a known issue may name (``known_issue["when"]``), checked in the running tree.
WHEN: Dict[str, Callable[[], bool]] = {
    "te_down_projections_column_parallel": te_down_projections_column_parallel,
}


def for_side(case: Dict[str, Any], side: str) -> Dict[str, Any]:
    """``case`` as the tree ``side`` (patched or vanilla) runs it.

    A known issue may hold on some trees only (``known_issue["sides"]``, default every tree):
    one the adapter absorbs is expected on the vanilla tree, and the patched tree runs the case
    and is judged like any other. It may also hold only where a condition of the release holds
    (``known_issue["when"]``, a name in :data:`WHEN`).
    """
    known = case.get("known_issue") or {}
    if known and side not in known.get("sides", (side,)):
        return dict(case, known_issue=None)
    if known.get("when") and not WHEN[known["when"]]():
        return dict(case, known_issue=None)
    return case


def judge(
    case: Dict[str, Any],
    outcome: str,
    message: str,
    rel: Dict[str, Any],
    offsets: Optional[Dict[str, Any]] = None,
):
    """Checks of the compared metrics against the case's tolerance and its known issue.

    A case may name a known upstream issue (``known_issue``): ``expect: "grads"`` means
    upstream's gradients are wrong in this layout (outputs must still match, and the gradient
    mismatch must be there: if upstream fixes it, the check says so); ``expect:
    "build_error"`` means upstream cannot build it (the error must name ``match``);
    ``expect: "offset_error"`` means upstream's ``get_transformer_layer_offset`` raises for
    some (rank, virtual stage) of the layout (the pipeline offset table's error must name
    ``match``), whatever else stops the build.
    """
    known = case.get("known_issue") or {}
    tol = case["tolerance"]
    if known.get("expect") == "build_error":
        return {
            "known_issue_reproduced": outcome == "build_error" and known.get("match", "") in message
        }
    if known.get("expect") == "offset_error":
        errors = [row.get("upstream_error") or "" for row in (offsets or {}).get("table", [])]
        return {"known_issue_reproduced": any(known.get("match", "") in e for e in errors)}
    if outcome != "ran":
        return {}
    if known.get("expect") != "grads":
        return _within(rel, tol)
    forward = {k: v for k, v in rel.items() if k not in GRADIENT_METRICS}
    checks = _within(forward, tol)
    worst_grad = max((rel.get(k) or 0.0) for k in ("grads", "grad_x"))
    checks["known_issue_reproduced"] = worst_grad > tol[1]
    return checks


def run_case(case: Dict[str, Any], dev: str) -> Dict[str, Any]:
    """Run one case on every rank; rank 0's return value is the record.

    Exceptions become the outcome (``build_error`` when Megatron could not build the model,
    ``run_error`` otherwise); the ranks agree on the outcome before returning.
    """
    start = time.monotonic()
    reason = blocker(case, dev)
    if reason:
        return {"outcome": "skipped", "message": reason, "ok": None, "seconds": 0.0}
    outcome, message, result = "ran", "", {}
    # Read by Transformer Engine when an attention module is built: deterministic backward
    # kernels where the case asks for them (the fp32 cases; the bf16 CP cases check their
    # determinism by training twice instead).
    os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0" if case.get("deterministic") else "1"
    try:
        result = KINDS[case["kind"]](case, dev)
    except BuildError as exc:
        outcome, message, result = "build_error", str(exc)[:600], exc.extra
    except Exception as exc:  # pylint: disable=broad-except
        outcome = "run_error"
        message = f"{type(exc).__name__}: {exc}"[:600] + "\n" + traceback.format_exc()[-1500:]
    if outcome != "ran":
        sys.stderr.write(f"[rank {env.rank()}] {case['name']}: {outcome}: {message}\n")
    outcomes = env.all_ranks((_OUTCOME, outcome, message))
    if any(not (isinstance(o, tuple) and o[:1] == (_OUTCOME,)) for o in outcomes):
        raise Desync(
            f"{case['name']}: the ranks left the case at different collectives (one rank "
            "failed while another was still communicating); this process group cannot go on"
        )
    if any(o[1] != "ran" for o in outcomes):
        outcome, message = next((o[1], o[2]) for o in outcomes if o[1] != "ran")
        result = {k: v for k, v in result.items() if k in ("adapter", "offsets")}
    checks = dict(result.pop("checks", {}) or {})
    checks.update((result.get("offsets") or {}).get("checks", {}))
    checks.update(judge(case, outcome, message, result.get("max_rel") or {}, result.get("offsets")))
    adapter = result.get("adapter") or {}
    checks.update(adapter.get("checks", {}))
    ok = outcome == "ran" and all(checks.values())
    if (case.get("known_issue") or {}).get("expect") in ("build_error", "offset_error"):
        ok = all(checks.values())
    return {
        "outcome": outcome,
        "message": message,
        "checks": checks,
        "ok": ok,
        "seconds": round(time.monotonic() - start, 2),
        **result,
    }


__all__ = ["KINDS", "run_case", "for_side", "blocker", "cp_indices", "expected_layer_numbers"]
