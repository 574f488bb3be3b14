"""The documentation's links resolve and its prose names no commit.

README.md and docs/*.md: every relative link and image, [text](path) and ![alt](path), points at
a file or folder that exists relative to the page (a #fragment is dropped; http(s) links and pure
#anchors are not checked); and no word in the prose looks like a commit hash (7 to 40 hex digits
with at least one digit and one letter). Fenced code blocks and the blocks that benchmarks/ scripts
generate between their markers are not prose: they are left out of the hash check.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HASH = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
GENERATED = re.compile(r"<!-- (benchmarks/\S+(?: \w+)?): start -->.*?<!-- \1: end -->", re.S)
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)


def broken_links(page: Path) -> list[str]:
    """The relative link targets of page that do not exist on disk."""
    text = FENCE.sub("", page.read_text())  # a link-like string in a code block is not a link
    broken = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    return broken


def prose(text: str) -> str:
    """text without fenced code blocks and the generated blocks between markers."""
    return FENCE.sub("", GENERATED.sub("", text))


def hash_like_words(text: str) -> list[str]:
    return HASH.findall(prose(text))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_exists(page):
    assert broken_links(page) == [], f"{page.relative_to(ROOT)}: broken relative links"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_commit_hash_in_prose(page):
    assert hash_like_words(page.read_text()) == [], f"{page.relative_to(ROOT)}: commit-hash-like words"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A broken link, a broken image and a hash in prose are found; code, generated blocks, web links,
    anchors and words like 'deadbeef' (no digit) or '1234567' (no letter) are not."""
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#a-section) [web](https://example.com/x) [anchor](#top) ![gone](missing.png)\n"
        "[gone too](sub/none.md#x) made in bb3b27d, not deadbeef nor 1234567.\n"
        "```bash\n[not a link](nowhere.md) git show a644921\n```\n"
        "<!-- benchmarks/report.py: start -->\nrun_6f04b38.png\n<!-- benchmarks/report.py: end -->\n")
    assert broken_links(page) == ["missing.png", "sub/none.md#x"]
    assert hash_like_words(page.read_text()) == ["bb3b27d"]


def test_readme_keeps_ci_test_command_and_generated_blocks():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -r requirements.txt -r benchmarks/requirements.txt && python -m pytest" in readme
    assert "<!-- benchmarks/report.py: start -->" in readme and "<!-- benchmarks/report.py: end -->" in readme
