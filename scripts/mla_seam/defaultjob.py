"""The main job of ``mla-seam apply`` without MEGATRON_DIR: megatron-core
:data:`DEFAULT_RELEASE` in ``./megatron-lm`` (materialized when absent), and the adapter's summary
line for DeepSeek-V2-Lite attention that it prints (:func:`adapter_summary`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Union

from mla_seam.errors import UpstreamError, UsageError
from mla_seam.tree import MegatronTree

log = logging.getLogger(__name__)

DEFAULT_RELEASE = "0.19.2"
DEFAULT_CHECKOUT = "megatron-lm"  # relative to the current directory
PYTHON_ENV = "MLA_SEAM_PYTHON"  # interpreter for adapter_summary (default: one with torch)


def default_tree(mode: str) -> Path:
    """``./megatron-lm``: reused if it holds DEFAULT_RELEASE, materialized by apply if absent."""
    dest = Path.cwd() / DEFAULT_CHECKOUT
    if dest.exists():
        version = MegatronTree.resolve(dest).version
        if version != DEFAULT_RELEASE:
            raise UsageError(
                f"./{DEFAULT_CHECKOUT} holds megatron-core {version}, not the default "
                f"{DEFAULT_RELEASE}",
                f"pass the tree explicitly (mla-seam apply ./{DEFAULT_CHECKOUT}), or move it away "
                "to let apply materialize the default release",
            )
        return dest
    if mode != "apply":
        raise UsageError(
            f"no MEGATRON_DIR given and ./{DEFAULT_CHECKOUT} does not exist",
            f"pass the tree to work on, or run `mla-seam apply` to create ./{DEFAULT_CHECKOUT}",
        )
    try:
        from mla_seam import upstream  # pylint: disable=import-outside-toplevel
    except ImportError as exc:
        raise UpstreamError(
            f"cannot materialize releases here: {exc}", "pass MEGATRON_DIR"
        ) from None
    log.info(
        "mla-seam: materializing megatron-core %s into ./%s", DEFAULT_RELEASE, DEFAULT_CHECKOUT
    )
    return Path(upstream.get(DEFAULT_RELEASE, into=dest))


def _summary_python() -> str:
    """``$MLA_SEAM_PYTHON``, else the first of this interpreter and ``python3`` on PATH that can
    import torch (the adapter needs it), else this interpreter (which then reports why)."""
    override = os.environ.get(PYTHON_ENV)
    if override:
        return override
    candidates = [sys.executable] + [p for p in [shutil.which("python3")] if p]
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"
    for python in candidates:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if (
                subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode
                == 0
            ):
                return python
    return sys.executable


#: What the main job prints: the adapter's one-line summary for DeepSeek-V2-Lite attention (YaRN,
#: q_lora_rank=None), with the backend decided on this machine. Runs in the tree's interpreter.
_SUMMARY_PROBE = """\
from megatron.core.transformer import mla_adapter
from megatron.core.transformer.transformer_config import MLATransformerConfig

config = MLATransformerConfig(
    num_layers=1, hidden_size=2048, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
    qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, rope_type="yarn",
    rotary_scaling_factor=40.0, mscale=0.707, mscale_all_dim=0.707, qk_layernorm=True,
)
mla_adapter.resolve_attention_backend(config, "te" if mla_adapter.HAVE_TE else "local")
print(mla_adapter.describe(config))
"""


def adapter_summary(tree: Union[MegatronTree, os.PathLike]) -> str:
    """The adapter's summary line for DeepSeek-V2-Lite attention, computed in a subprocess.

    The interpreter comes from :func:`_summary_python`; the tree goes first on PYTHONPATH. A
    failed import yields the reason instead of an exception.
    """
    root = tree.root if isinstance(tree, MegatronTree) else Path(tree)
    python = _summary_python()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    code = _SUMMARY_PROBE
    try:
        proc = subprocess.run(
            [python, "-c", code],
            cwd=str(root),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"adapter summary unavailable: {exc}"
    if proc.returncode == 0:
        return proc.stdout.strip()
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    reason = lines[-1] if lines else f"exit {proc.returncode}"
    return (
        f"adapter summary unavailable ({python}): {reason} "
        f"(set {PYTHON_ENV} to a python that has torch and the Megatron dependencies)"
    )
