"""The texts the nightly job publishes: pull-request and tracking-issue bodies, comments.

GitHub refuses a body over 65,536 characters; :func:`capped` keeps every body under
:data:`BODY_LIMIT` (60,000) by cutting the longest sections first and saying where the whole
text is (the workflow run's artifact). Each hook is named once, with its hunk and the upstream
commits that moved it (between the line's tag and the target).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mla_seam import contracts, releases
from mla_seam.nightly.targets import Target

BODY_LIMIT = 60_000
ARTIFACT = "mla-seam-drift"
PR_MARK = "<!-- mla-seam-proposal: {slug} -->"
ISSUE_MARK = "<!-- mla-seam-tracking: {slug} -->"

Section = Tuple[str, str]  # (title, text); an empty title: no heading


def capped(sections: Sequence[Section], where: str, limit: int = BODY_LIMIT) -> str:
    """Join ``sections``; when longer than ``limit``, cut the longest ones and say so.

    Args:
        sections: ``(heading, text)`` pairs, in order.
        where: Where the whole text is (``proposals/main/PR-full.md``), for the note.
        limit: The character budget.
    """
    note = (
        f"\n\n> Cut to stay under GitHub's size limit: the whole text is `{where}` in the "
        f"`{ARTIFACT}` artifact of this workflow run.\n"
    )
    texts = [text for _, text in sections]
    body = _join(sections, texts)
    while len(body) > limit:
        longest = max(range(len(texts)), key=lambda k: len(texts[k]))
        excess = len(body) - limit + len(note) + 200
        keep = max(len(texts[longest]) - excess, 0)
        texts[longest] = texts[longest][:keep].rsplit("\n", 1)[0] + "\n... (cut)\n"
        body = _join(sections, texts) + note
        if keep == 0 and len(body) > limit:
            body = body[: limit - len(note)] + note
            break
    return body


def _join(sections: Sequence[Section], texts: Sequence[str]) -> str:
    out = []
    for (title, _), text in zip(sections, texts):
        out.append(f"## {title}\n\n{text.strip()}\n" if title else text.strip() + "\n")
    return "\n".join(out)


def fenced(text: str) -> str:
    """``text`` in a code block (backtick fences in it widened)."""
    fence = "````" if "```" in text else "```"
    return f"{fence}\n{text.rstrip()}\n{fence}"


def details(summary: str, text: str) -> str:
    """A collapsed block."""
    return f"<details><summary>{summary}</summary>\n\n{fenced(text)}\n\n</details>"


def hooks_table(entry: Mapping[str, Any]) -> str:
    """One row per hook: class and detail (a hook with hunks to look at points to the list of
    hunks, where its culprits are named once)."""
    rows = ["| hook | class | detail |", "|---|---|---|"]
    for p in entry["patches"]:
        detail = str(p.get("detail") or "")
        if p.get("hunks"):
            detail = f"{len(p['hunks'])} hunk(s), listed with their upstream commits"
        detail = detail.replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {p['hook']} | {p['class']} | {detail} |")
    return "\n".join(rows)


def contract_lines(entry: Mapping[str, Any]) -> List[str]:
    """``probe: +added -removed`` per contract change (the adapter's verdict when it needs work)."""
    out = []
    for c in entry.get("contract_changes") or []:
        change = contracts.Change(
            c["probe"], c.get("old"), c.get("new"), c.get("key"), c.get("reason")
        )
        out.append(f"- `{change.describe()}`")
    return out


def hunk_lines(entry: Mapping[str, Any], classes: Sequence[str]) -> List[str]:
    """For each hook of ``classes``: its hunks, each with its culprit commits, once."""
    out = []
    for p in entry["patches"]:
        if p["class"] not in classes:
            continue
        hunks = p.get("hunks") or []
        if not hunks:
            out.append(f"- **{p['hook']}** `{p['name']}`: {p['class']}: {p.get('detail', '')}")
            continue
        for h in hunks:
            who = ", ".join(f"`{c['commit'][:12]}` {c['subject']}" for c in h["culprits"])
            out.append(
                f"- **{p['hook']}** {p['class']}: `{h['file']}` `{h['hunk']}` (pre-image lines "
                f"{h['base_lines'][0]}-{h['base_lines'][1]}); upstream commits that moved it: "
                f"{who or 'none found in this clone'}"
            )
    return out


def port_commands(target: Target, conflicts: Sequence[Mapping[str, Any]]) -> str:
    """The commands that finish a port by hand (``rebase --keep`` then ``--resolved``)."""
    keep = f"/tmp/mla-seam-port-{target.slug}"
    line = target.series.removeprefix("core_v")
    lines = [
        "# in a clone of NVIDIA/Megatron-LM with its tags"
        + (f" and branch {target.name} fetched" if target.kind == "branch" else "")
        + ", and this repository's mla-seam installed:",
        f"mla-seam rebase --megatron CLONE --onto {target.onto} --from {line} --keep {keep}",
    ]
    for p in conflicts:
        lines.append(
            f"# write {p['hook']} by hand in {keep}, then: git -C {keep} commit -a -F "
            f".git/mla-seam-rebase/{p['name']}.msg"
        )
    lines.append(
        f"mla-seam rebase --megatron {keep} --onto {target.onto} --from {line} "
        "--resolved mla-seam/rebase --write --accept-three-way"
    )
    return "\n".join(lines)


def pr_title(target: Target, line_dir: str) -> str:
    """The proposal's pull-request title."""
    return (
        f"mla-seam: serve {target.label} (megatron-core {target.version}) with patches/{line_dir}"
    )


def pr_body(
    target: Target,
    entry: Mapping[str, Any],
    proposal: Mapping[str, Any],
    rebase_output: str,
    drift_md: str,
    limit: int = BODY_LIMIT,
) -> Tuple[str, str]:
    """``(capped body, whole body)`` of the proposal's pull request."""
    review = hunk_lines(entry, ("three_way",))
    intro = (
        f"{PR_MARK.format(slug=target.slug)}\n"
        f"The nightly drift job moved the `{target.series}` hooks onto **{target.label}** "
        f"(`{target.commit[:12]}`, megatron-core {target.version}) with `mla-seam rebase --write "
        f"--accept-three-way` and wrote `patches/{proposal['line_dir']}/`. Nobody edited this "
        "series by hand; the hooks that needed a 3-way merge say so in their header "
        "(`Merged-3way:`), with `Last-Update:` moved to the newest upstream commit of their file."
    )
    if target.moving:
        label = releases.snapshot(target.moving, target.commit)
        intro += (
            f"\n\n`patches/{proposal['line_dir']}/` is the series of the moving target "
            f"{target.moving}: it records its snapshot `{label}` (the commit it was made "
            f"from); later commits of {target.moving} are served where "
            "every hunk still applies strictly, and the nightly proposes an update when one no "
            "longer does or a hooked file moves."
        )
    sections: List[Section] = [("", intro), ("Hooks", hooks_table(entry))]
    if review:
        sections.append(("Review these 3-way merges", "\n".join(review)))
    changes = contract_lines(entry)
    if changes:
        sections.append(("Contract changes", "\n".join(changes)))
    sections.append(
        (
            "GPU",
            "The nightly's GPU job stages this series on the target (patched, vanilla and base "
            "trees) and runs the suite with attribution; its verdict is posted here as a "
            "comment. Without a GPU runner (repository variable `MLA_SEAM_GPU_RUNNER`) only the "
            "CPU checks above ran.",
        )
    )
    sections.append(
        (
            "Reproduce",
            fenced(
                f"mla-seam rebase --megatron CLONE --onto {target.onto} "
                f"--from {target.series.removeprefix('core_v')} --write --accept-three-way"
            ),
        )
    )
    sections.append(("Rebase output", details("mla-seam rebase", rebase_output)))
    matrix = drift_md.split("\n## Per release line")[0]
    sections.append(("Drift report", details("the drift matrix (drift.md)", matrix)))
    where = f"proposals/{target.slug}/PR-full.md"
    return capped(sections, where, limit), _join(sections, [t for _, t in sections])


def issue_title(target: Target) -> str:
    """The tracking issue's title."""
    if target.kind == "overlay":
        return f"mla-seam: the {target.series} series broke on {target.name}"
    return f"mla-seam: {target.label} needs a hand-made port"


def issue_body(
    target: Target, entry: Mapping[str, Any], limit: int = BODY_LIMIT
) -> Tuple[str, str]:
    """``(capped body, whole body)`` of a target's tracking issue."""
    conflicts = [p for p in entry["patches"] if p["class"] == "conflict"]
    intro = (
        f"{ISSUE_MARK.format(slug=target.slug)}\n"
        f"**{target.label}** (`{target.commit[:12]}` when this was written, megatron-core "
        f"{target.version}) needs a human: the `{target.series}` series was surveyed on it."
    )
    sections: List[Section] = [("", intro)]
    listed = tuple(f"{p['hook']} {p['name']}:" for p in entry["patches"] if p.get("hunks"))
    why = [r for r in target.reasons if not r.startswith(listed)]  # those: with their hunks
    sections.append(("Why", "\n".join(f"- {r}" for r in why[:20]) or "- (the hunks below)"))
    hunks = hunk_lines(entry, ("conflict", "three_way"))
    if hunks:
        sections.append(("Hunks and the upstream commits that moved them", "\n".join(hunks)))
    if target.kind != "overlay":
        sections.append(("Finish the port", fenced(port_commands(target, conflicts))))
    else:
        sections.append(
            (
                "What to do",
                f"A release the `{target.series}` series lists fails now: check the series "
                f"folder against {target.name} (`mla-seam apply --check` on a checkout of it) "
                "and re-export the line with `mla-seam rebase --write`.",
            )
        )
    changes = contract_lines(entry)
    if changes:
        sections.append(("Contract changes", "\n".join(changes)))
    sections.append(("Hooks", hooks_table(entry)))
    sections.append(("Drift report", f"`drift/drift.md` in the `{ARTIFACT}` artifact of the run."))
    where = f"issues/{target.slug}-full.md"
    return capped(sections, where, limit), _join(sections, [t for _, t in sections])


def change_comment(old: Optional[Mapping[str, Any]], target: Target) -> str:
    """The comment that notifies an issue's watchers of what changed since its last update."""
    lines = [f"Upstream moved; this issue now describes {target.label} at `{target.commit[:12]}`."]
    before: Dict[str, str] = dict((old or {}).get("classes") or {})
    for hook in sorted(set(before) | set(target.classes)):
        a, b = before.get(hook), target.classes.get(hook)
        if a != b:
            lines.append(f"- {hook}: {a or '-'} -> {b or '-'}")
    old_reasons = set((old or {}).get("reasons") or [])
    for reason in target.reasons:
        if reason not in old_reasons:
            lines.append(f"- new: {reason[:300]}")
    for reason in sorted(old_reasons - set(target.reasons)):
        lines.append(f"- gone: {reason[:300]}")
    return "\n".join(lines)


def gpu_comment(target: Target, verdict: Mapping[str, Any]) -> str:
    """The GPU verdict comment on a proposal's pull request and its tracking issue."""
    counts = ", ".join(f"{n} {k}" for k, n in sorted((verdict.get("counts") or {}).items()) if n)
    lines = [
        f"**GPU verdict for {target.label}** (`{target.commit[:12]}`): "
        f"**{verdict.get('verdict', 'none')}**" + (f" ({counts})" if counts else ""),
        "",
        f"Trees: patched with {'this proposal' if target.proposal else 'the checked-in series'}, "
        f"vanilla, and the base release {verdict.get('base') or '(none)'}; card "
        f"{verdict.get('card') or '?'}.",
    ]
    for finding in (verdict.get("findings") or [])[:15]:
        lines.append(f"- {finding}")
    if verdict.get("error"):
        lines.append(f"- {verdict['error']}")
    lines.append(f"\nFull results: the `{ARTIFACT}-gpu` artifact of the nightly run.")
    return "\n".join(lines)
