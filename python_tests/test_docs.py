"""The documentation stands on its own: no references outside the repository, a short README,
and relative links (and the section anchors code cites) that resolve. Fast, CPU only."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200
# Written without their literal text so that this file does not match itself.
FORBIDDEN = re.compile(r"TIDAR\.md|\.\./shared|\bissue\s+\d+", re.IGNORECASE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITATION = re.compile(r"\b(docs/[\w.-]+\.md)#([\w-]+)")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = [f for f in out.splitlines() if (ROOT / f).is_file()]
    if not files:
        pytest.skip("not a git checkout")
    return files


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page: lower case, punctuation dropped, spaces as hyphens."""
    slugs = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return slugs


def test_no_reference_outside_the_repository():
    offenders = []
    for name in tracked_files():
        if name.startswith("docs/results/"):  # measured outputs, kept as written
            continue
        text = (ROOT / name).read_bytes().decode("utf-8", errors="ignore")
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                offenders.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not offenders, "references to documents or trackers outside the repository:\n" + "\n".join(offenders)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, expected <= {README_MAX_LINES}"


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # URLs
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} has links to missing files or sections: {broken}"


def test_cited_sections_exist():
    """Every ``docs/PAGE.md#anchor`` cited in a tracked file names a heading of that page."""
    missing = []
    for name in tracked_files():
        if name.startswith("docs/results/"):
            continue
        text = (ROOT / name).read_bytes().decode("utf-8", errors="ignore")
        for page, anchor in CITATION.findall(text):
            if (ROOT / page).is_file() and anchor not in anchors(ROOT / page):
                missing.append(f"{name}: {page}#{anchor}")
    assert not missing, "cited sections that do not exist:\n" + "\n".join(missing)
