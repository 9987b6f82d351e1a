"""Golden values: Megatron's golden-values JSON, exact within a tag, reported across tags.

One file per (tag, card, TE version) and tree role: ``golden_values_<card>_te<TE>.json`` for the
patched tree, ``golden_values_<card>_te<TE>.vanilla.json`` for the vanilla one. Within a tag the
check is exact (bit for bit): an existing file is the reference; a mismatch fails the run and is
written beside it as ``*.observed.json``; ``--update-goldens`` replaces it. The base role (the
patched tree of the base release) is compared with the base tag's own committed file and never
writes. Across tags the differences are reported, never asserted.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

#: Golden-values metrics, named as Megatron's functional tests name theirs.
GOLDEN_METRICS = ("lm loss", "grad norm")


def golden_document(
    metrics: Mapping[str, Sequence[float]], start_step: int = 1, step_interval: int = 1
) -> Dict[str, Dict[str, Any]]:
    """Megatron's golden-values JSON: ``{metric: {start_step, end_step, step_interval, values}}``.

    Args:
        metrics: Per metric, one value per recorded step.
        start_step: Step of the first value (Megatron counts from 1).
        step_interval: Steps between values.

    Returns:
        The document; ``values`` maps the step (a string, as in Megatron's files) to the value.
    """
    doc: Dict[str, Dict[str, Any]] = {}
    for name, values in metrics.items():
        values = [float(v) for v in values]
        steps = [start_step + i * step_interval for i in range(len(values))]
        doc[name] = {
            "start_step": start_step,
            "end_step": steps[-1] if steps else start_step,
            "step_interval": step_interval,
            "values": {str(s): v for s, v in zip(steps, values)},
        }
    return doc


def validate_golden(doc: Any) -> None:
    """Raise ``ValueError`` unless ``doc`` follows the golden-values schema."""
    if not isinstance(doc, dict) or not doc:
        raise ValueError("golden values: expected a non-empty object of metrics")
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            raise ValueError(f"golden values: {name!r} is not an object")
        for key in ("start_step", "end_step", "step_interval", "values"):
            if key not in entry:
                raise ValueError(f"golden values: {name!r} lacks {key!r}")
        steps = sorted(int(s) for s in entry["values"])
        expected = list(range(entry["start_step"], entry["end_step"] + 1, entry["step_interval"]))
        if steps != expected:
            raise ValueError(
                f"golden values: {name!r} steps {steps[:5]}... do not match start/end/interval"
            )
        for step, value in entry["values"].items():
            if not isinstance(value, (int, float)) and value != "nan":
                raise ValueError(f"golden values: {name!r} step {step} is not a number")


def read_golden(path: os.PathLike) -> Dict[str, Dict[str, Any]]:
    """Load and validate a golden-values file."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    validate_golden(doc)
    return doc


def write_golden(path: os.PathLike, doc: Mapping[str, Any]) -> None:
    """Write a golden-values file (validated; metrics by name, steps in numeric order)."""
    validate_golden(doc)
    ordered = {}
    for name in sorted(doc):
        entry = doc[name]
        ordered[name] = {
            "start_step": entry["start_step"],
            "end_step": entry["end_step"],
            "step_interval": entry["step_interval"],
            "values": {k: entry["values"][k] for k in sorted(entry["values"], key=int)},
        }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(ordered, indent=2) + "\n", encoding="utf-8")


def _steps(entry: Mapping[str, Any]) -> Dict[int, float]:
    return {int(k): float(v) for k, v in entry["values"].items()}


def compare_golden_exact(observed: Mapping[str, Any], reference: Mapping[str, Any]) -> List[str]:
    """Every difference between two golden documents, bit for bit (empty list: identical)."""
    problems = []
    for name in sorted(set(observed) | set(reference)):
        if name not in observed or name not in reference:
            problems.append(f"{name}: only in {'observed' if name in observed else 'reference'}")
            continue
        got, want = _steps(observed[name]), _steps(reference[name])
        if sorted(got) != sorted(want):
            problems.append(f"{name}: steps differ ({len(got)} observed vs {len(want)} expected)")
            continue
        for step in sorted(want):
            a, b = got[step], want[step]
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                problems.append(f"{name} step {step}: {a!r} != {b!r}")
    return problems


def compare_golden_cross(
    observed: Mapping[str, Any], other: Mapping[str, Any]
) -> Dict[str, Dict[str, Any]]:
    """Per metric: how far ``observed`` is from ``other`` (another tag) on the common steps."""
    summary: Dict[str, Dict[str, Any]] = {}
    for name in sorted(set(observed) & set(other)):
        got, want = _steps(observed[name]), _steps(other[name])
        common = sorted(set(got) & set(want))
        diffs = [(s, got[s] - want[s]) for s in common]
        first = next((s for s, d in diffs if d != 0), None)
        max_abs = max((abs(d) for _, d in diffs), default=0.0)
        max_rel = max((abs(d) / max(abs(want[s]), 1e-30) for s, d in diffs), default=0.0)
        summary[name] = {
            "steps_compared": len(common),
            "identical": first is None,
            "first_different_step": first,
            "max_abs_diff": max_abs,
            "max_rel_diff": max_rel,
            "last_step_values": [got[common[-1]], want[common[-1]]] if common else None,
        }
    return summary


def golden_filename(slug: str, te_version: Optional[str], role: str = "patched") -> str:
    """``golden_values_<card>_te<TE>[.<role>].json`` (``te-none`` without Transformer Engine)."""
    te = re.sub(r"[^0-9A-Za-z.+-]", "_", te_version) if te_version else "-none"
    suffix = "" if role == "patched" else f".{role}"
    return f"golden_values_{slug}_te{te}{suffix}.json"


def golden_env(observed: Path, reference: Optional[Path]) -> Dict[str, str]:
    """Environment of a golden phase: where to write, what to compare with, determinism."""
    env = {
        "MLA_SEAM_GOLDEN_OUT": str(observed),
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
    }
    if reference is not None and reference.is_file():
        env["MLA_SEAM_GOLDEN_REF"] = str(reference)
    return env


def golden_phase(
    *,
    role: str,
    out_dir: Path,
    reference_dir: Path,
    results_root: Path,
    tag: str,
    slug: str,
    te_version: Optional[str],
    work: Path,
    update: bool,
) -> Tuple[Dict[str, str], Callable[[], Dict[str, Any]]]:
    """Environment for one role's golden phase and a function that settles its file after it.

    Args:
        role: ``patched``, ``vanilla`` or ``base``.
        out_dir: ``<results>/<tag>/<card>`` of this run.
        reference_dir: Where the committed reference of this role lives (``out_dir``; for the
            base role the base tag's folder, which is read, never written).
        results_root: ``<results>``, searched for other tags' files (cross-tag report).
        tag: This run's tag (left out of the cross-tag report).
        slug: Card slug.
        te_version: Transformer Engine version (part of the file name).
        work: Scratch folder the test writes into.
        update: ``--update-goldens``: replace the reference instead of comparing.

    Returns:
        ``(env, settle)``; ``settle()`` returns the role's ``golden`` entry of results.json:
        ``file``, ``status``, ``problems``, ``observed`` (the document), ``cross_tag``.
    """
    name = golden_filename(slug, te_version, "vanilla" if role == "vanilla" else "patched")
    committed = reference_dir / name
    observed = work / f"{role}-{name}"
    writes = role != "base"
    env = golden_env(observed, None if update and writes else committed)

    def settle() -> Dict[str, Any]:
        info: Dict[str, Any] = {"file": name, "reference": str(committed)}
        if not observed.is_file():
            info["status"] = "not recorded"
            return info
        doc = read_golden(observed)
        info["observed"] = doc
        if committed.is_file() and not (update and writes):
            problems = compare_golden_exact(doc, read_golden(committed))
            info["problems"] = problems
            info["status"] = "mismatch" if problems else "matched"
            if problems and writes:
                write_golden(committed.with_suffix(".observed.json"), doc)
        elif writes:
            info["status"] = "updated" if committed.is_file() else "recorded"
            write_golden(committed, doc)
        else:
            info["status"] = "observed"  # the base tag has no committed file for this card/TE
        if role == "patched":
            info["cross_tag"] = cross_tag(doc, results_root, slug, name, tag)
        return info

    return env, settle


def cross_tag(
    doc: Mapping[str, Any], results_root: Path, slug: str, name: str, tag: str
) -> Dict[str, Any]:
    """``compare_golden_cross`` of ``doc`` against every other tag's file of this card and TE."""
    cross: Dict[str, Any] = {}
    for path in sorted(results_root.glob(f"*/{slug}/{name}")):
        other_tag = path.parent.parent.name
        if other_tag == tag:
            continue
        try:
            cross[other_tag] = compare_golden_cross(doc, read_golden(path))
        except (OSError, ValueError) as exc:
            cross[other_tag] = {"error": {"message": str(exc)}}
    return cross
