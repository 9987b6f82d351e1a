"""A local bare "upstream" standing in for NVIDIA/Megatron-LM (:func:`build_upstream`), for
the partial-clone and nightly tests; its fixture ``upstream_remote`` is in conftest.py.

The 0.19.2 release (built from its PyPI sdist, tagged ``core_v0.19.2``), then upstream commits
that move three hooks of the core_v0.19 series (H4 moved down: offset; a context line of H3
edited two lines away from it: a clean 3-way merge; the line H7 sits under rewritten: a
conflict), the release ``core_v0.20.0``, and ``main`` after it (the H7 change reverted,
version 0.21.0); and a ``dev`` branch from 0.19.2 that says 0.19.0 and rewrites the line H7
sits under (a conflict, one culprit).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Dict

from mla_seam import gitlayer
from support import TC, TL, edit

LM = "megatron/core/models/common/language_module/language_module.py"
PACKAGE_INFO = "megatron/core/package_info.py"
SPARSE = [PACKAGE_INFO]  # what the nightly workflow checks out of its clone
#: The date of the synthetic upstream commits (a hook ported onto them gets it as Last-Update).
UPSTREAM_DATE = "2026-12-01T12:00:00+00:00"


def commit_all(tree: Path, message: str) -> str:
    """Commit every change in ``tree`` as an upstream commit of :data:`UPSTREAM_DATE`."""
    return gitlayer.commit_all(gitlayer.open_repo(tree), message, UPSTREAM_DATE)


@dataclasses.dataclass
class Upstream:
    """The bare upstream and the commits the tests name."""

    bare: Path
    url: str
    commits: Dict[str, str]


def _set_version(tree: Path, minor: int) -> None:
    edit(tree / PACKAGE_INFO, "MINOR = 19\nPATCH = 2\n", f"MINOR = {minor}\nPATCH = 0\n")


def build_upstream(root: Path, fresh_checkout: Callable[[str, Path], Path]) -> Upstream:
    """The bare upstream described in the module doc, at ``root / "upstream.git"``."""
    work = fresh_checkout("0.19.2", root / "work")
    commits = {"core_v0.19.2": gitlayer.head_commit(gitlayer.open_repo(work)) or ""}
    text = (work / TC).read_text()
    first, rest = text.split("\n", 1)
    (work / TC).write_text(
        f"{first}\n# upstream: three new lines\n# above MLATransformerConfig\n#\n{rest}"
    )
    commits["offset"] = commit_all(work, "upstream: a comment block at the top of the config")
    edit(
        work / LM,
        "attn_type: AttnBackend\n        ) -> None:\n",
        "attn_type: AttnBackend\n        ) -> None:  # upstream: typed\n",
    )
    commits["three_way"] = commit_all(work, "upstream: annotate the backend check")
    pp_old = "        pp_rank = parallel_state.get_pipeline_model_parallel_rank()\n"
    pp_new = "        pp_rank = parallel_state.get_pipeline_model_parallel_rank(check=True)\n"
    edit(work / TL, pp_old, pp_new)
    commits["conflict"] = commit_all(work, "upstream: check the pipeline rank")
    _set_version(work, 20)
    commits["core_v0.20.0"] = commit_all(work, "upstream: release 0.20.0")
    repo = gitlayer.open_repo(work)
    gitlayer.create_tag(repo, "core_v0.20.0", commits["core_v0.20.0"])
    edit(work / TL, pp_new, pp_old)
    commits["revert"] = commit_all(work, "upstream: revert the pipeline rank check")
    edit(work / PACKAGE_INFO, "MINOR = 20\n", "MINOR = 21\n")
    commits["main"] = commit_all(work, "upstream: main is 0.21.0")
    gitlayer.checkout_branch(repo, "dev", commits["core_v0.19.2"])
    pp_dev = "        pp_rank = parallel_state.get_pipeline_model_parallel_rank(dev=1)\n"
    edit(work / TL, pp_old, pp_dev)
    edit(work / PACKAGE_INFO, "PATCH = 2\n", "PATCH = 0\n")
    commits["dev"] = commit_all(work, "dev: the pipeline rank of dev (says 0.19.0)")
    bare = root / "upstream.git"
    gitlayer.init_bare(bare)
    repo.git.push("--quiet", str(bare), "main:refs/heads/main", "dev:refs/heads/dev", "--tags")
    return Upstream(bare, bare.as_uri(), commits)
