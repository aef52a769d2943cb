"""The documentation holds together: a short README, resolvable bug ids and links, no unshipped documents.

* README.md stays at most 300 lines (the rest lives in docs/);
* every bug id ``B<n>`` cited in the code, tests, experiments, README or docs has an entry (a heading or an
  ``<a id="b<n>">`` anchor) in docs/official_code_differences.md;
* every relative Markdown link in README.md and docs/*.md points to a file that exists, and a ``#fragment`` on
  a Markdown target names a heading or anchor of that file;
* nothing cites documents the repository does not ship.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIFFERENCES = ROOT / "docs" / "official_code_differences.md"
README_MAX_LINES = 300

BUG_ID = re.compile(r"\bB([0-9]{1,2})\b")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
UNSHIPPED = ("PUMER.md", "SHAPES.md", "ECOSYSTEM.md", "PEERS.md", "STYLE.md", "OFFICIAL_BENCH.md")
SOURCE_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt"}


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def _cited_files() -> list[Path]:
    """Every text file in which a bug id or a document citation can appear."""
    files = [ROOT / "README.md", ROOT / "Makefile"]
    for folder in ("pumer_lightning", "tests", "experiments", "docs"):
        files += [
            p
            for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts
        ]
    return [p for p in files if p.exists()]


def _prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks (``` or ~~~)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link renders as its text
    text = "".join(ch for ch in text.lower() if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Heading slugs (with GitHub's -1, -2 suffixes for repeats) and explicit ``<a id>`` anchors of a file."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        found.update(EXPLICIT_ANCHOR.findall(line))
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_readme_is_short() -> None:
    n_lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n_lines <= README_MAX_LINES, (
        f"README.md has {n_lines} lines (at most {README_MAX_LINES}): move details into a docs/ page and link it"
    )


def test_every_cited_bug_id_has_an_entry() -> None:
    entries = anchors(DIFFERENCES)
    missing: dict[str, list[str]] = {}
    for path in _cited_files():
        for n in BUG_ID.findall(path.read_text(encoding="utf-8", errors="replace")):
            if f"b{int(n)}" not in entries:
                missing.setdefault(f"B{int(n)}", []).append(str(path.relative_to(ROOT)))
    assert not missing, (
        f'bug ids without an entry (<a id="b<n>"></a> and a heading) in {DIFFERENCES.relative_to(ROOT)}: '
        + "; ".join(f"{bug} cited in {sorted(set(where))}" for bug, where in sorted(missing.items()))
    )


def _links(path: Path) -> list[str]:
    lines = _prose_lines(path.read_text(encoding="utf-8"))
    # inline code may show link syntax without being a link
    return [target for line in lines for target in LINK.findall(re.sub(r"`[^`]*`", "", line))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading or anchor #{fragment} in {dest.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_no_citation_of_unshipped_documents() -> None:
    this = Path(__file__).resolve()
    found = []
    for path in _cited_files():
        if path.resolve() == this:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for name in UNSHIPPED:
            if name in text:
                found.append(f"{path.relative_to(ROOT)} cites {name}")
    assert not found, f"citations of documents the repository does not ship: {found}"


def test_slug_rules() -> None:
    assert _slug("What `make exp` printed (measured)") == "what-make-exp-printed-measured"
    assert (
        _slug("Static shapes, `torch.compile` and CUDA graphs")
        == "static-shapes-torchcompile-and-cuda-graphs"
    )
    assert _slug("B6: pads merge into real text tokens; masks become fractional") == (
        "b6-pads-merge-into-real-text-tokens-masks-become-fractional"
    )
