"""Masking secrets in text: passwords inside URLs and libpq DSNs, and known secret values.

Pure functions of the text and the secrets handed in; `pipeline.config.secret_values()` knows
which values are secret (the fields marked secret, the passwords of DSN fields, CDC_*SECRET*,
*PASSWORD*, *TOKEN* variables and their *_FILE files).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
# libpq keywords whose values are secrets (PostgreSQL 15, "Parameter Key Words")
DSN_SECRET_KEYS = ("password", "sslpassword")
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^:/@\s]*:)(?P<password>[^@\s/]+)@")
PAIR_PASSWORD = re.compile(
    r"(?P<head>\b(?:ssl)?(?:password|passwd|pwd)\s*[=:]\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^\s&]+)"
)
SHORTEST_SECRET = 4  # shorter values are masked only where they sit in a URL or a pair


def mask_dsn(url: str) -> str:
    """A URL or libpq DSN with its secrets replaced by ***, so it can be logged or shown.

    Covers `scheme://user:password@host`, `?password=...` query parameters and key=value
    DSNs (`host=... password=... sslpassword='...'`). A DSN that names a service file has its
    secrets in that file, which is never read here.
    """
    masked = PAIR_PASSWORD.sub(rf"\g<head>{MASK}", url)
    try:
        parts = urlsplit(masked)
        password = parts.password
    except ValueError:
        return masked
    if password is None:
        return masked
    netloc = parts.netloc.replace(f":{password}@", f":{MASK}@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def dsn_passwords(url: str) -> set[str]:
    """The passwords of a URL or DSN, as written and decoded."""
    found = set()
    for match in PAIR_PASSWORD.finditer(url):
        value = match.group("value")
        if value.startswith("'"):  # libpq: \' and \\ inside quotes
            value = value[1:-1]
            found.add(re.sub(r"\\(.)", r"\1", value))
        found |= {value, unquote(value)}  # URL parameters are %XX-encoded
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        found |= {password, unquote(password)}
    return found


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced by ***; the longest go first, so none leaves a tail.

    Passwords in URLs and DSN pairs are masked whether or not they are among `secrets`.
    """
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= SHORTEST_SECRET:
            text = text.replace(secret, MASK)
    text = URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    return PAIR_PASSWORD.sub(rf"\g<head>{MASK}", text)
