"""The text rules of docs/ARCHITECTURE.md: file lengths, and what comments may cite (no file is imported).

    long_files(REPO, folders)                         source files over MAX_LINES lines
    text_segments(path, text)                         the comments, docstrings and string literals of a file
    text_findings(path, REPO)                         "SPEC Ax" citations and issue numbers in comments / docstrings
    method_citations(path, REPO), method_sections()   "METHOD.md Ax" citations, and the ids docs/METHOD.md has

tests/test_architecture.py applies them; the comment sweep script reuses `text_segments`, so that it rewrites
exactly what the test flags.
"""

from __future__ import annotations

import ast
import functools
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

MAX_LINES = 400
SOURCE_SUFFIXES = (".py", ".c", ".cc", ".cpp", ".h", ".hpp", ".cu", ".cuh", ".sh")

# A citation of the specification outside the repository; docs/METHOD.md carries the same section ids.
SPEC_CITATION = re.compile(r"\bSPEC(?:\.md)?\s+[AB]\d+(?:\.\d+)?|\bSPEC\.md\b")
ISSUE_NUMBER = re.compile(r"\bissues?[\s#-]*\d+|(?<![\w&#])#\d+\b", re.IGNORECASE)
# "METHOD.md A2", "METHOD.md A5.1, A7", "METHOD.md A1 + A2": every id must be a heading of docs/METHOD.md.
METHOD_CITATION = re.compile(r"\bMETHOD\.md\s+([AB]\d+(?:\.\d+)?(?:(?:\s*,\s*|\s+\+\s+|\s+and\s+)[AB]\d+(?:\.\d+)?)*)")
SECTION_ID = re.compile(r"[AB]\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Segment:
    kind: str           # "comment", "docstring" or "string"
    start: int          # character offsets into the file's text
    end: int


def _where(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)


# ------------------------------------------------------------------------------------------------------------- files
def source_files(repo: Path, folders, suffixes=SOURCE_SUFFIXES) -> list[Path]:
    files = []
    for folder in folders:
        for path in sorted((repo / folder).rglob("*")):
            if path.is_file() and path.suffix in suffixes and "__pycache__" not in path.parts:
                files.append(path)
    return files


def long_files(repo: Path, folders, limit: int = MAX_LINES) -> list[str]:
    lines = []
    for path in source_files(repo, folders):
        n = len(path.read_text(encoding="utf-8", errors="replace").splitlines())
        if n > limit:
            lines.append(f"{path.relative_to(repo).as_posix()}: {n} lines")
    return lines


# ---------------------------------------------------------------------------------------------- comments and strings
def _python_segments(text: str) -> list[Segment]:
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                docstrings.add((first.value.lineno, first.value.col_offset))
    line_start = [0]
    for line in text.splitlines(keepends=True):
        line_start.append(line_start[-1] + len(line))
    string_types = {tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)}
    segments = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            kind = "comment"
        elif tok.type in string_types:
            kind = "docstring" if tok.start in docstrings else "string"
        else:
            continue
        start = line_start[tok.start[0] - 1] + tok.start[1]
        segments.append(Segment(kind, start, line_start[tok.end[0] - 1] + tok.end[1]))
    return segments


def _c_segments(text: str) -> list[Segment]:
    segments, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            segments.append(Segment("comment", i, end))
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            segments.append(Segment("comment", i, end))
            i = end
        elif text[i] in "\"'":
            quote, i = text[i], i + 1
            while i < n and text[i] not in (quote, "\n"):
                i += 2 if text[i] == "\\" else 1
            i += 1
        else:
            i += 1
    return segments


def _hash_segments(text: str) -> list[Segment]:
    """'#' comments of shell, YAML and make files: a '#' at a line's start or after a blank, outside quotes."""
    segments, offset = [], 0
    for line in text.splitlines(keepends=True):
        quote = None
        for j, ch in enumerate(line):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "#" and (j == 0 or line[j - 1].isspace()) and not line.startswith("#!"):
                segments.append(Segment("comment", offset + j, offset + len(line.rstrip("\n"))))
                break
        offset += len(line)
    return segments


def text_segments(path: Path, text: str) -> list[Segment]:
    """The comments, docstrings and (Python) other string literals of a source file; all of a Markdown file."""
    suffix = path.suffix
    if suffix == ".py":
        return _python_segments(text)
    if suffix in (".c", ".cc", ".cpp", ".h", ".hpp", ".cu", ".cuh"):
        return _c_segments(text)
    if suffix in (".sh", ".yaml", ".yml") or path.name == "Makefile":
        return _hash_segments(text)
    if suffix == ".md":
        return [Segment("docstring", 0, len(text))]
    return []


@functools.lru_cache(maxsize=None)
def _read_segments(path: Path) -> tuple[str, tuple[Segment, ...]]:
    """One scan per file per process: the comment check and the citation check read the same files."""
    text = path.read_text(encoding="utf-8")
    return text, tuple(text_segments(path, text))


def text_findings(path: Path, base: Path) -> list[str]:
    """'file:line: cites SPEC ...' for every SPEC citation (any comment or string) and 'file:line: names an issue
    number' for each issue number in a comment or docstring."""
    text, segments = _read_segments(path)
    where = _where(path, base)
    findings = []
    for seg in segments:
        body = text[seg.start:seg.end]
        skip = 1 if seg.kind == "comment" and body.startswith("#") else 0    # a comment's own marker is not "#N"
        rules = [(SPEC_CITATION, "cites")]
        if seg.kind != "string":
            rules.append((ISSUE_NUMBER, "names an issue number:"))
        for pattern, verb in rules:
            for m in pattern.finditer(body, skip):
                line = text.count("\n", 0, seg.start + m.start()) + 1
                findings.append(f"{where}:{line}: {verb} {' '.join(m.group(0).split())!r}")
    return sorted(set(findings), key=lambda s: (s.split(":")[0], int(s.split(":")[1]), s))


def method_sections(method_md: Path) -> set[str]:
    """The section ids of docs/METHOD.md: the "A2" of a heading "## A2. Latent perturbation"."""
    return set(re.findall(r"^#+\s+([AB]\d+(?:\.\d+)?)\.", method_md.read_text(encoding="utf-8"), re.MULTILINE))


def method_citations(path: Path, base: Path) -> list[tuple[str, str]]:
    """(file:line, id) for every section id cited as "METHOD.md <ids>" in the file's comments and strings."""
    text, segments = _read_segments(path)
    where = _where(path, base)
    cited = []
    for seg in segments:
        for m in METHOD_CITATION.finditer(text, seg.start, seg.end):
            line = text.count("\n", 0, m.start()) + 1
            cited += [(f"{where}:{line}", sid) for sid in SECTION_ID.findall(m.group(1))]
    return cited
