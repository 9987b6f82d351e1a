"""The adapter's per-step entry points, and a torch.profiler breakdown of their host cost.

Shared by ``bench_issue8.py::test_kernel_counts`` (GPU, records) and the CPU counts of
``tests/adapter/host_counts.py`` (op counts inside patched trees). Nothing is added to the
adapter: the labels are ``torch.profiler.record_function`` ranges opened by wrappers the bench
installs around the adapter's functions for the duration of a ``with`` block.

:func:`profile_adapter` runs a step under torch.profiler (CPU and CUDA activities) with every
entry point labelled ``mla_seam::<name>`` and the step ``mla_seam::step``, then reads per label,
per step: its host time (inclusive; the upstream TE forward under the adapter's core attention,
labelled ``upstream::TEDotProductAttention.forward``, subtracted), the part of it spent between
torch ops (Python), the aten ops, kernel launches, synchronisations and copies under it, and the
host time of the backward functions autograd ran for its forward ops (matched by sequence
number: the adapter's backward, on the autograd thread). Shares are of the adapter's forward
total and of the step's host time.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable, Dict, Iterator, List, Tuple

#: Module functions the hooks reach per layer step (H2, H8, H5) and the parts they are made of.
ENTRY_FUNCTIONS = (
    "normalize_packed_seq",
    "rotary_pos_emb_fn",
    "_packed_rotary_pos_emb",
    "upstream_value_pad",
)
PART_FUNCTIONS = ("thd_positions", "rotation_table", "rotate_packed", "_padded_layout")
#: Core-attention classes whose ``forward`` is an entry point (H1's classes).
ENTRY_CLASSES = ("MLADotProductAttention", "MLATEDotProductAttention")
PREFIX = "mla_seam::"
UPSTREAM_TE = "upstream::TEDotProductAttention.forward"
STEP = PREFIX + "step"
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
COPY_CALLS = ("cudaMemcpy", "cudaMemcpyAsync")
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def entry_points(adapter: Any, parts: bool = False) -> List[Tuple[Any, str, str]]:
    """``(owner, attribute, label)`` of the adapter's per-step entry points (and their parts).

    Only what the module has is listed (a vanilla tree has none; an older adapter fewer).
    """
    names = ENTRY_FUNCTIONS + (PART_FUNCTIONS if parts else ())
    found = [(adapter, name, name) for name in names if hasattr(adapter, name)]
    batch = getattr(adapter, "PackedBatch", None)
    if parts and batch is not None and "prepare" in batch.__dict__:
        found.append((batch, "prepare", "PackedBatch.prepare"))
    for cls_name in ENTRY_CLASSES:
        cls = getattr(adapter, cls_name, None)
        if cls is not None:
            found.append((cls, "forward", f"{cls_name}.forward"))
    return found


@contextlib.contextmanager
def entry_points_wrapped(
    adapter: Any, wrap: Callable[[str, Callable], Callable], parts: bool = False
) -> Iterator[None]:
    """Replace each entry point by ``wrap(label, original)`` for the block; restore after.

    Megatron's hooks call ``mla_adapter.<name>`` at call time, and the adapter reaches its
    parts through module globals, so the wrappers are what runs.
    """
    saved = []
    for owner, attr, label in entry_points(adapter, parts):
        original = owner.__dict__[attr]
        saved.append((owner, attr, original))
        if isinstance(original, classmethod):
            setattr(owner, attr, classmethod(wrap(label, original.__func__)))
        else:
            setattr(owner, attr, wrap(label, original))
    try:
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def _labelled(label: str, fn: Callable) -> Callable:
    from torch.profiler import record_function  # pylint: disable=import-outside-toplevel

    def wrapper(*args, **kwargs):
        with record_function(PREFIX + label):
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


@contextlib.contextmanager
def labels_installed(adapter: Any) -> Iterator[None]:
    """Label every entry point and part, and upstream's TE forward under the adapter's class."""
    from torch.profiler import record_function  # pylint: disable=import-outside-toplevel

    with contextlib.ExitStack() as stack:
        stack.enter_context(entry_points_wrapped(adapter, _labelled, parts=True))
        te_cls = getattr(adapter, "MLATEDotProductAttention", None)
        if te_cls is not None:
            base = te_cls.__mro__[1]
            original = base.__dict__["forward"]

            def upstream(*args, **kwargs):
                with record_function(UPSTREAM_TE):
                    return original(*args, **kwargs)

            base.forward = upstream
            stack.callback(setattr, base, "forward", original)
        yield


def _descendants(event) -> Iterator[Any]:
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _top_ops(event) -> Iterator[Any]:
    """aten ops directly under ``event`` (not inside another op or a nested label)."""
    for child in event.cpu_children:
        if child.name.startswith("aten::"):
            yield child
        elif not child.name.startswith((PREFIX, "upstream::")):
            yield from _top_ops(child)


def breakdown(events, steps: int) -> Dict[str, Dict[str, float]]:
    """Per label, per step: host us (inclusive, upstream TE subtracted), Python us, counts.

    ``events`` are torch.profiler's ``prof.events()``. The label ``adapter`` sums the outermost
    adapter ranges (a label inside another, e.g. a part, is counted once); ``step`` is the
    step's host time.
    """
    from torch.autograd import DeviceType  # pylint: disable=import-outside-toplevel

    # Host events only: with CUDA activity a label also has a GPU-timeline twin.
    events = [e for e in events if e.device_type == DeviceType.CPU]
    rows: Dict[str, Dict[str, float]] = collections.defaultdict(collections.Counter)
    seq_of: Dict[int, str] = {}
    for event in events:
        name = event.name
        if not name.startswith(PREFIX) or name == STEP:
            continue
        label = name[len(PREFIX) :]
        row = rows[label]
        upstream = sum(d.cpu_time_total for d in _descendants(event) if d.name == UPSTREAM_TE)
        row["calls"] += 1
        row["host_us"] += event.cpu_time_total - upstream
        inside = sum(c.cpu_time_total for c in event.cpu_children)
        row["python_us"] += event.cpu_time_total - inside
        for desc in _descendants(event):
            if desc.name == UPSTREAM_TE or any(
                a.name == UPSTREAM_TE for a in _ancestors(desc, event)
            ):
                continue
            if desc.name in LAUNCH_CALLS:
                row["launches"] += 1
            elif desc.name in SYNC_CALLS:
                row["syncs"] += 1
            elif desc.name in COPY_CALLS:
                row["copies"] += 1
        for op in _top_ops(event):
            row["ops"] += 1
            if op.sequence_nr >= 0:
                seq_of.setdefault(op.sequence_nr, label)
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(PREFIX):
            parent = parent.cpu_parent
        if parent is None or parent.name == STEP:
            rows["adapter"]["host_us"] += event.cpu_time_total - upstream
            rows["adapter"]["calls"] += 1
    for event in events:
        name = event.name
        if name == STEP:
            rows["step"]["host_us"] += event.cpu_time_total
            rows["step"]["calls"] += 1
        elif name.startswith("autograd::engine::evaluate_function") and event.sequence_nr >= 0:
            label = seq_of.get(event.sequence_nr)
            if label is not None:
                rows[label]["bwd_host_us"] += event.cpu_time_total
                rows[label]["bwd_launches"] += sum(
                    1 for d in _descendants(event) if d.name in LAUNCH_CALLS
                )
                rows["adapter"]["bwd_host_us"] += event.cpu_time_total
    total = rows["adapter"]["host_us"] or 1.0
    step = rows["step"]["host_us"] or 1.0
    out = {}
    for label, row in rows.items():
        per = {k: round(v / steps, 2) for k, v in row.items()}
        per["share_of_adapter"] = round(row["host_us"] / total, 4)
        per["share_of_step"] = round(row["host_us"] / step, 4)
        out[label] = per
    return out


def _ancestors(event, stop) -> Iterator[Any]:
    parent = event.cpu_parent
    while parent is not None and parent is not stop:
        yield parent
        parent = parent.cpu_parent


def profile_adapter(step: Callable[[], None], steps: int, adapter: Any) -> Dict[str, Dict]:
    """Run ``steps`` steps under torch.profiler with the labels installed; :func:`breakdown`."""
    import torch  # pylint: disable=import-outside-toplevel
    from torch.profiler import ProfilerActivity, profile, record_function  # noqa: C0415

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with labels_installed(adapter), profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP):
                step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return breakdown(prof.events(), steps)
