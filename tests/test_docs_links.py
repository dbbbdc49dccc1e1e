"""References a reader can follow: every link and file path in the docs resolves, every quoted section exists.

- Markdown links ``[text](target)`` in docs/*.md, README.md, benchmarks/README.md and fqtc/passes/README.md resolve
  to an existing file relative to the page (``http(s)://`` links are not fetched); a ``#anchor`` names a heading of
  the target page (GitHub's slug rule).
- Repository paths written in those pages (``docs/...``, ``fqtc/...``, ``tests/...``, ``benchmarks/...``) exist;
  ``{a,b}`` alternatives and ``*`` globs are expanded.
- A section cited as ``docs/x.md, "Section"`` (or ``docs/x.md "Section"``, ``docs/x.md ("Section"``), in the pages or
  in any .py file under fqtc/, tests/, benchmarks/, starts a heading of that page.
- No file under fqtc/ cites an issue number (``issue 3``): users cannot look those up.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
                                                 ROOT / "fqtc" / "passes" / "README.md"]
SOURCES = sorted(p for d in ("fqtc", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")
                 if p != Path(__file__).resolve())  # this file's own examples name made-up pages

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a repository path: starts at a word boundary with a top-level folder, ends on a name character
PATH = re.compile(r"(?<![\w./-])((?:docs|fqtc|tests|benchmarks)/[\w./{},*-]*[\w}*])")
SECTION = re.compile(r"(?<![\w./-])((?:docs|benchmarks)/\w+\.md),? \(?\"([^\"]+)\"")
ISSUE = re.compile(r"\bissues? #?\d", re.IGNORECASE)
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _headings(page: Path) -> list[str]:
    return HEADING.findall(FENCE.sub("", page.read_text()))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than ``-``/``_`` dropped, spaces -> ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _expand(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if m is None:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _expand(path[:m.start()] + alt + path[m.end():])]


def _exists(path: str) -> bool:
    return any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_markdown_links_resolve(page: Path):
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://|mailto:", target) or not re.search(r"[\w#]", target):
            continue  # external links, and placeholders such as ``[...](...)`` in sample output
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in {_slug(h) for h in _headings(dest)}:
            bad.append(f"{target}: no heading with anchor #{anchor} in {_rel(dest)}")
    assert not bad, f"{_rel(page)}: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_repository_paths_exist(page: Path):
    text = page.read_text()
    missing = [p for m in PATH.findall(text) for p in _expand(m) if not _exists(p)]
    assert not missing, f"{_rel(page)} names paths that do not exist: {missing}"


def test_cited_sections_exist():
    bad = []
    for source in PAGES + SOURCES:
        for doc, section in SECTION.findall(source.read_text()):
            page, section = ROOT / doc, " ".join(section.split())
            if not page.exists():
                bad.append(f"{_rel(source)}: {doc} does not exist")
            elif not any(h.startswith(section) for h in _headings(page)):
                bad.append(f"{_rel(source)}: {doc} has no section {section!r}")
    assert not bad, bad


def test_docs_cited_from_code_exist():
    missing = [f"{_rel(s)}: {p}" for s in SOURCES for p in re.findall(r"(?<![\w./-])(docs/[\w-]+\.md)", s.read_text())
               if not (ROOT / p).exists()]
    assert not missing, missing


def test_no_issue_numbers_in_package():
    hits = [f"{_rel(p)}:{i}: {line.strip()}" for p in sorted((ROOT / "fqtc").rglob("*"))
            if p.is_file() and p.suffix in {".py", ".md", ".txt", ".toml"}
            for i, line in enumerate(p.read_text().splitlines(), 1) if ISSUE.search(line)]
    assert not hits, "cite the doc, the paper or the explanation instead of an issue number:\n" + "\n".join(hits)


def test_checks_catch_breakage(tmp_path: Path):
    """The patterns used above find what they are meant to find (a check that matches nothing passes vacuously)."""
    assert LINK.findall("see [the doc](docs/x.md#a-b) and [y](https://e.org)") == ["docs/x.md#a-b", "https://e.org"]
    assert PATH.findall("(`fqtc/optim/{sgd,adamw}.py`, tests/conftest.py.)") == ["fqtc/optim/{sgd,adamw}.py",
                                                                                   "tests/conftest.py"]
    assert _expand("fqtc/optim/{sgd,adamw}.py") == ["fqtc/optim/sgd.py", "fqtc/optim/adamw.py"]
    assert SECTION.findall('(docs/usage.md, "Reproducibility")') == [("docs/usage.md", "Reproducibility")]
    assert _slug("Step time and memory (benchmarks/step_time.py)") == "step-time-and-memory-benchmarksstep_timepy"
    assert ISSUE.search("gradient quantizers (issue 3)") and ISSUE.search("Issue 8 acceptance")
    assert not ISSUE.search("a known issue with 3 workarounds")
