"""The README and the pages under docs/ link only to files that exist.

Links are relative so that they work on GitHub as well as in the site; the site
itself is built with `mkdocs build --strict` by scripts/test, not here (it takes
seconds, and checks the API reference too).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

# [text](target) and ![alt](target), outside code; the target up to a space or ")".
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"```.*?```", re.DOTALL)
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub and mkdocs' toc both make it (for plain headings)."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", text))


def _links(page: Path) -> list[str]:
    text = _CODE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in _LINK.findall(text) if "://" not in t and not t.startswith("mailto:")]


def test_there_are_pages_to_check() -> None:
    """The glob finds the docs (a moved folder must not make the link test vacuous)."""
    assert len(PAGES) > 10
    assert all(_links(p) for p in PAGES if p.name in ("README.md", "index.md"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(page: Path) -> None:
    """Each relative link (and its #anchor, for a Markdown page) resolves in the repository."""
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md":
            headings = _HEADING.findall(_FENCE.sub("", resolved.read_text(encoding="utf-8")))
            if anchor not in {_slug(h) for h in headings}:
                broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"
