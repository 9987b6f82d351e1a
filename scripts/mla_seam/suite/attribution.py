"""Three-tree attribution: who moved, upstream or the overlay, and the GPU verdict of a tag.

A suite run measures the same things on up to three trees (:mod:`mla_seam.suite.trees`):
vanilla and patched of the release, and patched of the base release. Every measured quantity
(a test's outcome, a golden curve, a benchmark time, a kernel or sync count, a backend decision)
becomes a :class:`Finding` whose attribution compares the three:

* ``overlay broke``: patched is worse than vanilla of the same release (fails where vanilla
  passes, slower beyond the noise, more launches or syncs), or patched moved off the base where
  vanilla did not;
* ``absorbed``: vanilla regressed against the base, patched did not (the adapter took it);
* ``upstream changed``: vanilla moved against the base and patched moved with it;
* ``unchanged``: nothing moved beyond the tolerance (a test failing alike on all three trees is
  a standing failure: unchanged, not regressed);
* ``unattributed``: patched moved, or fails, and the tree that would say why was not measured.

A finding is ``regressed`` when the shipped tree (patched) is worse than the base, or fails
where the base was not seen to fail. The verdict of the tag: ``overlay_broke`` if any finding
says so, else ``upstream_changed`` if an attributed finding regressed (upstream moved and the
adapter does not absorb it yet), else ``incomplete`` if an unattributed finding regressed, a
phase of the patched tree broke down or no vanilla tree ran, else ``pass``.

The verdict is the results folder's, not one process's: the multi-GPU run of the same folder
(``multigpu/results.json``, ``mla-seam suite --nproc N``) adds one finding per case, its base
read from the base release's multi-GPU run (:func:`multigpu_findings`), so a case failing on
the patched tree decides the tag as a failing single-GPU test would. The document
(:func:`build_verdict`) is ``verdict.json`` of the folder, schema
``schemas/gpu_verdict.schema.json``; ``mla-seam drift --gpu-results`` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from mla_seam.suite.benchmarks import KERNEL_KEY, THD_SWEEP_KEY, role_of
from mla_seam.suite.goldens import compare_golden_cross
from mla_seam.suite.phases import failure_messages

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "gpu_verdict.schema.json"
CATEGORIES = ("correctness", "golden", "performance", "backend", "kernels")
ATTRIBUTIONS = ("upstream changed", "overlay broke", "absorbed", "unchanged", "unattributed")
VERDICTS = ("pass", "upstream_changed", "overlay_broke", "incomplete")
#: Time ratios within this factor are noise. Times are compared by their fastest sample
#: (:func:`fastest_ms`: interference only adds time), and identical code still spreads: the base
#: tree (patched 0.16.1) timed in seven processes of one run on four H200s, 2026-11-29, gave
#: fastest samples up to 1.54x apart (medians up to 2.21x). Smaller moves are told by the kernel
#: and sync counts, which do not drift with the machine's load.
PERF_TOLERANCE = 1.6
#: Kernel launches per step: a few launches of slack (profiler windows); syncs: none.
KERNEL_TOLERANCE = 1.05

SAME, WORSE, BETTER, MOVED = "same", "worse", "better", "moved"
Compare = Callable[[Any, Any], Optional[str]]


@dataclasses.dataclass
class Finding:
    """One measured quantity on the three trees, and who moved it."""

    category: str
    subject: str
    metric: str
    values: Dict[str, Any]
    attribution: str
    regressed: bool
    cause: str

    def to_json(self) -> Dict[str, Any]:
        """The verdict schema's ``findings[]`` entry."""
        return dataclasses.asdict(self)


# --- comparators: (value, reference) -> same | worse | better | moved | None (not comparable) ---


def lower_is_better(tolerance: float) -> Compare:
    """Times and counts: ``worse`` when ``value / reference`` exceeds ``tolerance``."""

    def compare(value: Any, reference: Any) -> Optional[str]:
        if not _number(value) or not _number(reference):
            return None
        if reference == 0:
            return SAME if value == 0 else WORSE
        ratio = float(value) / float(reference)
        if ratio > tolerance:
            return WORSE
        if ratio < 1.0 / tolerance:
            return BETTER
        return SAME

    return compare


def good_or_bad(value: Any, reference: Any) -> Optional[str]:
    """Pass/fail states (``True`` good, ``False`` bad, ``None`` not measured)."""
    if value is None or reference is None:
        return None
    if value == reference:
        return SAME
    return BETTER if value else WORSE


def identical(value: Any, reference: Any) -> Optional[str]:
    """Non-directional: equal or ``moved`` (golden curves, backend decisions)."""
    if value is None or reference is None:
        return None
    return SAME if value == reference else MOVED


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- attribution ------------------------------------------------------------------------------


def attribute(
    values: Mapping[str, Any], compare: Compare, bad: Optional[Callable[[Any], bool]] = None
) -> Tuple[str, bool]:
    """``(attribution, regressed)`` of one quantity measured on the roles in ``values``.

    Args:
        values: ``{role: value}``; a missing role or ``None`` means not measured.
        compare: A comparator of this module.
        bad: For pass/fail quantities: whether a value is a failure on its own (a patched tree
            that fails regressed even with nothing to compare it with).
    """
    v, p, b = values.get("vanilla"), values.get("patched"), values.get("base")
    pv, vb, pb = compare(p, v), compare(v, b), compare(p, b)
    failing = bool(bad and p is not None and bad(p))
    if MOVED in (pv, vb, pb):  # non-directional: only movement against the base counts
        if vb == MOVED:
            return ("upstream changed", True) if pb == MOVED else ("absorbed", False)
        if pb == MOVED:
            return ("overlay broke", True) if vb == SAME else ("unattributed", True)
        return ("unattributed" if b is None else "unchanged"), False
    if pv == WORSE:
        return "overlay broke", True
    if vb == WORSE:
        if pb == WORSE:
            return "upstream changed", True
        return "absorbed", failing
    if vb == BETTER:
        return "upstream changed", pb == WORSE or failing
    if pb == WORSE:
        return ("overlay broke", True) if vb == SAME else ("unattributed", True)
    if pv == BETTER:
        return "absorbed", failing
    if failing:
        if pv == SAME and vb == SAME:  # fails alike on all three: standing, nothing moved
            return "unchanged", False
        # Fails alike on vanilla with no base to say whether that is new, or vanilla unmeasured.
        return "unattributed", True
    return "unchanged", False


def _cause(subject: str, metric: str, values: Mapping[str, Any], unit: str = "") -> str:
    shown = ", ".join(f"{role} {_show(values[role])}{unit}" for role in _ORDER if role in values)
    ratios = []
    base = values.get("base")
    for role in ("vanilla", "patched"):
        if _number(values.get(role)) and _number(base) and base:
            ratios.append(f"{role}/base {values[role] / base:.2f}x")
    return f"{subject} {metric}: {shown}" + (f" ({', '.join(ratios)})" if ratios else "")


_ORDER = ("vanilla", "patched", "base")


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _finding(
    category: str,
    subject: str,
    metric: str,
    values: Dict[str, Any],
    compare: Compare,
    bad: Optional[Callable[[Any], bool]] = None,
    unit: str = "",
) -> Finding:
    attribution, regressed = attribute(values, compare, bad)
    return Finding(
        category,
        subject,
        metric,
        values,
        attribution,
        regressed,
        _cause(subject, metric, values, unit),
    )


# --- what each phase measured -----------------------------------------------------------------

_GOOD_OUTCOMES = {"passed": True, "failed": False, "errors": False}


def test_findings(phases: Iterable[Mapping[str, Any]]) -> List[Finding]:
    """Per test id, its outcome on each role (skips and xfails are not comparison points).

    A failing test's cause carries its failure message per role (the cause of the change).
    """
    outcomes: Dict[Tuple[str, str], Dict[str, Any]] = {}
    messages: Dict[Tuple[str, str], Dict[str, str]] = {}
    for phase in phases:
        name, role = phase.get("phase") or phase["name"], phase.get("role", "patched")
        failed = failure_messages(phase)
        for test, outcome in (phase.get("tests") or {}).items():
            state = _GOOD_OUTCOMES.get(outcome)
            if state is not None:
                outcomes.setdefault((name, test), {})[role] = state
            if failed.get(test):
                messages.setdefault((name, test), {})[role] = failed[test]
    findings = []
    for key, values in sorted(outcomes.items()):
        phase, test = key
        found = _finding("correctness", f"{phase}: {test}", "passed", values, good_or_bad, _failed)
        if found.attribution != "unchanged" or found.regressed:
            found.cause += _messages(messages.get(key, {}))
            findings.append(found)
    return findings


def _messages(by_role: Mapping[str, str]) -> str:
    """`` (vanilla, patched: message)``: failure messages, roles sharing one message joined."""
    grouped: Dict[str, List[str]] = {}
    for role in _ORDER:
        if by_role.get(role):
            grouped.setdefault(by_role[role], []).append(role)
    return "".join(f" ({', '.join(roles)}: {message})" for message, roles in grouped.items())


def _failed(value: Any) -> bool:
    return value is False


def fastest_ms(record: Mapping[str, Any]) -> Optional[float]:
    """A timing record's fastest sample (``ms_all``), else its median (older records)."""
    samples = [t for t in record.get("ms_all") or () if _number(t)]
    if samples:
        return min(samples)
    return record.get("ms_median") if _number(record.get("ms_median")) else None


def _group(
    records: Iterable[Mapping[str, Any]], case: str, key: Sequence[str]
) -> Dict[Tuple[Any, ...], Dict[str, Mapping[str, Any]]]:
    groups: Dict[Tuple[Any, ...], Dict[str, Mapping[str, Any]]] = {}
    for r in records:
        if r.get("case") == case:
            groups.setdefault(tuple(r.get(k) for k in key), {})[role_of(r)] = r
    return groups


def _subject(case: str, key: Sequence[str], values: Sequence[Any]) -> str:
    return case + " " + " ".join(f"{k}={v}" for k, v in zip(key, values) if v is not None)


def record_findings(records: Sequence[Mapping[str, Any]]) -> List[Finding]:
    """Findings from the records: benchmarks, the THD sweep, kernel counts, HF parity."""
    findings: List[Finding] = []
    layer_key = ("spec", "backend", "layout", "dims")
    for key, roles in sorted(_group(records, "bench_layer", layer_key).items(), key=str):
        subject = _subject("bench_layer", layer_key, key)
        ran = {role: r.get("outcome", "ran") == "ran" for role, r in roles.items()}
        findings.append(_finding("backend", subject, "builds and runs", ran, good_or_bad, _failed))
        decided = {role: r.get("decided") for role, r in roles.items() if role != "vanilla"}
        if any(decided.values()):
            findings.append(_finding("backend", subject, "decided", decided, identical))
        ms = {role: fastest_ms(r) for role, r in roles.items() if fastest_ms(r)}
        if ms:
            compare = lower_is_better(PERF_TOLERANCE)
            findings.append(_finding("performance", subject, "ms_fastest", ms, compare, unit=" ms"))
    for key, roles in sorted(_group(records, "bench_thd_sweep", THD_SWEEP_KEY).items(), key=str):
        ms = {role: fastest_ms(r) for role, r in roles.items()}
        findings.append(
            _finding(
                "performance",
                _subject("bench_thd_sweep", THD_SWEEP_KEY, key),
                "ms_fastest",
                ms,
                lower_is_better(PERF_TOLERANCE),
                unit=" ms",
            )
        )
    for key, roles in sorted(_group(records, "kernel_counts", KERNEL_KEY).items(), key=str):
        subject = _subject("kernel_counts", KERNEL_KEY, key)
        for metric, tolerance in (("kernels_per_step", KERNEL_TOLERANCE), ("syncs_per_step", 1.0)):
            values = {role: r.get(metric) for role, r in roles.items()}
            findings.append(
                _finding("kernels", subject, metric, values, lower_is_better(tolerance))
            )
    for key, roles in sorted(_group(records, "golden_fixed", ("spec", "backend")).items(), key=str):
        curves = {role: _curves(r.get("values")) for role, r in roles.items()}
        found = _finding("golden", _subject("golden_fixed", ("spec", "backend"), key),
                         "curves from fixed weights", curves, identical)  # fmt: skip
        found.values = {role: list(c[-1:]) for role, c in curves.items()}
        found.cause = _cause(found.subject, "last value of the curves from fixed weights",
                             found.values)  # fmt: skip
        findings.append(found)
    parity_key = ("spec", "dtype", "q_lora_rank", "input_rms")
    for key, roles in sorted(_group(records, "parity_hf", parity_key).items(), key=str):
        passed = {role: r.get("passed") for role, r in roles.items()}
        found = _finding(
            "correctness",
            _subject("parity_hf", parity_key, key),
            "passed",
            passed,
            good_or_bad,
            _failed,
        )
        errors = {role: r.get("rel_err") for role, r in roles.items()}
        found.cause += " (rel_err " + ", ".join(f"{k} {_show(v)}" for k, v in errors.items()) + ")"
        findings.append(found)
    return findings


def _curves(values: Any) -> Tuple[float, ...]:
    """A ``{metric: [per step]}`` record as one comparable tuple (metrics in name order)."""
    if not isinstance(values, Mapping):
        return ()
    return tuple(float(v) for metric in sorted(values) for v in values[metric] or ())


def explain_golden(findings: List[Finding]) -> None:
    """Native golden curves off the base's while the fixed-weights curves match: initialization.

    The same weights train identically, so what the model computes has not moved; the release
    initializes it differently (which modules fork the model-parallel RNG, the draw order). The
    adapter does not initialize anything, so that is upstream's, and not a regression.
    """
    fixed = [f for f in findings if f.subject.startswith("golden_fixed")]
    same = bool(fixed) and all(
        "patched" in f.values and "base" in f.values and f.attribution in ("unchanged", "absorbed")
        for f in fixed
    )
    if not same:
        return
    for found in findings:
        if found.subject == "golden values" and found.attribution != "unchanged":
            found.attribution, found.regressed = "upstream changed", False
            found.cause += (
                "; from fixed weights patched trains exactly as the base (golden_fixed): "
                "the release initializes the model differently"
            )


def golden_findings(golden: Mapping[str, Mapping[str, Any]]) -> List[Finding]:
    """Per golden metric: is each role's curve the base's (bit for bit)?"""
    observed = {
        role: entry.get("observed")
        for role, entry in golden.items()
        if isinstance(entry, Mapping) and entry.get("observed")
    }
    metrics = sorted({m for doc in observed.values() for m in doc})
    findings = []
    for metric in metrics:
        curves = {
            role: tuple(sorted((int(s), float(v)) for s, v in doc[metric]["values"].items()))
            for role, doc in observed.items()
            if metric in doc
        }
        found = _finding("golden", "golden values", metric, curves, identical)
        found.values = {role: [v for _, v in curve][-1:] for role, curve in curves.items()}
        if "base" in observed:
            diffs = []
            for role in ("vanilla", "patched"):
                if role in observed and metric in observed[role]:
                    cross = compare_golden_cross(observed[role], observed["base"]).get(metric, {})
                    diffs.append(f"{role} vs base: max rel diff {_show(cross.get('max_rel_diff'))}")
            found.cause = f"golden {metric}: " + "; ".join(diffs)
        findings.append(found)
    return findings


def _case_ok(side: Any) -> Optional[bool]:
    """A multi-GPU case's outcome on one tree: ``ok``, or ``None`` when it was not measured."""
    if not isinstance(side, Mapping) or side.get("outcome") in (None, "skipped", "not_run"):
        return None
    return bool(side.get("ok"))


def multigpu_findings(
    multigpu: Optional[Mapping[str, Any]], base_multigpu: Optional[Mapping[str, Any]] = None
) -> List[Finding]:
    """Per multi-GPU case (``mla-seam suite --nproc N``), its outcome on each tree.

    Args:
        multigpu: The folder's ``multigpu/results.json``: every case on the patched tree and on
            the vanilla tree of the release.
        base_multigpu: The base release's ``multigpu/results.json``; its patched tree is the base
            (``None``: the base was not run on several GPUs).
    """
    if not multigpu:
        return []
    base = {c.get("name"): c for c in (base_multigpu or {}).get("cases") or ()}
    size = (multigpu.get("parallel") or {}).get("world_size")
    findings = []
    for case in multigpu.get("cases") or ():
        values = {
            "vanilla": _case_ok(case.get("vanilla")),
            "patched": _case_ok(case.get("patched")),
            "base": _case_ok((base.get(case.get("name")) or {}).get("patched")),
        }
        values = {role: value for role, value in values.items() if value is not None}
        subject = f"{size} GPUs: {case.get('name')}"
        found = _finding("correctness", subject, "passed", values, good_or_bad, _failed)
        if found.attribution != "unchanged" or found.regressed:
            found.cause += _messages(
                {role: _case_failure(case.get(role)) for role in ("vanilla", "patched")}
            )
            findings.append(found)
    return findings


def _case_failure(side: Any) -> str:
    if _case_ok(side) in (None, True):
        return ""
    return ", ".join(side.get("failed_checks") or ()) or str(side.get("message") or "")


# --- the verdict document ---------------------------------------------------------------------


def base_is_patched(results: Mapping[str, Any]) -> bool:
    """Whether the run's release is its own base (its base tree is its patched tree)."""
    trees = results.get("trees") or {}
    base, patched = trees.get("base") or {}, trees.get("patched") or {}
    return bool(base.get("path")) and base.get("path") == patched.get("path")


def _measured(results: Mapping[str, Any]) -> Mapping[str, Any]:
    """``results`` as attribution reads them: for a release that is its own base, with the
    patched tree's measurements also read as the base's.

    The base release's run measures its patched tree once; that tree is the base, so a failure
    vanilla shares with it is a standing one and vanilla moving off it is upstream's.
    """
    if not base_is_patched(results):
        return results
    phases = [p for p in results.get("phases") or [] if p.get("role") != "base"]
    copied = [
        dict(p, role="base", phase=p.get("phase") or p["name"], name=f"{p['name']}@base")
        for p in phases
        if p.get("role", "patched") == "patched"
    ]
    records = [r for r in results.get("records") or [] if role_of(r) != "base"]
    copied_records = [dict(r, role="base") for r in records if role_of(r) == "patched"]
    golden = {k: v for k, v in (results.get("golden") or {}).items() if k != "base"}
    if "patched" in golden:
        golden["base"] = golden["patched"]
    return dict(results, phases=phases + copied, records=records + copied_records, golden=golden)


def findings_of(results: Mapping[str, Any]) -> List[Finding]:
    """Every finding of a results document (schema 2)."""
    return _findings(_measured(results))


def _findings(results: Mapping[str, Any]) -> List[Finding]:
    findings = (
        test_findings(results.get("phases") or [])
        + golden_findings(results.get("golden") or {})
        + record_findings(results.get("records") or [])
    )
    explain_golden(findings)
    return findings


def verdict_of(findings: Sequence[Finding], results: Mapping[str, Any]) -> Tuple[str, List[str]]:
    """``(verdict, reasons)`` of a tag (see the module doc)."""
    broke = [f for f in findings if f.attribution == "overlay broke"]
    if broke:
        return "overlay_broke", [f.cause for f in broke]
    regressed = [f for f in findings if f.regressed]
    if any(f.attribution != "unattributed" for f in regressed):
        return "upstream_changed", [f"{f.attribution}: {f.cause}" for f in regressed]
    # Regressions no tree can explain (a failure vanilla shares, with no base measured) leave
    # the tag undecided rather than blamed on either side.
    reasons = [f"unattributed: {f.cause}" for f in regressed]
    for phase in results.get("phases") or []:
        if phase.get("role") == "patched" and broke_down(phase):
            why = "timed out" if phase.get("timed_out") else f"exit {phase.get('exit_code')}"
            reasons.append(f"phase {phase['name']} of the patched tree broke down ({why})")
    ran = {p.get("role") for p in results.get("phases") or [] if p.get("skipped_reason") is None}
    if "vanilla" not in ran:
        reasons.append("no vanilla tree ran: upstream and overlay cannot be told apart")
    if "patched" not in ran:
        reasons.append("the patched tree did not run")
    return ("incomplete", reasons) if reasons else ("pass", [])


def broke_down(phase: Mapping[str, Any]) -> bool:
    """A unit that did not measure what it should: timed out, or pytest ended other than by
    its tests failing (exit 1 with failed tests on record is a test outcome, judged per test).
    """
    if phase.get("ok") or phase.get("skipped_reason") is not None:
        return False
    if phase.get("timed_out") or phase.get("exit_code") != 1:
        return True
    return not any(o in ("failed", "errors") for o in (phase.get("tests") or {}).values())


def build_verdict(
    results: Mapping[str, Any],
    multigpu: Optional[Mapping[str, Any]] = None,
    base_multigpu: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The GPU verdict document of one results folder (``verdict.json``).

    Args:
        results: The single-GPU suite run (``results.json``).
        multigpu: The same folder's multi-GPU run (``multigpu/results.json``), if any: its cases
            are findings of the tag like the single-GPU tests (:func:`multigpu_findings`).
        base_multigpu: The base release's multi-GPU run (the base role of those cases); for a
            release that is its own base, its own run is read as the base's.
    """
    measured = _measured(results)
    if multigpu and base_multigpu is None and base_is_patched(results):
        base_multigpu = multigpu
    findings = _findings(measured) + multigpu_findings(multigpu, base_multigpu)
    verdict, reasons = verdict_of(findings, results)
    env = results.get("environment") or {}
    counts = {a: 0 for a in ATTRIBUTIONS}
    for f in findings:
        counts[f.attribution] += 1
    trees = {}
    for role, tree in (results.get("trees") or {}).items():
        ran = any(
            p.get("role") == role and p.get("skipped_reason") is None
            for p in measured.get("phases") or []
        )
        trees[role] = {"tag": tree["tag"], "version": tree["version"], "ran": ran}
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": "mla-seam-gpu-verdict",
        "tag": results["tag"],
        "version": results["trees"]["patched"]["version"],
        "timestamp": results["started"],
        "mla_seam_version": results.get("mla_seam_version"),
        "card": env.get("card"),
        "card_slug": env.get("card_slug"),
        "versions": {
            "torch": env.get("torch"),
            "cuda": env.get("cuda"),
            "cudnn": env.get("cudnn"),
            "transformer_engine": env.get("transformer_engine"),
            "transformers": env.get("transformers"),
            "python": env.get("python"),
        },
        "parallel": results.get("parallel"),
        "trees": trees,
        "phases": [
            {
                "name": p["name"],
                "role": p.get("role", "patched"),
                "ok": p["ok"],
                "counts": p["counts"],
                "seconds": p["seconds"],
                "skipped_reason": p.get("skipped_reason"),
            }
            for p in results.get("phases") or []
        ],
        "tolerances": {"performance": PERF_TOLERANCE, "kernels": KERNEL_TOLERANCE},
        "counts": counts,
        "findings": [f.to_json() for f in findings],
        "verdict": verdict,
        "reasons": reasons,
    }
    if multigpu:
        doc["multigpu"] = {
            "world_size": (multigpu.get("parallel") or {}).get("world_size"),
            "started": multigpu.get("started"),
            "base_started": (base_multigpu or {}).get("started"),
        }
    return doc


def validate(doc: Mapping[str, Any]) -> None:
    """Validate a verdict document against its schema (needs ``jsonschema``)."""
    import jsonschema  # pylint: disable=import-outside-toplevel

    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def load(path: Path) -> Dict[str, Any]:
    """Read a ``verdict.json``; ``ValueError`` for another kind or schema version."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("kind") != "mla-seam-gpu-verdict" or doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: not a schema-{SCHEMA_VERSION} mla-seam GPU verdict "
            f"(kind {doc.get('kind')!r}, schema_version {doc.get('schema_version')!r})"
        )
    return doc
