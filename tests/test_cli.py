"""The CLI as scripts and CI use it: exit codes per state, --json, -v/-q after the verb, a closed
pipe, an empty path through scripts/apply.sh, and a really full disk (a small tmpfs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Dict

import pytest
import support
from mla_seam import errors
from mla_seam.errors import STATUS_EXIT_CODES, DirtyTreeError, UsageError
from support import LM, MLA, REPO_ROOT, TC, insert_lines, run_cli, snapshot


def _cmd(*args: str) -> list:
    return [sys.executable, "-m", "mla_seam", "apply", *args]


def test_status_exit_code_per_state(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    tree = make_tree("0.16.1")
    codes = {}
    codes["not applied"] = run_cli(seam_env, "--status", str(tree)).returncode
    assert run_cli(seam_env, str(tree)).returncode == 0
    codes["applied"] = run_cli(seam_env, "--status", str(tree)).returncode
    (tree / TC).write_bytes(subprocess.run(
        ["git", "show", f"HEAD:{TC}"], cwd=tree, capture_output=True, check=True
    ).stdout)  # fmt: skip
    codes["partial"] = run_cli(seam_env, "--status", str(tree)).returncode
    insert_lines(tree, [(LM, 3, "# edited after apply")])
    codes["drifted"] = run_cli(seam_env, "--status", str(tree)).returncode
    assert codes == STATUS_EXIT_CODES
    assert len(set(codes.values())) == 4


def test_json_on_status_check_apply_and_errors(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    tree = make_tree("0.16.1")
    check = json.loads(run_cli(seam_env, "--check", "--json", str(tree)).stdout)
    assert check["would"] == "apply" and check["state"] == "not applied"
    applied = run_cli(seam_env, "--json", str(tree))
    report = json.loads(applied.stdout)
    assert report["exit_code"] == 0 and report["state"] == "applied"
    assert sorted(report["changed"]) == sorted(
        [LM, MLA, TC, "megatron/core/transformer/mla_adapter.py"]
    )
    status = json.loads(run_cli(seam_env, "--status", "--json", str(tree)).stdout)
    assert status["state"] == "applied" and status["applied_by"]["method"] == "exact"
    assert {f["path"]: f["kind"] for f in status["files"]} == {LM: "post", MLA: "post", TC: "post"}
    other = make_tree("0.16.1", name="dirty")
    insert_lines(other, [(MLA, 5, "# uncommitted")])
    refused = run_cli(seam_env, "--json", str(other))
    assert refused.returncode == DirtyTreeError.exit_code
    error = json.loads(refused.stdout)["error"]
    assert error["type"] == "DirtyTreeError" and error["exit_code"] == 7 and error["hint"]
    missing = run_cli(seam_env, "--json", str(other / "nope"))
    assert json.loads(missing.stdout)["error"]["exit_code"] == 3


def test_verbosity_after_the_verb(seam_env: Dict[str, str], make_tree: Callable[..., Path]) -> None:
    tree = make_tree("0.16.1")
    quiet = run_cli(seam_env, str(tree), "-q")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = run_cli(seam_env, "--status", "-v", str(tree))
    assert loud.returncode == 0 and loud.stdout.startswith("applied")
    up = subprocess.run(
        [sys.executable, "-m", "mla_seam", "upstream", "list", "-q"],
        env=seam_env, capture_output=True, text=True,
    )  # fmt: skip
    assert up.returncode == 0 and "cache:" not in up.stderr


def test_closed_pipe_after_a_successful_apply(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    tree = make_tree("0.16.1")
    proc = subprocess.Popen(
        _cmd(str(tree)), env=seam_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader is gone before the first line (`| head -0`)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert run_cli(seam_env, "--status", str(tree)).stdout.startswith("applied")
    head = subprocess.run(
        ["sh", "-c", '"$@" | head -1', "sh", *_cmd("--status", str(tree))],
        env=seam_env, capture_output=True, text=True,
    )  # fmt: skip
    assert head.stdout == "applied\n" and "Traceback" not in head.stderr


def test_apply_sh_refuses_an_empty_path(seam_env: Dict[str, str], tmp_path: Path) -> None:
    if not (REPO_ROOT / ".venv" / "bin" / "mla-seam").exists():
        pytest.skip("no .venv in the repository (scripts/apply.sh would create it: slow)")
    for arg in ("", "   "):
        done = subprocess.run(
            ["sh", str(REPO_ROOT / "scripts" / "apply.sh"), arg],
            env=seam_env, cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == UsageError.exit_code, done.stderr
        assert "MEGATRON_DIR is empty" in done.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be materialized for an empty path"


def test_own_committed_adapter_survives_revert(
    seam_env: Dict[str, str], make_tree: Callable[..., Path], bundle: Path
) -> None:
    """A fork that committed its own copy of the adapter before applying keeps it on revert."""
    tree = make_tree("0.16.1")
    target = tree / "megatron/core/transformer/mla_adapter.py"
    shutil.copy2(bundle / "overlay" / "megatron/core/transformer/mla_adapter.py", target)
    support.commit(tree, "our own copy of the adapter")
    before = snapshot(tree)
    assert run_cli(seam_env, str(tree)).returncode == 0
    undo = run_cli(seam_env, "--revert", str(tree))
    assert undo.returncode == 0 and target.is_file(), undo.stdout
    assert snapshot(tree) == before


def test_autocrlf_checkout_roundtrip(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    tree = make_tree("0.16.1")
    subprocess.run(["git", "config", "core.autocrlf", "true"], cwd=tree, check=True)
    for rel in (MLA, TC, LM):
        (tree / rel).unlink()
    subprocess.run(["git", "checkout", "--", MLA, TC, LM], cwd=tree, check=True)
    before = snapshot(tree)
    assert run_cli(seam_env, "--status", str(tree)).stdout.startswith("not applied")
    done = run_cli(seam_env, str(tree))
    assert done.returncode == 0, done.stderr
    assert b"hook H1\r\n" in (tree / MLA).read_bytes(), "the checkout's CRLF form is kept"
    assert run_cli(seam_env, "--status", str(tree)).stdout.startswith("applied")
    assert run_cli(seam_env, "--revert", str(tree)).returncode == 0
    assert snapshot(tree) == before


_TMPFS_RUNNER = textwrap.dedent("""
    import json, os, subprocess, sys, hashlib
    tree, sizes = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
    def digest():
        h = hashlib.sha256()
        for d, dirs, files in sorted(os.walk(tree)):
            dirs.sort()
            if ".mla-seam" in d:
                continue
            for f in sorted(files):
                h.update(f.encode()); h.update(open(os.path.join(d, f), "rb").read())
        return h.hexdigest()
    pristine = digest()
    filler = os.path.join(os.path.dirname(tree), "filler")
    out = []
    for free in sizes:
        if os.path.exists(filler):
            os.unlink(filler)
        st = os.statvfs(tree)
        room = st.f_bavail * st.f_frsize - free
        with open(filler, "wb") as f:
            f.write(b"\\0" * max(room, 0))
        run = subprocess.run([sys.executable, "-m", "mla_seam", "apply", tree],
                             capture_output=True, text=True)
        txn = os.path.exists(os.path.join(tree, ".mla-seam", "txn"))
        state = digest()
        out.append({"free": free, "rc": run.returncode, "txn": txn,
                    "pristine": state == pristine, "err": run.stderr[-400:]})
        os.unlink(filler)
        if run.returncode == 0:
            subprocess.run([sys.executable, "-m", "mla_seam", "apply", "--revert", tree],
                           check=True, capture_output=True)
    print(json.dumps(out))
    """)


def test_disk_full_on_a_small_tmpfs(
    seam_env: Dict[str, str], make_tree: Callable[..., Path], tmp_path: Path
) -> None:
    """The tree on a tmpfs with little room left: apply fails with exit 24 and the tree as it
    was, or succeeds; never a traceback, a half-applied tree or a transaction left behind."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) here: disk full is covered by the fault-injected rows")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: disk full is covered by the fault-injected rows")
    source = make_tree("0.16.1", git=False)
    stage = tmp_path / "stage"
    for rel in (MLA, TC, LM, "megatron/core/package_info.py"):
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, stage / rel)
    (tmp_path / "runner.py").write_text(_TMPFS_RUNNER)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sizes = ",".join(str(k * 1024) for k in (8, 160, 330, 450, 520, 600, 680, 760, 900, 2048))
    script = (
        f'mount -t tmpfs -o size=1536k tmpfs "{mnt}" && cp -r "{stage}" "{mnt}/tree" && '
        f'exec "{sys.executable}" "{tmp_path}/runner.py" "{mnt}/tree" {sizes}'
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], env=seam_env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)
    sys.stdout.write(
        "\n[tmpfs runs: " + ", ".join(f"{r['free'] // 1024}K->{r['rc']}" for r in runs) + "]\n"
    )
    for run in runs:
        assert "Traceback" not in run["err"], run
        assert not run["txn"], run
        if run["rc"] != 0:
            assert run["rc"] == 24 and "No space left" in run["err"], run
            assert run["pristine"], f"a failed apply changed the tree: {run}"
    assert any(r["rc"] == 24 for r in runs), runs
    assert any(r["rc"] == 0 for r in runs), runs


def test_readme_and_help_say_what_every_exit_code_and_output_flag_means() -> None:
    """One home for the codes (mla_seam.errors.exit_codes: the error classes and the status and
    nightly constants); README's table and `mla-seam apply --help` list every one of them, and
    both say what -q and --json do."""
    codes = errors.exit_codes()
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme[readme.index("### Exit codes") :].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0][:1].isdigit():
            for code in cells[0].split(","):
                rows[int(code)] = cells[1]
    assert set(codes) <= set(rows), f"README lacks rows for {sorted(set(codes) - set(rows))}"
    assert all(rows[c] for c in codes)
    helptext = subprocess.run(
        _cmd("--help"), env=_plain_env(), capture_output=True, text=True, check=True
    ).stdout
    for code in codes:
        assert f"\n  {code:>3}  " in helptext, f"--help does not list exit code {code}"
    for flag, words in (("-q", "no result lines"), ("--json", "one JSON document")):
        assert flag in helptext and words in helptext
    applying = readme[readme.index("## Applying") : readme.index("### Exit codes")]
    assert "`-q` drops the result lines" in applying and "`--json` prints one JSON" in applying


def _plain_env() -> Dict[str, str]:
    import os  # pylint: disable=import-outside-toplevel

    env = {k: v for k, v in os.environ.items() if k != "MLA_SEAM_ROOT"}
    env["PYTHONPATH"] = str(REPO_ROOT / "scripts")
    return env


def test_quiet_prints_no_result_lines_and_json_still_prints(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    tree = make_tree("0.16.1")
    for args, code in (
        (["--check"], 0), ([], 0), (["--status"], 0), (["--check"], 0), (["--revert"], 0),
        (["--status"], STATUS_EXIT_CODES["not applied"]),
    ):  # fmt: skip
        done = run_cli(seam_env, *args, "-q", str(tree))
        assert done.returncode == code, done.stderr
        assert done.stdout == "", f"-q printed result lines for {args}: {done.stdout}"
    as_json = run_cli(seam_env, "--status", "--json", "-q", str(tree))
    assert json.loads(as_json.stdout)["state"] == "not applied"
    refused = run_cli(seam_env, "-q", str(tree / "nope"))
    assert refused.returncode == 3 and refused.stdout == "" and "does not exist" in refused.stderr


def test_json_for_argument_errors(seam_env: Dict[str, str]) -> None:
    for args in (
        ["--json", "--bogus"],
        ["--json", "--check", "--revert"],
        ["--json", "--series", ""],
    ):
        done = run_cli(seam_env, *args)
        assert done.returncode == UsageError.exit_code, done.stderr
        doc = json.loads(done.stdout)
        assert doc["exit_code"] == 2 and doc["error"]["type"] == "UsageError", doc
        assert doc["error"]["message"] and doc["error"]["hint"]


def test_system_errors_never_claim_a_rollback_they_did_not_make(tmp_path: Path) -> None:
    """The hint of an OSError that reached the CLI says what to do, nothing about the tree: only
    the apply verb, which knows, says whether a change was rolled back or completed."""
    import errno  # pylint: disable=import-outside-toplevel

    from mla_seam.cli import os_error  # pylint: disable=import-outside-toplevel

    for code in (errno.ENOSPC, errno.EIO, errno.ENAMETOOLONG, errno.EDQUOT, errno.ENOENT):
        err = os_error(OSError(code, "x", str(tmp_path / "out")))
        assert "rolled back" not in err.hint and err.hint, err.hint
    gone = tmp_path / "gone"
    gone.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "mla_seam", "apply", "--status"],
        env={**_plain_env(), "PWD": str(gone)}, cwd=gone, capture_output=True, text=True,
        preexec_fn=lambda: __import__("os").rmdir(gone),
    )  # fmt: skip
    assert done.returncode == 24, done.stderr
    assert f"the current directory {gone} no longer exists" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
