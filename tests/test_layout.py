"""Tests of the layout rules: shipped files stand alone, code is not repeated, marked copies stay copies."""

import ast
import importlib
import inspect
import re
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What users receive: the package (whose model files travel with every saved model), the scripts and the README.
SHIPPED = sorted(
    [*ROOT.glob("hf_aace/**/*.py"), *ROOT.glob("scripts/**/*.py"), *ROOT.glob("scripts/**/*.json"), ROOT / "README.md"]
)
CODE = sorted([*ROOT.glob("hf_aace/**/*.py"), *ROOT.glob("scripts/**/*.py")])
COPY_MARK = re.compile(r"#\s*Copied from ([\w.]+)(?: with (.+))?$")
BLOCK = 6


def test_shipped_files_mention_no_file_outside_the_repository():
    outside = re.compile(r"STACK\.md|PAPER\.md|checkpoint_layouts|shared/reference|\.\./shared")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in SHIPPED
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert not found, "shipped files point at files users do not have:\n" + "\n".join(found)


def _definitions(path: Path) -> dict[int, tuple[int, int]]:
    """Line index of each def/class statement -> (first, last) line index of the whole definition."""
    return {
        node.lineno - 1: (node.lineno - 1, node.end_lineno - 1)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }


def _marked_definition(lines: list[str], definitions: dict[int, tuple[int, int]], marker: int) -> tuple[int, int]:
    """The definition a `# Copied from` marker belongs to: on the marker's line, or the next statement."""
    start = marker if marker in definitions else marker + 1
    while start not in definitions and lines[start].lstrip().startswith("@"):
        start += 1
    if start not in definitions:
        raise AssertionError(f"line {marker + 1}: a '# Copied from' mark must stand on or above a def or class")
    return definitions[start]


def _copied_lines(path: Path, lines: list[str]) -> set[int]:
    """Indices of the lines that belong to a definition marked `# Copied from ...` (the marker's own line included)."""
    definitions = _definitions(path)
    copied = set()
    for index, line in enumerate(lines):
        if COPY_MARK.search(line.strip()):
            copied.update(range(index, _marked_definition(lines, definitions, index)[1] + 1))
    return copied


def _not_code_blocks(path: Path) -> set[int]:
    """Line indices of imports, def signatures and docstrings: they repeat by nature, not by copied logic."""
    ignored = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            ignored.update(range(node.lineno - 1, node.end_lineno))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                ignored.update(range(node.lineno - 1, node.body[0].lineno - 1))
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                ignored.update(range(first.lineno - 1, first.end_lineno))
    return ignored


def _significant(line: str) -> str | None:
    """A line as compared for repetition: stripped; None for blank lines, comments and bare punctuation."""
    text = line.strip()
    if not text or text.startswith("#") or not re.search(r"\w", text):
        return None
    return text


def test_no_block_of_six_lines_repeats_outside_marked_copies():
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in CODE:
        lines = path.read_text().splitlines()
        copied = _copied_lines(path, lines) | _not_code_blocks(path)
        kept = [
            (number, text)
            for number, line in enumerate(lines)
            if number not in copied and (text := _significant(line))
        ]
        for start in range(len(kept) - BLOCK + 1):
            window = tuple(text for _, text in kept[start : start + BLOCK])
            # Short lines (closing brackets, `return x`) make no block by themselves.
            if sum(len(text) > 20 for text in window) >= BLOCK // 2:
                seen[window].append(f"{path.relative_to(ROOT)}:{kept[start][0] + 1}")
    repeated = {window: places for window, places in seen.items() if len(places) > 1}
    assert not repeated, "blocks repeated without a '# Copied from' mark:\n" + "\n".join(
        f"{', '.join(places)}:\n    " + "\n    ".join(window) for window, places in list(repeated.items())[:5]
    )


def _marked_copies() -> list[tuple[Path, int, str, str | None]]:
    return [
        (path, number, match.group(1), match.group(2))
        for path in CODE
        for number, line in enumerate(path.read_text().splitlines())
        if (match := COPY_MARK.search(line.strip()))
    ]


def _object(dotted: str):
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            target = getattr(target, name)
        return target
    raise ImportError(dotted)


@pytest.mark.parametrize(
    "path, number, source, replacements",
    _marked_copies(),
    ids=lambda value: str(value.relative_to(ROOT)) if isinstance(value, Path) else None,
)
def test_marked_copies_equal_their_source(path, number, source, replacements):
    """Each `# Copied from X with A->B` definition is X's source with A replaced by B: the copies stay in sync."""
    lines = path.read_text().splitlines()
    first, last = _marked_definition(lines, _definitions(path), number)
    copy = textwrap.dedent("\n".join(lines[first : last + 1])).strip()
    original = textwrap.dedent(inspect.getsource(_object(source))).strip()
    original = "\n".join(line for line in original.splitlines() if not line.lstrip().startswith("@"))
    for replacement in (replacements or "").split(","):
        if replacement.strip():
            old, new = (part.strip() for part in replacement.split("->"))
            original = original.replace(old, new)
    strip_marks = lambda text: "\n".join(COPY_MARK.sub("", line).rstrip() for line in text.splitlines())  # noqa: E731
    assert strip_marks(copy) == strip_marks(original), f"{path.relative_to(ROOT)}:{number + 1} differs from {source}"


def test_every_module_parses_and_package_modules_log_through_transformers():
    """Library modules report through transformers' logging, never print (scripts print)."""
    printing = []
    for path in ROOT.glob("hf_aace/**/*.py"):
        tree = ast.parse(path.read_text())
        printing += [
            f"{path.relative_to(ROOT)}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
        ]
    assert not printing, f"print() in the package: {printing}"
