"""results/README.md opens with a generated index that agrees with every verdict.json.

The committed block must be what ``mla-seam suite --index`` writes now; each row's GPU verdict
must be its folder's ``verdict.json``; each committed ``verdict.json`` must be what the suite's
attribution derives again from its folder (the multi-GPU run beside it included).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from mla_seam import cli, results_index
from mla_seam.releases import MOVING_TARGETS
from mla_seam.suite import attribution
from mla_seam.suite.runner import folder_verdict

RESULTS = Path(__file__).resolve().parents[1] / "results"
VERDICTS = sorted(RESULTS.glob("*/*/verdict.json"))
ROW = re.compile(
    r"^\| (?P<target>[^ |]+) \| (?P<answer>[^|]+) \| (?P<since>[^|]+) \| (?P<gpu>[^|]+) \|"
)


def _block(text: str) -> str:
    start, end = text.index(results_index.BEGIN), text.index(results_index.END)
    return text[start : end + len(results_index.END)] + "\n"


def _rows(text: str) -> dict:
    found = {}
    for line in _block(text).splitlines():
        match = ROW.match(line)
        if match and match["target"] not in ("target", "---"):
            found[match["target"]] = {k: v.strip() for k, v in match.groupdict().items()}
    return found


def test_committed_index_is_current():
    readme = (RESULTS / "README.md").read_text(encoding="utf-8")
    assert (
        readme.startswith("# results/") and readme.index(results_index.BEGIN) < 200
    ), "results/README.md must open with the index"
    assert _block(readme) == results_index.render(
        RESULTS
    ), "results/README.md's index is stale: run `mla-seam suite --index results` and commit it"


def test_every_target_has_a_row_and_every_row_its_verdict():
    readme = (RESULTS / "README.md").read_text(encoding="utf-8")
    rows = _rows(readme)
    drift = json.loads((RESULTS / "drift" / "drift.json").read_text(encoding="utf-8"))
    assert list(rows) == [e["tag"] for e in drift["tags"]] + [
        t for t in MOVING_TARGETS if t not in {e["tag"] for e in drift["tags"]}
    ]
    assert VERDICTS, "no committed verdict.json: nothing to index"
    for path in VERDICTS:
        doc = attribution.load(path)
        tag = path.parent.parent.name
        rel = path.relative_to(RESULTS).as_posix()
        assert f"[{doc['verdict']}]({rel})" in rows[tag]["gpu"], (tag, rows[tag])
        entry = next((e for e in drift["tags"] if e["tag"] == tag), None)
        assert entry is not None or tag in MOVING_TARGETS, f"{tag} is in no drift row"
        answer = results_index.answer(entry and entry["verdict"], doc["verdict"])
        assert rows[tag]["answer"] == answer
        if entry is not None:  # the drift report read the same verdict (else: stale, said so)
            assert entry["gpu"]["verdict"] == doc["verdict"], tag
    for target in MOVING_TARGETS:
        if not any((RESULTS / target).glob("*/verdict.json")):
            assert rows[target]["gpu"] == "no GPU verdict yet"
    assert "stale" not in _block(readme)


@pytest.mark.parametrize("path", VERDICTS, ids=lambda p: p.parent.parent.name)
def test_committed_verdicts_rederive_from_their_folder(path):
    """``--reattribute`` would write the committed verdict.json byte for byte."""
    results = json.loads((path.parent / "results.json").read_text(encoding="utf-8"))
    derived = folder_verdict(results, path.parent)
    attribution.validate(derived)
    text = json.dumps(derived, indent=2, sort_keys=True, default=str) + "\n"
    assert text == path.read_text(encoding="utf-8"), (
        f"{path} is not what this mla-seam derives: run mla-seam suite --reattribute "
        f"{path.parent.relative_to(RESULTS.parent)}"
    )


def test_since_is_the_first_run_of_the_unbroken_answer(tmp_path):
    results = tmp_path / "results"
    (results / "drift").mkdir(parents=True)

    def line(stamp, verdict, gpu):
        return {
            "history_version": 1, "timestamp": stamp, "tool": "t", "range": "r", "cards": [],
            "summary": {"tags": 1, "supported": 1, "needs_work": 0},
            "tags": {"core_v0.19.2": {"verdict": verdict, "gpu": gpu, "classes": {}}},
        }  # fmt: skip

    history = [
        line("2026-11-01T00:00:00+00:00", "supported", "pass"),
        line("2026-11-02T00:00:00+00:00", "needs_work", "upstream_changed"),
        line("2026-11-03T00:00:00+00:00", "supported", "pass"),
        line("2026-11-04T00:00:00+00:00", "supported", "pass"),
    ]
    (results / "drift" / "history.jsonl").write_text(
        "".join(json.dumps(h) + "\n" for h in history), encoding="utf-8"
    )
    report = {
        "run": {"timestamp": "2026-11-04T00:00:00+00:00"},
        "tags": [{"tag": "core_v0.19.2", "verdict": "supported", "series": "core_v0.19",
                  "reasons": [], "gpu": None}],
    }  # fmt: skip
    (results / "drift" / "drift.json").write_text(json.dumps(report), encoding="utf-8")
    (results / "README.md").write_text("# results/\n\nThe schema.\n", encoding="utf-8")
    rows = {r.target: r for r in results_index.rows(results)}
    # no verdict.json in the folder: the answer is CPU-only, which no history line gave
    assert rows["core_v0.19.2"].answer == results_index.CPU_ONLY
    assert rows["core_v0.19.2"].since is None
    assert rows["main"].answer == results_index.NONE_YET and rows["main"].gpu is None
    assert results_index._since(history, "core_v0.19.2", results_index.YES) == (
        "2026-11-03T00:00:00+00:00"
    )
    assert results_index._since(history, "core_v0.19.2", results_index.NO) is None


def test_index_verb_writes_the_block_once_and_keeps_the_rest(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(RESULTS / "drift", results / "drift")
    for path in VERDICTS:
        shutil.copytree(path.parent, results / path.parent.relative_to(RESULTS))
    (results / "README.md").write_text("# results/\n\n## Schema\n\nfields\n", encoding="utf-8")
    assert cli.main(["suite", "--index", str(results)]) == 0
    assert capsys.readouterr().out.strip() == str(results / "README.md")
    first = (results / "README.md").read_text(encoding="utf-8")
    assert first.startswith("# results/\n\n" + results_index.BEGIN)
    assert first.endswith("## Schema\n\nfields\n") and first.count(results_index.BEGIN) == 1
    assert cli.main(["suite", "--index", str(results)]) == 0  # in place, not twice
    assert (results / "README.md").read_text(encoding="utf-8") == first
    # a verdict.json the drift report read otherwise: the row says the report is stale
    path = next(results.glob("core_v0.19.2/*/verdict.json"))
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["verdict"] = "incomplete"
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert cli.main(["suite", "--index", str(results)]) == 0
    row = _rows((results / "README.md").read_text(encoding="utf-8"))["core_v0.19.2"]
    assert row["answer"] == results_index.UNDECIDED and "[incomplete](" in row["gpu"]
    assert "the drift report is stale" in (results / "README.md").read_text(encoding="utf-8")


def test_index_without_a_drift_report_says_what_to_give(tmp_path, caplog):
    assert cli.main(["suite", "--index", str(tmp_path)]) == 2
    assert "cannot read the drift report" in caplog.text and "drift/drift.json" in caplog.text
    assert "give the results folder" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "README.md").exists()
