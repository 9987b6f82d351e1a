"""Release discovery from a package index (a real HTTP server on localhost, PEP 691 JSON).

The index lists a built-in release, a new one, a pre-release, a yanked one and one whose
published sha256 does not match its file: ``discover`` offers only the new one (pre-releases on
request), ``get`` materializes it after verifying the sdist and records the hash, a mismatch is
refused, and an unreachable index is exit 15.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path
from typing import Iterator

import pytest
from mla_seam import cli, index, upstream
from mla_seam.errors import UpstreamError


def _sdist(folder: Path, version: str) -> Path:
    """A minimal megatron-core sdist: package_info.py saying ``version``."""
    major, minor, patch = version.split("rc")[0].split(".")
    pre = f"rc{version.split('rc')[1]}" if "rc" in version else ""
    info = (f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = '{pre}'\n").encode()
    path = folder / f"megatron_core-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (
            (f"megatron/core/package_info.py", info),
            ("megatron/core/__init__.py", b""),
        ):
            member = tarfile.TarInfo(f"megatron_core-{version}/{name}")
            member.size, member.mtime, member.mode = len(data), 1700000000, 0o644
            tar.addfile(member, io.BytesIO(data))
    return path


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "www"
    files = root / "files"
    files.mkdir(parents=True)
    entries = []
    for version, yanked, wrong in (
        ("0.21.0", False, False),
        ("0.22.0rc1", False, False),
        ("0.19.1", True, False),
        ("0.21.1", False, True),
    ):
        path = _sdist(files, version)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        entries.append(
            {
                "filename": path.name,
                "url": f"../../files/{path.name}",
                "hashes": {"sha256": "0" * 64 if wrong else sha},
                "requires-python": ">=3.10",
                "yanked": "wrong version" if yanked else False,
            }
        )
    entries.append(
        {
            "filename": "megatron_core-0.19.2.tar.gz",
            "url": "../../files/none",
            "hashes": {"sha256": upstream.SDIST_SHA256["0.19.2"]},
        }
    )
    page = root / "simple" / "megatron-core"
    page.mkdir(parents=True)
    (page / "index.html").write_text(json.dumps({"meta": {"api-version": "1.0"}, "files": entries}))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(index.INDEX_ENV, f"http://127.0.0.1:{server.server_address[1]}/simple")
    monkeypatch.setenv("MLA_SEAM_CACHE", str(tmp_path / "cache"))
    try:
        yield tmp_path / "cache"
    finally:
        server.shutdown()


def test_discover_offers_new_releases_only(served: Path) -> None:
    assert upstream.discover() == ["0.21.0", "0.21.1"]
    assert upstream.discover(include_prereleases=True) == ["0.21.0", "0.21.1", "0.22.0rc1"]
    rows = {r["version"]: r for r in upstream.release_rows(include_prereleases=True)}
    assert rows["0.21.0"]["source"] == "index" and rows["0.19.2"]["source"] == "builtin"
    assert rows["0.19.1"]["yanked"] and rows["0.22.0rc1"]["prerelease"]
    assert "0.19.1" not in {r["version"] for r in upstream.release_rows()}


def test_new_release_is_verified_materialized_and_recorded(served: Path) -> None:
    upstream.discover()
    path = upstream.get("0.21.0")
    assert (path / "megatron/core/package_info.py").read_text().startswith("MAJOR = 0")
    recorded = json.loads((served / "sdists" / index.RECORDED_FILE).read_text())
    assert recorded["0.21.0"] == index.indexed()["0.21.0"]["sha256"]
    assert upstream.version_for("core_v0.21.0") == "0.21.0"
    with pytest.raises(UpstreamError, match="sha256"):
        upstream.get("0.21.1")  # the index publishes a hash its file does not have
    assert not (served / "checkouts" / "core_v0.21.1").exists()


def test_cli_list_json_and_unreachable_index(
    served: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert cli.main(["upstream", "list", "--refresh", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    new = [r for r in rows if r["source"] == "index"]
    assert [r["version"] for r in new] == ["0.21.0", "0.21.1"]
    assert set(new[0]) >= {"version", "tag", "line", "prerelease", "source", "cached"}
    monkeypatch.setenv(index.INDEX_ENV, "http://127.0.0.1:9/simple")
    assert cli.main(["upstream", "list", "--refresh"]) == UpstreamError.exit_code
    assert "cannot read the package index" in caplog.text
