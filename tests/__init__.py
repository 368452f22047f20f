"""The test suite: `unit/` needs no server, `integration/` runs against real ones (README).

Shared fixtures (the session's servers) live in conftest.py; helpers in support/.
"""
