"""The README as data: its configuration tables equal the declarations in `pipeline.config`, so
they can never drift, and every block the integration tests run as written is found."""

from __future__ import annotations

import re

from pipeline.config import ENTITY_OPTIONS, ENV_ONLY, FIELDS
from pipeline.core.choices import SOURCES
from tests.support.readme import readme_blocks, section, tables


def _table(header: list[str]) -> list[list[str]]:
    """The one table of the "Configuration" section with this header row, without it."""
    found = [t for t in tables(section("Configuration")) if t[0] == header]
    assert len(found) == 1, f"expected one table headed {header} in README 'Configuration'"
    return found[0][1:]


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def test_configuration_table_is_fields() -> None:
    rows = _table(["variable", "`[cdc]` key", "meaning", "default", "example"])
    expected = [
        [_code(f.env or ""), _code(f.key), f.doc, _code(f.default), f.example] for f in FIELDS
    ]
    assert rows == expected


def test_environment_only_table_is_env_only() -> None:
    rows = _table(["variable", "meaning"])
    assert rows == [[_code(name), doc] for name, doc in ENV_ONLY.items()]


def test_entity_options_table_lists_each_option_once_with_its_sources_and_default() -> None:
    rows = _table(["option", "sources", "default", "meaning"])
    keys = [re.fullmatch(r"`(\w+)`", row[0]) for row in rows]
    assert all(keys), [row[0] for row in rows]
    assert [k.group(1) for k in keys if k] == [o.key for o in ENTITY_OPTIONS]
    for row, option in zip(rows, ENTITY_OPTIONS, strict=True):
        sources = "all" if set(option.sources) == set(SOURCES) else ", ".join(option.sources)
        assert row[1] == sources, option.key
        assert row[2].replace("`", "") == option.default, option.key
        assert row[3], f"{option.key} has no meaning in the README"


def test_the_table_parser_reads_cells_as_written() -> None:
    parsed = tables("text\n| a | b |\n|---|---|\n| `x` | y \\| z |\n|  | w |\n\nmore")
    assert parsed == [[["a", "b"], ["`x`", "y | z"], ["", "w"]]]


def test_every_tested_block_is_found() -> None:
    assert set(readme_blocks()) == {"cdc-check", "resume", "operations"}
