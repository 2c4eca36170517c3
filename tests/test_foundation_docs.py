"""The docs stand alone: every relative link resolves to a file inside the repository, and no doc
or requirements file sends the reader to a file the project does not hold."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(ROOT.glob("requirements*.txt")),
        *sorted((ROOT / "benchmarks" / "results").glob("*.md")), *sorted((ROOT / "data").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Files of the team's own working space that are not part of the project.
OUTSIDE = re.compile(r"GPU\.md|DESIGN\.md|HELPERS\.md|\.\./shared|/work/")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_links_stay_inside_the_repository(doc):
    text = doc.read_text()
    assert not OUTSIDE.search(text), OUTSIDE.search(text).group(0)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:|#", target):  # a web address or an anchor
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), target
