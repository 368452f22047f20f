"""Tests against the real servers of the session (tests/conftest.py starts them)."""
