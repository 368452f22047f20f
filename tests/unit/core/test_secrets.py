"""`pipeline.core.secrets`: passwords masked in URLs and libpq DSNs, known secrets redacted."""

from __future__ import annotations

import pytest

from pipeline.core.secrets import MASK, SHORTEST_SECRET, dsn_passwords, mask_dsn, redact

# (DSN, masked, passwords)
DSNS = [
    ("postgresql://u:pw1@h:5432/db", "postgresql://u:***@h:5432/db", {"pw1"}),
    ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db", {"p%40ss", "p@ss"}),
    (
        "clickhouse://default:s3cr3t@127.0.0.1:9000",
        "clickhouse://default:***@127.0.0.1:9000",
        {"s3cr3t"},
    ),
    (
        "mongodb://app:pw@h1:1,h2:2/db?replicaSet=r",
        "mongodb://app:***@h1:1,h2:2/db?replicaSet=r",
        {"pw"},
    ),
    (
        "postgresql://u@h/db?password=qpw&sslmode=require",
        "postgresql://u@h/db?password=***&sslmode=require",
        {"qpw"},
    ),
    (
        "postgresql://h/db?sslpassword=sp1&password=pw2",
        "postgresql://h/db?sslpassword=***&password=***",
        {"sp1", "pw2"},
    ),
    ("host=db user=u password=kvpw dbname=x", "host=db user=u password=*** dbname=x", {"kvpw"}),
    ("host=db password = spaced user=u", "host=db password = *** user=u", {"spaced"}),
    ("host=db password='two words' user=u", "host=db password=*** user=u", {"two words"}),
    ("host=db sslpassword='key pass' sslkey=/k", "host=db sslpassword=*** sslkey=/k", {"key pass"}),
    (
        "host=db password='it\\'s \\\\ here' user=u",
        "host=db password=*** user=u",
        {"it\\'s \\\\ here", "it's \\ here"},
    ),
    ("host=db user=u", "host=db user=u", set()),
    (
        "postgresql://postgres@127.0.0.1:5434/source",
        "postgresql://postgres@127.0.0.1:5434/source",
        set(),
    ),
    ("chdb:///var/lib/cdc/warehouse", "chdb:///var/lib/cdc/warehouse", set()),
    ("s3://cdc-staging/prefix/", "s3://cdc-staging/prefix/", set()),
]


@pytest.mark.parametrize(("dsn", "masked", "passwords"), DSNS)
def test_mask_dsn(dsn: str, masked: str, passwords: set[str]) -> None:
    assert mask_dsn(dsn) == masked
    for password in passwords:
        assert password not in mask_dsn(dsn)


@pytest.mark.parametrize(("dsn", "masked", "passwords"), DSNS)
def test_dsn_passwords_as_written_and_as_the_server_reads_them(
    dsn: str, masked: str, passwords: set[str]
) -> None:
    assert dsn_passwords(dsn) == passwords


def test_query_parameter_passwords_are_also_known_decoded() -> None:
    """libpq decodes %XX in URL parameters: the password it sends is `p@ss`."""
    assert dsn_passwords("postgresql://u@h/db?password=p%40ss") == {"p%40ss", "p@ss"}


def test_redact_replaces_the_longest_secret_first() -> None:
    text = "token abcdef-123456 and abcdef alone"
    assert redact(text, {"abcdef", "abcdef-123456"}) == "token *** and *** alone"


def test_redact_masks_url_and_pair_passwords_it_was_not_told_about() -> None:
    text = "failed: postgresql://u:unknown1@h/db and host=x password=unknown2 sslpassword='a b'"
    assert redact(text, set()) == (
        "failed: postgresql://u:***@h/db and host=x password=*** sslpassword=***"
    )


def test_short_values_are_not_masked_everywhere() -> None:
    """A 3-character secret would mask every 'abc' in a log; inside a URL or pair it still goes."""
    short = "a" * (SHORTEST_SECRET - 1)
    text = f"{short} x://u:{short}@h password={short}"
    assert redact(text, {short}) == f"{short} x://u:{MASK}@h password={MASK}"
    four = "b" * SHORTEST_SECRET
    assert redact(f"say {four}", {four}) == "say ***"


def test_redact_leaves_text_without_secrets_alone() -> None:
    text = "loaded 5 rows into raw_users (batch 20240101T000000Z) from s3://bucket/x"
    assert redact(text, {"not-in-there"}) == text
