"""The test tree itself: two layers and their helpers, as README "Tests" describes.

`make test` runs `tests/unit` then `tests/integration`, so a test file anywhere else would never
run; and every directory is a package, so two files may share a name (`test_pipeline.py`).
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
LAYERS = ("unit", "integration")
HELPERS = ("support",)


def test_every_test_file_is_in_a_layer() -> None:
    stray = [
        str(p.relative_to(TESTS))
        for p in TESTS.rglob("test_*.py")
        if p.relative_to(TESTS).parts[0] not in LAYERS
    ]
    assert stray == []


def test_the_tree_holds_the_layers_and_their_helpers_only() -> None:
    dirs = {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert dirs == {*LAYERS, *HELPERS}


def test_every_directory_is_a_package() -> None:
    missing = [
        str(d.relative_to(TESTS))
        for d in [TESTS, *TESTS.rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and not (d / "__init__.py").exists()
    ]
    assert missing == []


def test_integration_mirrors_the_stage_packages() -> None:
    pipeline = TESTS.parent / "pipeline"
    for package in ("extract", "load", "snapshot", "marts", "ops", "warehouse"):
        assert (pipeline / package).is_dir(), package
        assert list((TESTS / "integration" / package).glob("test_*.py")), package
