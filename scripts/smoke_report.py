"""Render the GPU smoke records (smoke-<release>.jsonl + env.json) as one Markdown page.

    python3 scripts/smoke_report.py RESULTS_DIR > RESULTS_DIR/README.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List
from xml.etree import ElementTree


def _junit_counts(path: Path) -> str:
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    get = lambda key: int(suite.get(key, 0))  # noqa: E731
    passed = get("tests") - get("failures") - get("errors") - get("skipped")
    return f"{passed} passed, {get('failures') + get('errors')} failed, {get('skipped')} skipped"


def _row(record: Dict) -> str:
    case = record["case"]
    what = " ".join(str(record[k]) for k in ("spec", "backend", "layout") if k in record)
    if case == "thd_vs_bshd":
        detail = (
            f"max rel diff out {record['max_rel_out']:.2e}, grad {record['max_rel_grad']:.2e}"
            + (
                f"; no bshd reference for lengths {record['lengths_without_bshd_backend']}"
                if record.get("lengths_without_bshd_backend")
                else ""
            )
        )
    elif case == "core_thd_vs_bshd":
        detail = f"bit-equal: {record['bit_equal']}, max rel diff {record['max_rel']:.2e}"
    elif "message" in record:
        detail = record["message"].replace("|", "/")
    else:
        detail = f"decided {record.get('decided')}: {record.get('reason', '')}"
    return f"| {case} | {what} | {detail} |"


def render(folder: Path) -> str:
    """The Markdown page for one results folder."""
    env = json.loads((folder / "env.json").read_text())
    lines: List[str] = [
        "# GPU smoke of the overlay",
        "",
        f"Card: {env.get('gpu')} ({env.get('capability')}), torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, Transformer Engine "
        f"{env.get('transformer_engine')}, Python {env.get('python')}.",
        "",
        "Produced by `scripts/gpu_smoke.sh` (tests/gpu/test_smoke.py inside each patched "
        "release). Timings in the records are single cold calls, not benchmarks.",
    ]
    for records in sorted(folder.glob("smoke-*.jsonl")):
        release = records.stem.split("-", 1)[1]
        junit = folder / f"junit-{release}.xml"
        lines += ["", f"## megatron-core {release}", ""]
        if junit.is_file():
            lines += [f"pytest: {_junit_counts(junit)}", ""]
        lines += ["| case | spec / backend / layout | result |", "|---|---|---|"]
        lines += [_row(json.loads(x)) for x in records.read_text().splitlines() if x.strip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(Path(sys.argv[1])))
