"""The layout rules of docs/ARCHITECTURE.md, read from the source (nothing is imported): the layer order, no import
cycle between package folders or modules, files under 400 lines, comments that cite docs/METHOD.md rather than a
document outside the repository or an issue number. Each rule is also run on a small synthetic tree, so a checker
that stopped finding violations would fail here too. Runs in ~2 s."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.architecture import (LAYERS, collect_imports, folder_of, import_cycles, layer_violations, package_modules,
                                unmapped_modules)
from tests.source_text import (MAX_LINES, SOURCE_SUFFIXES, long_files, method_citations, method_sections,
                               source_files, text_findings)

REPO = Path(__file__).resolve().parents[1]
STAGE_FILES = {"__init__.py", "main.py", "gen.py", "cache.py", "post.py"}
LENGTH_FOLDERS = ("tokpost_fast", "kernels", "csrc", "benchmarks")
COMMENT_FOLDERS = ("tokpost_fast", "kernels", "csrc", "benchmarks", "configs")
RULES = "docs/ARCHITECTURE.md, 'Who may import whom'"
CHECKER_FILES = ("tests/source_text.py", "tests/test_architecture.py")     # their citations are test data


@functools.lru_cache(maxsize=1)
def _repository():
    return _modules_and_imports(REPO)


def _modules_and_imports(repo: Path, roots=None, root: str = "tokpost_fast"):
    modules = package_modules(repo, roots)
    return modules, collect_imports(modules, repo, root=root, extra_modules=(f"{root}._C",))


def _packages(modules) -> set[str]:
    return {name for name, path in modules.items() if path.name == "__init__.py"}


def _check(what: str, lines: list[str]) -> None:
    if lines:
        pytest.fail(f"{len(lines)} {what}:\n  " + "\n  ".join(lines), pytrace=False)


# --------------------------------------------------------------------------------------------------- this repository
def test_every_module_has_a_layer():
    modules, _ = _repository()
    unmapped = unmapped_modules(modules)
    _check(f"modules in no layer (place them in LAYERS of tests/architecture.py and in {RULES})", unmapped)


def test_no_module_imports_a_higher_layer():
    _, imports = _repository()
    violations = layer_violations(imports)
    _check(f"imports against the layer order ({RULES})", violations)


def test_stages_folder_holds_only_the_stages():
    extra = sorted(p.name for p in (REPO / "tokpost_fast" / "stages").glob("*.py") if p.name not in STAGE_FILES)
    _check("files in tokpost_fast/stages/ that are not a stage (training machinery goes to tokpost_fast/training/)",
           extra)


def test_no_import_cycle_between_package_folders():
    modules, imports = _repository()
    packages = _packages(modules)
    cycles = import_cycles(imports, lambda m: folder_of(m, packages))
    _check("import cycles between package folders (module level and function level imports)", cycles)


def test_no_import_cycle_between_modules():
    _, imports = _repository()
    cycles = import_cycles(imports, lambda m: m)
    _check("import cycles between modules (a function-level import is no way out)", cycles)


def test_no_source_file_over_the_line_limit():
    offenders = long_files(REPO, LENGTH_FOLDERS)
    _check(f"source files over {MAX_LINES} lines (split them where a concept is missing)", offenders)


def test_comments_cite_the_method_document_and_no_issue_number():
    files = source_files(REPO, COMMENT_FOLDERS, SOURCE_SUFFIXES + (".yaml",))
    findings = [f for path in files for f in text_findings(path, REPO)]
    _check("comments / docstrings citing SPEC (cite docs/METHOD.md's section or the paper) or naming an issue "
           "number (say what the code does and why)", findings)


def test_method_citations_name_existing_sections():
    sections = method_sections(REPO / "docs" / "METHOD.md")
    assert {"A1", "A2", "A3", "A4", "A5", "A5.1", "A5.2", "A7", "B1", "B2", "B3", "B4", "B5", "B6"} <= sections
    files = source_files(REPO, COMMENT_FOLDERS + ("tests",), SOURCE_SUFFIXES + (".yaml",))
    files += [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files = [f for f in files if f.relative_to(REPO).as_posix() not in CHECKER_FILES]
    unknown = [f"{where}: METHOD.md has no section {sid}" for path in files
               for where, sid in method_citations(path, REPO) if sid not in sections]
    _check("citations of docs/METHOD.md sections that do not exist", unknown)


def test_tests_package_is_this_repository_from_any_directory(tmp_path):
    """torch-fidelity installs a top-level `tests` package into site-packages; pyproject's `pythonpath = ["."]`
    keeps ours first even from another directory with --import-mode=append (where it was shadowed before;
    --noconftest only spares the subprocess the torch import of tests/conftest.py)."""
    cmd = [sys.executable, "-m", "pytest", "--import-mode=append", "--noconftest", "-p", "no:cacheprovider",
           "--collect-only", "-q", str(REPO / "tests" / "test_architecture.py")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "test_checker_finds_a_planted_layer_violation" in result.stdout, \
        result.stdout[-3000:] + result.stderr[-3000:]


# ------------------------------------------------------------------------------------- the checkers on planted trees
SYNTHETIC_LAYERS = (("leaf", ("pkg", "pkg.util")), ("low", ("pkg.low",)), ("high", ("pkg.high",)))


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, body in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))
    return tmp_path


def _synthetic(tmp_path: Path, files: dict[str, str]):
    repo = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/low/__init__.py": "", "pkg/high/__init__.py": "", **files})
    return _modules_and_imports(repo, roots={"pkg": "pkg", "pkg.ext": "ext"}, root="pkg")


def test_checker_finds_a_planted_layer_violation(tmp_path):
    modules, imports = _synthetic(tmp_path, {
        "pkg/util.py": "import os\n",
        "pkg/low/a.py": """\
            from pkg import util
            def f():
                from ..high import b
                return b
            """,
        "pkg/low/c.py": "import importlib\nM = importlib.import_module('pkg.high.b')\n",
        "pkg/high/b.py": "from pkg.low.a import f\nfrom . import d\n",
        "pkg/high/d.py": "from pkg.util import *\n",
        "ext/e.py": "from pkg.high import b\n",
        "pkg/stray.py": "",
    })
    assert unmapped_modules(modules, SYNTHETIC_LAYERS, "pkg") == ["pkg.ext.e", "pkg.stray"]
    assert layer_violations(imports, SYNTHETIC_LAYERS, "pkg") == [
        "pkg/low/a.py:3 imports pkg.high.b inside a function (layer 1 low -> layer 2 high)",
        "pkg/low/c.py:2 imports pkg.high.b (layer 1 low -> layer 2 high)",
    ]
    pairs = {(i.source, i.target) for i in imports}
    assert {("pkg.high.b", "pkg.high.d"), ("pkg.high.d", "pkg.util"), ("pkg.ext.e", "pkg.high.b")} <= pairs
    cycles = import_cycles(imports, lambda m: folder_of(m, _packages(modules), "pkg"))
    assert len(cycles) == 1 and cycles[0].startswith("cycle between pkg.high, pkg.low:")
    assert "shortest through pkg.high -> pkg.low -> pkg.high" in cycles[0]
    assert "pkg.low -> pkg.high: pkg/low/a.py:3, pkg/low/c.py:2" in cycles[0]
    assert "pkg.high -> pkg.low: pkg/high/b.py:1" in cycles[0]
    module_cycles = import_cycles(imports, lambda m: m)
    assert len(module_cycles) == 1 and module_cycles[0].startswith("cycle between pkg.high.b, pkg.low.a:")


def test_checker_passes_a_clean_tree(tmp_path):
    modules, imports = _synthetic(tmp_path, {
        "pkg/util.py": "",
        "pkg/low/a.py": "from pkg.util import x\nfrom . import c\n",
        "pkg/low/c.py": "",
        "pkg/high/b.py": "from pkg.low import a\ndef f():\n    from pkg.low.c import y\n",
    })
    assert not unmapped_modules(modules, SYNTHETIC_LAYERS, "pkg")
    assert not layer_violations(imports, SYNTHETIC_LAYERS, "pkg")
    assert not import_cycles(imports, lambda m: folder_of(m, _packages(modules), "pkg"))
    assert not import_cycles(imports, lambda m: m)


def test_length_checker(tmp_path):
    repo = _tree(tmp_path, {"src/ok.py": "x = 1\n" * MAX_LINES, "src/long.cu": "//\n" * (MAX_LINES + 1),
                            "src/data.json": "{}\n" * 1000})
    assert long_files(repo, ["src"]) == [f"src/long.cu: {MAX_LINES + 1} lines"]


def test_comment_checker(tmp_path):
    repo = _tree(tmp_path, {
        "m.py": '''\
            """Module docstring citing SPEC A2 and, on its second line,
            issue 8."""
            # a comment naming #14
            x = "a string citing SPEC B5 step 2, an issue 3 and #4 that are data"   # ok here
            def f():
                """Issue 12 item 2."""
                return "--tokenizer SPEC"   # a placeholder named SPEC is fine; so is 'issuer 9'
            ''',
        "k.cu": '// SPEC A5.1\nconst char* s = "// issue 5 in a string";  /* two-line\n   issue #7 */\n',
        "run.sh": '#!/bin/bash\necho "# issue 1" ${#arr[@]}  # SPEC B1\n',
    })
    found = [f for name in ("m.py", "k.cu", "run.sh") for f in text_findings(repo / name, repo)]
    assert found == [
        "m.py:1: cites 'SPEC A2'",
        "m.py:2: names an issue number: 'issue 8'",
        "m.py:3: names an issue number: '#14'",
        "m.py:4: cites 'SPEC B5'",
        "m.py:6: names an issue number: 'Issue 12'",
        "k.cu:1: cites 'SPEC A5.1'",
        "k.cu:3: names an issue number: 'issue #7'",
        "run.sh:2: cites 'SPEC B1'",
    ]


def test_method_citation_checker(tmp_path):
    repo = _tree(tmp_path, {
        "METHOD.md": "# Title\n## A1. One\n### A5.1. Sub\n## B2. Two\nA9. not a heading\n",
        "c.py": ('"""Cites METHOD.md A1 + A9 and METHOD.md A5.1, B2."""\n'
                 'x = 1  # METHOD.md B7\ny = "METHOD.md A9 in code"\n'),
    })
    assert method_sections(repo / "METHOD.md") == {"A1", "A5.1", "B2"}
    assert method_citations(repo / "c.py", repo) == [("c.py:1", "A1"), ("c.py:1", "A9"), ("c.py:1", "A5.1"),
                                                     ("c.py:1", "B2"), ("c.py:2", "B7"), ("c.py:3", "A9")]


def test_layers_name_each_folder_once():
    prefixes = [p for _, group in LAYERS for p in group]
    assert len(prefixes) == len(set(prefixes))
