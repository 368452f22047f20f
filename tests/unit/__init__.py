"""Tests with no server at all (enforced by conftest.py): `make unit`."""
