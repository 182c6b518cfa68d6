"""The documents a user reads point only inside the repository: every relative link of README.md,
DEVELOPERS.md, docs/*.md and the model card resolves to a file of the checkout (and its #anchor to a heading of
that file), and no document or source file names a file that exists only outside it."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "DEVELOPERS.md", *(ROOT / "docs").glob("*.md"),
                    ROOT / "selfrag_engine" / "data" / "tiny_selfrag" / "MODEL_CARD.md"])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
# Engineers' notes kept outside the repository: the product's own docs replace them.
OUTSIDE = ("SELFRAG_REFERENCE.md", "TRITON_ON_CPU.md")


def links(text: str) -> list[str]:
    """Link targets, code blocks and inline code left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def test_the_helpers_read_links_and_anchors_as_github_does():
    assert links("see [a](docs/A.md#x) and `[b](c.md)` and ![img](p.png) [w](https://x.org)") == \
        ["docs/A.md#x", "https://x.org"]
    assert slug("`compat`: the paper or the released scripts") == "compat-the-paper-or-the-released-scripts"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(document):
    assert document.is_file()
    bad = []
    for target in links(document.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (document.parent / file).resolve() if file else document
        if ROOT not in resolved.parents and resolved != ROOT:
            bad.append(f"{target}: outside the repository")
        elif not resolved.exists():
            bad.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            bad.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert bad == []


def test_no_file_names_a_document_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    found = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in (".md", ".py", ".cpp", ".h", ".txt", ".toml", ".sh", ".cmake") or not path.is_file():
            continue
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{name}: {outside}" for outside in OUTSIDE if outside in text]
    assert found == []
