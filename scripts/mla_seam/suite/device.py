"""What the suite runs on: the device probe, run in the interpreter the tests will use."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from typing import Any, Dict, List, Optional

from mla_seam.errors import DeviceError

_PROBE = r"""
import json, platform, sys
info = {"python": platform.python_version()}
try:
    import torch
except Exception as exc:
    info.update(torch=None, cuda=False, error="torch does not import: %s" % exc)
    print(json.dumps(info)); sys.exit(0)
info.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda=torch.cuda.is_available())
if info["cuda"]:
    info.update(
        device_count=torch.cuda.device_count(),
        name=torch.cuda.get_device_name(0),
        capability=list(torch.cuda.get_device_capability(0)),
        memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        cudnn=torch.backends.cudnn.version(),
    )
try:
    import transformer_engine
    info["te"] = str(getattr(transformer_engine, "__version__", "unknown"))
except Exception as exc:
    info["te"] = None
    info["te_error"] = str(exc)[:200]
try:
    import transformers
    info["transformers"] = transformers.__version__
except Exception:
    info["transformers"] = None
print(json.dumps(info))
"""


@dataclasses.dataclass
class DeviceInfo:
    """What the suite ran on (filled by :func:`probe_device`)."""

    python: str
    torch: Optional[str]
    cuda: bool
    cuda_build: Optional[str] = None
    device_count: int = 0
    name: Optional[str] = None
    capability: Optional[List[int]] = None
    memory_gib: Optional[float] = None
    cudnn: Optional[int] = None
    te: Optional[str] = None
    transformers: Optional[str] = None
    error: Optional[str] = None
    te_error: Optional[str] = None

    @property
    def slug(self) -> str:
        """Short card name for file names (``h100``, ``h200``, ...)."""
        return card_slug(self.name or "cpu")

    def as_dict(self) -> Dict[str, Any]:
        """JSON form, with the slug."""
        data = dataclasses.asdict(self)
        data["slug"] = self.slug
        return data


def card_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``; other names: lower-case alphanumerics."""
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name.upper().replace("NVIDIA", ""))
    if match:
        return match.group(1).lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def probe_device(python: str) -> DeviceInfo:
    """Ask ``python`` (the interpreter the tests will use) what device and libraries it sees."""
    try:
        proc = subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, timeout=180, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return DeviceInfo(python="?", torch=None, cuda=False, error=f"probe failed: {exc}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        err = (proc.stderr or proc.stdout).strip()[-300:]
        return DeviceInfo(python="?", torch=None, cuda=False, error=f"probe failed: {err}")
    data = json.loads(lines[-1])
    fields = {f.name for f in dataclasses.fields(DeviceInfo)}
    return DeviceInfo(**{k: v for k, v in data.items() if k in fields})


def require_gpu(info: DeviceInfo) -> None:
    """Raise :class:`DeviceError` unless a CUDA device is visible.

    Raises:
        DeviceError: No CUDA device (or torch does not import).
    """
    if info.cuda:
        return
    if info.torch is None:
        what = info.error or "torch does not import"
    else:
        what = f"torch {info.torch} (CUDA build: {info.cuda_build or 'none'}) sees no CUDA device"
    raise DeviceError(
        f"the GPU suite needs a CUDA device: {what}",
        "run it on a machine with an NVIDIA GPU and a CUDA build of torch (check "
        "CUDA_VISIBLE_DEVICES and nvidia-smi); the CPU-runnable parts run with "
        "MLA_SEAM_MEGATRON_TREE=DIR pytest tests/gpu/test_oracles.py",
    )


def versions(info: DeviceInfo) -> Dict[str, Any]:
    """The software versions a result depends on (the verdict's and drift report's ``versions``)."""
    return {
        "torch": info.torch,
        "cuda": info.cuda_build,
        "cudnn": info.cudnn,
        "transformer_engine": info.te,
        "transformers": info.transformers,
        "python": info.python,
    }
