"""docs/math.md is the math the code cites: every ``docs/math.md §N`` in the package, the
demos and the README names a section that exists, and nothing cites a DESIGN.md that no
clone contains."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "docs" / "math.md"


def _sources() -> list[Path]:
    return [*sorted((ROOT / "tl_mdl").rglob("*.py")), *sorted((ROOT / "demos").rglob("*.py")),
            ROOT / "README.md"]


def test_every_cited_section_exists():
    sections = set(re.findall(r"^## (\d+)\. ", MATH.read_text(), flags=re.M))
    assert {"1", "2", "3", "4", "5", "6", "7"} <= sections
    cited = {
        (path.relative_to(ROOT).as_posix(), n)
        for path in _sources()
        for group in re.findall(r"docs/math\.md[ ,(]*((?:§\d+(?:, )?)+)", path.read_text())
        for n in re.findall(r"§(\d+)", group)
    }
    assert cited, "no docstring cites docs/math.md"
    missing = sorted(c for c in cited if c[1] not in sections)
    assert not missing, missing


def test_nothing_cites_design_md():
    citing = [p.relative_to(ROOT).as_posix() for p in _sources() if "DESIGN.md" in p.read_text()]
    assert not citing, citing


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces → ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_to_its_sections_resolve():
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", MATH.read_text(), flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", MATH.read_text())
    links += re.findall(r"\]\(docs/math\.md#([^)]+)\)", (ROOT / "README.md").read_text())
    assert links
    assert not sorted(set(links) - anchors)
