"""The README and every docs page link only to files that exist: images, other pages, result
files and scripts (a moved or deleted file breaks this test, not a reader's page)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(
    r"`((?:benchmarks|scripts|src/freeflows|docs)/[\w/.-]+\.(?:py|md|json|jsonl|png|yaml))`"
)


def _targets(page: Path) -> list[tuple[str, Path]]:
    text = page.read_text()
    out = []
    for link in LINK.findall(text):
        if link.startswith(("http://", "https://", "mailto:", "#")):
            continue
        out.append((link, (page.parent / link.split("#")[0]).resolve()))
    out += [(path, ROOT / path) for path in REPO_PATH.findall(text)]
    return out


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_link_and_named_file_exists(page):
    missing = [link for link, target in _targets(page) if not target.exists()]
    assert not missing, f"{page.name} names missing files: {missing}"


def test_the_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("![plot](img/none.png) and [ok](page.md) and `benchmarks/no_such_study.py`")
    broken = [link for link, target in _targets(page) if not target.exists()]
    assert broken == ["img/none.png", "benchmarks/no_such_study.py"]
