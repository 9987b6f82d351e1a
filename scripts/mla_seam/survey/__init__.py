"""The survey engine that ``rebase`` and ``drift`` share: one old series tried on one new base.

Everything happens in a :class:`Workspace`, a scratch repository: a ``git clone --shared`` of the
user's checkout (it borrows its objects and never writes to it) plus any release it lacks,
fetched from the mla-seam cache. :func:`survey` replays the old series on its own base tag (so
every pre-image blob its ``index`` lines name exists), then tries EVERY patch on the new base, in
order, and classifies each (:class:`PatchClass`):

* ``exact`` / ``offset``: applies strictly (no fuzz), at the recorded lines or moved;
* ``three_way``: only ``git apply --3way`` merges it; carried, but flagged for review;
* ``conflict``: nothing applies; the report names the file, the hunk, where its pre-image sat
  and the upstream commits between the two tags that touched those lines;
* ``upstream``: the change is already in the new base (the patch reverse-applies, or an upstream
  commit has its patch-id); dropped from the new series and reported;
* ``obsolete``: an ``Obsolete-If: <probe>=<value>`` trailer of the patch header holds on the new
  base (:mod:`mla_seam.contracts`): the problem the hook works around is gone there.

The :class:`Survey` also holds the contract probes of both bases and, on request, the range-diff
of the old series against the new one.
"""

from mla_seam.survey.engine import load_lines, series_for, series_for_ref, survey
from mla_seam.survey.model import (
    Commit,
    Hunk,
    HunkReport,
    PatchClass,
    PatchReport,
    Survey,
    hook_of,
    split_hunks,
)
from mla_seam.survey.workspace import Workspace, survey_paths, version_at

__all__ = [
    "Commit",
    "Hunk",
    "HunkReport",
    "PatchClass",
    "PatchReport",
    "Survey",
    "Workspace",
    "hook_of",
    "load_lines",
    "series_for",
    "series_for_ref",
    "split_hunks",
    "survey",
    "survey_paths",
    "version_at",
]
