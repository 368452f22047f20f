"""README.md read as data: the blocks marked `<!-- tested: NAME -->`, and Markdown tables."""

from __future__ import annotations

import re

from tests.support import README

_BLOCK = re.compile(
    r"<!-- tested: (?P<name>[\w-]+)[^>]*-->\n(?P<indent> *)```\n(?P<body>.*?)\n *```", re.S
)


def readme_blocks() -> dict[str, str]:
    """Tested blocks by name, with the list-item indentation taken off."""
    blocks = {}
    for match in _BLOCK.finditer(README.read_text()):
        indent = len(match.group("indent"))
        lines = [line[indent:] for line in match.group("body").splitlines()]
        blocks[match.group("name")] = "\n".join(lines) + "\n"
    return blocks


def section(title: str) -> str:
    """The text of the `## title` (or `### title`) section, up to the next heading of its level."""
    text = README.read_text()
    match = re.search(rf"^(#+) {re.escape(title)}\n", text, re.M)
    assert match, f"README has no section {title!r}"
    level = len(match.group(1))
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in `text`: rows of cells (header row first, the rule row dropped)."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in _split_row(line.strip())]
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def _split_row(line: str) -> list[str]:
    """`| a | b \\| c |` -> ['a', 'b | c']: a backslash-escaped pipe stays inside its cell."""
    cells, cell, escaped = [], "", False
    for char in line[1:-1] if line.endswith("|") else line[1:]:
        if escaped:
            cell += char if char == "|" else "\\" + char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "|":
            cells.append(cell)
            cell = ""
        else:
            cell += char
    cells.append(cell + ("\\" if escaped else ""))
    return cells
