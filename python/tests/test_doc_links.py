"""Every link in the repository's Markdown resolves: a relative path names a file or folder that
exists, and a `#anchor` names a heading of the page it points into, by GitHub's rules for
heading anchors. The README is a front page that links into docs/, and docs/ pages link into
each other by section: a section renamed or moved must take its links with it.

Also: every repository path a page names in backticks (`server/store/chunk_store.h`) exists,
so a moved or split file does not leave the docs pointing at nothing."""

from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Folders that are build outputs, environments or caches, never documentation.
SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".hypothesis", "results"}
# Top-level folders of the repository: a backticked path starting with one of these is a
# repository path and must exist.
REPO_TOP = ("bench/", "buffer/", "cli/", "client/", "deploy/", "docs/", "proto/", "python/",
            "server/", "tests/", ".ci/")

FENCE = re.compile(r"^\s{0,3}(```+|~~~+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


def markdown_files(root: Path) -> list[Path]:
    """The Markdown files git knows (tracked, or new and not ignored); every *.md outside the
    skipped folders where git cannot say."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "*.md"],
            capture_output=True, text=True, check=True).stdout
        files = [root / line for line in out.splitlines() if line]
        return sorted(f for f in files if f.is_file())
    except (OSError, subprocess.CalledProcessError):
        return sorted(p for p in root.rglob("*.md")
                      if not any(part in SKIP_DIRS or part.startswith("build")
                                 for part in p.relative_to(root).parts[:-1]))


def prose_lines(text: str):
    """(line number, line) for the lines outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)[0] * 3
            elif m.group(1).startswith(fence):
                fence = None
            continue
        if fence is None:
            yield number, line


def heading_text(raw: str) -> str:
    """A heading's text as GitHub renders it: code spans keep their text, links their label,
    emphasis markers and HTML tags go."""
    text = INLINE_CODE.sub(lambda m: m.group(2).strip(), raw)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("*", "")


def slug(text: str) -> str:
    """GitHub's anchor for a heading (github-slugger): lower case; every character that is not
    a letter, a digit, a space, '-' or '_' removed; spaces become '-'."""
    kept = []
    for ch in text.lower():
        cat = unicodedata.category(ch)
        if ch in " -_" or cat[0] in "LN" or cat == "Mn":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(heading_text(m.group(2)))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(text: str):
    """(line number, target) of every link and reference definition outside code."""
    for number, line in prose_lines(text):
        m = REF_DEF.match(line)
        if m:
            yield number, m.group(1)
            continue
        bare = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)
        for m in LINK.finditer(bare):
            yield number, m.group(2)


def code_paths(text: str):
    """(line number, path) of every repository path named in a code span of the prose."""
    for number, line in prose_lines(text):
        for m in INLINE_CODE.finditer(line):
            span = m.group(2).strip()
            if not span.startswith(REPO_TOP) or re.search(r"[\s*<>{}$]|\.\.\.|[A-Z]{4,}", span):
                continue   # not a path, or a pattern (`tests/fuzz/corpus/TARGET/`, `build-*/`)
            yield number, span.split("#")[0].split(":")[0].rstrip(".,")


def problems(root: Path, files: list[Path]) -> list[str]:
    found = []
    anchor_cache: dict[Path, set[str]] = {}

    def anchors_of(path: Path) -> set[str]:
        if path not in anchor_cache:
            anchor_cache[path] = anchors(path.read_text())
        return anchor_cache[path]

    for md in files:
        text = md.read_text()
        where = md.relative_to(root)
        for number, target in links(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (md.parent / path_part).resolve() if path_part else md
            if path_part:
                try:
                    dest.relative_to(root.resolve())
                except ValueError:
                    found.append(f"{where}:{number}: {target}: outside the repository")
                    continue
                if not dest.exists():
                    found.append(f"{where}:{number}: {target}: no such file")
                    continue
            if anchor and dest.suffix == ".md" and anchor not in anchors_of(dest):
                found.append(f"{where}:{number}: {target}: no heading with anchor #{anchor} "
                             f"in {dest.relative_to(root.resolve()) if path_part else where}")
        for number, path in code_paths(text):
            if not (root / path).exists():
                found.append(f"{where}:{number}: `{path}` names no file of the repository")
    return found


def test_every_markdown_link_and_anchor_resolves():
    files = markdown_files(REPO)
    assert REPO / "README.md" in files
    assert problems(REPO, files) == []


def test_slugs_follow_githubs_rules():
    assert slug(heading_text("Freshness: a store changed behind chunkd's back")) == (
        "freshness-a-store-changed-behind-chunkds-back")
    assert slug(heading_text("Shared-memory delivery (colocated clients)")) == (
        "shared-memory-delivery-colocated-clients")
    assert slug(heading_text("`ChunkdStore` and the `max_staleness` flag")) == (
        "chunkdstore-and-the-max_staleness-flag")
    assert slug(heading_text("Python beside C++")) == "python-beside-c"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1", "a-2"}


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "x.h").write_text("")
    (tmp_path / "README.md").write_text(
        "# Top\n\n## Two words\n\n"
        "[ok](docs/a.md#section-one) [ok](#two-words) [ok](server/x.h) [web](https://x.org/#y)\n"
        "[bad anchor](docs/a.md#section-two) [bad file](docs/missing.md) [bad](#nowhere)\n"
        "`server/x.h` is there, `server/y.h` is not\n"
        "```\n[in code](nowhere.md) `server/z.h`\n```\n"
        "`[in a span](nowhere.md)`\n")
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Section one\n\n[up](../README.md#top)\n")
    found = problems(tmp_path, [tmp_path / "README.md", tmp_path / "docs" / "a.md"])
    assert found == [
        "README.md:6: docs/a.md#section-two: no heading with anchor #section-two in docs/a.md",
        "README.md:6: docs/missing.md: no such file",
        "README.md:6: #nowhere: no heading with anchor #nowhere in README.md",
        "README.md:7: `server/y.h` names no file of the repository",
    ], found


# Source files whose comments are checked for repository paths, and how a comment starts there.
COMMENT_MARKERS = {".cc": "//", ".h": "//", ".proto": "//", ".py": "#", ".sh": "#",
                   ".yaml": "#", ".txt": "#", ".toml": "#"}
SOURCE_PATH = re.compile(r"(?<![\w./$-])((?:" + "|".join(re.escape(top) for top in REPO_TOP)
                         + r")[\w./-]*\.[A-Za-z]+)\b")
# Files the build generates (cli/version.h from cli/version.h.in).
GENERATED = {"cli/version.h"}


def comment_paths(path: Path):
    """(line number, path) of every repository path named in a comment of a source file."""
    marker = COMMENT_MARKERS.get(path.suffix)
    if marker is None and path.name in {"run", "Dockerfile"}:
        marker = "#"
    if marker is None:
        return
    for number, line in enumerate(path.read_text(errors="replace").split("\n"), 1):
        at = line.find(marker)
        if at < 0 or line.lstrip().startswith("#include"):
            continue
        for m in SOURCE_PATH.finditer(line[at + len(marker):]):
            yield number, m.group(1).rstrip(".")


def test_source_comments_name_existing_files():
    """A comment that points at a file of the repository (`tests/unit/backend_conformance.h`)
    points at one that exists: a file moved or split takes the comments that name it along."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"],
                                capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git cannot list the repository's files here")
    found = []
    for name in listed:
        path = REPO / name
        if not path.is_file() or "corpus" in path.parts or path.name == Path(__file__).name:
            continue
        for number, named in comment_paths(path):
            if named not in GENERATED and not (REPO / named).exists():
                found.append(f"{name}:{number}: {named}")
    assert found == []


def test_comment_checker_finds_missing_files(tmp_path):
    source = tmp_path / "x.cc"
    source.write_text('#include "server/none.h"\n'
                      "int a;  // see server/store/chunk_store.h and tests/backend_conformance.h\n"
                      'const char* p = "server/not_a_comment.h";\n')
    assert list(comment_paths(source)) == [(2, "server/store/chunk_store.h"),
                                           (2, "tests/backend_conformance.h")]


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
