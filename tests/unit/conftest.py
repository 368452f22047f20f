"""Unit tests run with no server at all: no MongoDB, PostgreSQL, S3, ClickHouse, chDB or luigid.

Enforced, not just promised: the session's server fixtures fail here, a network connection
fails, and chDB cannot be imported. CDC_* variables of the shell are ignored, so the settings
a test sees are the ones it writes.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest

NO_SERVERS = "unit tests talk to no server; put this test under tests/integration/"


@pytest.fixture(scope="session")
def stack_root() -> None:
    """Every server fixture of tests/conftest.py starts from this one."""
    pytest.fail(NO_SERVERS)


@pytest.fixture(autouse=True)
def _no_servers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refused(address: Any) -> None:
        raise AssertionError(f"{NO_SERVERS} (it connected to {address!r})")

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refused(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refused(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setitem(sys.modules, "chdb", None)  # `import chdb` raises ImportError
    for name in [n for n in os.environ if n.startswith("CDC_")]:
        monkeypatch.delenv(name)
    yield
