"""Device-free counts of what the adapter makes the host do: torch ops per entry point, host reads.

Shared by the THD tests of this folder (``test_thd_host.py``) and the CPU method of
``benchmarks/thd-host.md`` (``benchmarks/thd_host_cpu.py``). Nothing here replaces a torch or
Megatron function: the counters are torch's own dispatch/function modes, and the labels come
from wrapping the adapter's entry points (the names Megatron's hooks call, listed once in
``tests/gpu/host_profile.py``, which the GPU bench labels the same way) for a ``with`` block.

* :class:`HostReads` counts the calls that read a tensor's values on the host (``tolist``,
  ``item``, ``__bool__``, ``torch.equal``, ``cpu``, ...): on a GPU each is a device-to-host
  copy, and a sync.
* :class:`OpCounter` counts the aten ops each adapter entry point issues per layer step,
  forward and backward (a backward op is charged to the entry point whose forward op created
  its autograd node), and how many of them are not views (on a GPU, about one kernel launch
  each).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
from host_profile import entry_points_wrapped  # noqa: E402  pylint: disable=C0413

#: Tensor methods and torch functions whose result is a value read on the host.
HOST_READS = (
    "tolist",
    "item",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "equal",
    "cpu",
    "numpy",
    "allclose",
)


class HostReads(TorchFunctionMode):
    """Count host reads of tensor values, by kind (``with HostReads() as reads: ...``).

    ``reads.count`` is their total, ``reads.kinds`` a ``Counter`` by name. A read on a CPU
    tensor counts too: it is the same call a CUDA tensor would pay a sync for.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kinds: collections.Counter = collections.Counter()

    @property
    def count(self) -> int:
        """Host reads seen."""
        return sum(self.kinds.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.kinds[name] += 1
        elif name == "to" and any(_is_cpu(a) for a in (*args[1:], *(kwargs or {}).values())):
            self.kinds["to(cpu)"] += 1
        return func(*args, **(kwargs or {}))


def _is_cpu(value: Any) -> bool:
    return (isinstance(value, str) and value.startswith("cpu")) or (
        isinstance(value, torch.device) and value.type == "cpu"
    )


class _Attribution(TorchFunctionMode):
    """Remember which label's torch call created each autograd node (for the backward)."""

    def __init__(self, counter: "OpCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        label = self.counter.label
        if label is not None:
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                node = (
                    getattr(tensor, "grad_fn", None) if isinstance(tensor, torch.Tensor) else None
                )
                if node is not None:
                    self.counter.nodes.setdefault(node._sequence_nr(), label)
        return out


class OpCounter(TorchDispatchMode):
    """Aten ops per adapter entry point, forward and backward, during the ``with`` block.

    Use :meth:`labelled` to wrap the adapter's entry points; ops outside them count as
    ``"upstream"``. ``ops[(label, phase)]`` and ``kernels[(label, phase)]`` hold the counts
    (``phase``: ``"fwd"``/``"bwd"``); ``names[label]`` the aten op names seen under a label.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stack: List[str] = []
        self.nodes: Dict[int, str] = {}
        self.ops: collections.Counter = collections.Counter()
        self.kernels: collections.Counter = collections.Counter()
        self.names: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.calls: collections.Counter = collections.Counter()

    @property
    def label(self) -> Optional[str]:
        """The innermost entry point running now, or ``None``."""
        return self.stack[-1] if self.stack else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node = torch._C._current_autograd_node()  # pylint: disable=protected-access
        if node is not None:
            label, phase = self.nodes.get(node._sequence_nr(), "upstream"), "bwd"
        else:
            label, phase = self.label or "upstream", "fwd"
        self.ops[(label, phase)] += 1
        if not func.is_view and func.__name__ not in ("detach.default", "empty.memory_format"):
            self.kernels[(label, phase)] += 1
            self.names[label][func.__name__] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def counting(self) -> Iterator["OpCounter"]:
        """Count ops (and attribute autograd nodes) for the ``with`` block."""
        with _Attribution(self), self:
            yield self

    def wrap(self, label: str, fn: Callable) -> Callable:
        """``fn`` with its ops charged to ``label``."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.stack.append(label)
            self.calls[label] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()

        return wrapper

    @contextlib.contextmanager
    def labelled(self, adapter: Any, parts: bool = False) -> Iterator["OpCounter"]:
        """Wrap the adapter's per-step entry points (module ``adapter``) for the block; with
        ``parts``, their parts too (an op counts for the innermost)."""
        with entry_points_wrapped(adapter, self.wrap, parts):
            yield self

    def table(self, steps: int = 1) -> Dict[str, Dict[str, float]]:
        """Per label: ``calls``, ``fwd_ops``, ``fwd_kernels``, ``bwd_ops``, ``bwd_kernels``
        per step."""
        labels = sorted({label for label, _ in self.ops} | set(self.calls))
        out = {}
        for label in labels:
            out[label] = {
                "calls": self.calls[label] / steps,
                "fwd_ops": self.ops[(label, "fwd")] / steps,
                "fwd_kernels": self.kernels[(label, "fwd")] / steps,
                "bwd_ops": self.ops[(label, "bwd")] / steps,
                "bwd_kernels": self.kernels[(label, "bwd")] / steps,
            }
        return out
