"""What log-based capture needs from the source, checked before anything is created.

Each problem names the table, the role or the setting, and carries the statement that removes
it. They run before the publication exists for a reason: a table without a replica identity
must never enter a publication, since from then on UPDATE and DELETE on it fail on the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.extract.pg_capture import Capture, fetchone

_SERVER = """
SELECT current_setting('wal_level'), current_user, current_database(),
       r.rolreplication OR r.rolsuper,
       current_setting('max_replication_slots')::int,
       (SELECT count(*) FROM pg_replication_slots)::int,
       has_database_privilege(current_database(), 'CREATE'),
       current_setting('synchronous_standby_names') <> '',
       pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
FROM pg_roles r WHERE r.rolname = current_user
"""
# the columns of an index, in index order, as a JSON array
_INDEX_COLUMNS = """
(SELECT json_agg(a.attname::text ORDER BY k.ord)
 FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
"""
_TABLE = f"""
SELECT c.relreplident, pg_get_userbyid(c.relowner),
       pg_has_role(current_user, c.relowner, 'USAGE'),
       has_table_privilege(c.oid, 'SELECT'),
       (SELECT {_INDEX_COLUMNS} FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       (SELECT {_INDEX_COLUMNS} FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident),
       (SELECT json_agg({_INDEX_COLUMNS}) FROM pg_index i
        WHERE i.indrelid = c.oid AND i.indisunique AND i.indpred IS NULL
          AND i.indexprs IS NULL),
       (SELECT json_agg(a.attname::text) FROM pg_attribute a
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND NOT a.attnotnull)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
"""
_PUBLICATION = """
SELECT p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate, p.puballtables,
       EXISTS (SELECT 1 FROM pg_publication_tables t
               WHERE t.pubname = p.pubname AND t.schemaname = %s AND t.tablename = %s),
       (SELECT count(*) FROM pg_publication_tables t WHERE t.pubname = p.pubname)::int
FROM pg_publication p WHERE p.pubname = %s
"""
_SLOT = "SELECT plugin, database FROM pg_replication_slots WHERE slot_name = %s"


@dataclass(frozen=True)
class Problem:
    """One reason capture cannot run, with the SQL statement that removes it."""

    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.message}\n    fix: {self.fix}"


class _Problems(list[Problem]):
    """Collects problems, rendering each fix with the connection's quoting."""

    def __init__(self, conn: Any, capture: Capture) -> None:
        super().__init__()
        self.conn, self.capture = conn, capture

    def add(self, message: str, fix: Any) -> None:
        text = fix if isinstance(fix, str) else fix.as_string(self.conn)
        self.append(Problem(message, text))


def check_capture(conn: Any, capture: Capture) -> list[Problem]:
    """Every reason `capture` cannot run as the connection's role; empty when it can."""
    problems = _Problems(conn, capture)
    server = fetchone(conn, _SERVER)
    _server_problems(problems, server)
    table = fetchone(conn, _TABLE, (capture.schema, capture.table))
    if table is None:
        problems.add(
            f"table {capture.qualified} does not exist (or is not a table) in database {server[2]}",
            "-- correct the entity's `table` setting, or create the table",
        )
        return list(problems)
    _identity_problems(problems, table)
    _privilege_problems(problems, server, table)
    publication = fetchone(conn, _PUBLICATION, (capture.schema, capture.table, capture.name))
    _publication_problems(problems, server, table, publication)
    return list(problems)


def require_capture(conn: Any, capture: Capture) -> None:
    """Raise one error listing every problem `check_capture` finds."""
    problems = check_capture(conn, capture)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise capture.error(
            f"log-based capture of table {capture.qualified} cannot start:\n{lines}"
        )


def _server_problems(problems: _Problems, server: tuple[Any, ...]) -> None:
    from psycopg2 import sql

    capture = problems.capture
    wal_level, role, database, can_replicate, max_slots, used_slots, _, synchronous, stats = server
    if wal_level != "logical":
        problems.add(
            f"setting wal_level is '{wal_level}' on the server of table {capture.qualified}:"
            " logical decoding needs 'logical'",
            "ALTER SYSTEM SET wal_level = logical;  -- as a superuser, then restart PostgreSQL",
        )
    if not can_replicate:
        problems.add(
            f"role {role} has no REPLICATION attribute, needed to create and read replication"
            f" slot {capture.name} for table {capture.qualified}",
            sql.SQL("ALTER ROLE {} REPLICATION;").format(sql.Identifier(role)),
        )
    if synchronous and not stats:
        problems.add(
            f"role {role} cannot see other sessions in pg_stat_activity while setting"
            f" synchronous_standby_names is set: the first load of table {capture.qualified}"
            " must see transactions still waiting for a standby",
            sql.SQL("GRANT pg_read_all_stats TO {};").format(sql.Identifier(role)),
        )
    slot = fetchone(problems.conn, _SLOT, (capture.name,))
    if slot is None and used_slots >= max_slots:
        problems.add(
            f"setting max_replication_slots ({max_slots}) is used up: no slot is left for table"
            f" {capture.qualified}",
            f"ALTER SYSTEM SET max_replication_slots = {max_slots + 1};  -- then restart",
        )
    if slot is not None and (slot[0] != "pgoutput" or slot[1] != database):
        problems.add(
            f"replication slot {capture.name} for table {capture.qualified} exists but is not a"
            f" pgoutput slot of database {database} (plugin {slot[0]}, database {slot[1]})",
            sql.SQL("SELECT pg_drop_replication_slot({});").format(sql.Literal(capture.name)),
        )


def _identity_problems(problems: _Problems, facts: tuple[Any, ...]) -> None:
    """A replica identity that keys every change by the entity's unique_key, and a unique
    index the first load can cut chunks by."""
    from psycopg2 import sql

    capture = problems.capture
    identity, _, _, _, primary_key, identity_index, unique_indexes, nullable = facts
    table = capture.table_sql()
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in capture.key)
    full = sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL;").format(table)
    columns = {"d": primary_key, "i": identity_index, "f": None, "n": None}[identity]
    if identity == "n" or (identity in "di" and not columns):
        kind = {"n": "NOTHING", "d": "DEFAULT", "i": "USING INDEX"}[identity]
        problems.add(
            f"table {capture.qualified} has no primary key and REPLICA IDENTITY {kind}: its"
            " updates and deletes cannot be captured, and in a publication UPDATE and DELETE"
            " on it fail on the source",
            sql.SQL("ALTER TABLE {t} ADD PRIMARY KEY ({k});  -- or: {f}").format(
                t=table, k=keys, f=full
            ),
        )
    elif columns and not set(capture.key) <= set(columns):
        problems.add(
            f"unique_key {list(capture.key)} of table {capture.qualified} is not within its"
            f" replica identity {columns}: deletes and key changes would not carry it",
            full,
        )
    for column in sorted(set(capture.key) & set(nullable or ())):
        problems.add(
            f"unique_key column {column!r} of table {capture.qualified} may be NULL: the first"
            " load cuts chunks by the key, and a NULL key is never in a chunk",
            sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL;").format(
                table, sql.Identifier(column)
            ),
        )
    if not any(set(index) <= set(capture.key) for index in unique_indexes or ()):
        problems.add(
            f"no primary key or unique index of table {capture.qualified} lies within unique_key"
            f" {list(capture.key)}: the first load cuts the table into chunks by it",
            sql.SQL("CREATE UNIQUE INDEX ON {} ({});").format(table, keys),
        )


def _privilege_problems(problems: _Problems, server: tuple[Any, ...], facts: Any) -> None:
    from psycopg2 import sql

    capture, role = problems.capture, server[1]
    if not facts[3]:
        problems.add(
            f"role {role} may not SELECT from table {capture.qualified} (the first load reads it)",
            sql.SQL("GRANT SELECT ON {} TO {};").format(capture.table_sql(), sql.Identifier(role)),
        )


def _publication_problems(
    problems: _Problems, server: tuple[Any, ...], table: tuple[Any, ...], publication: Any
) -> None:
    from psycopg2 import sql

    capture = problems.capture
    role, database, can_create = server[1], server[2], server[6]
    owner, owns = table[1], table[2]
    ident, pub = sql.Identifier, sql.Identifier(capture.name)
    if publication is None:
        if not can_create:
            problems.add(
                f"role {role} may not create publication {capture.name} for table"
                f" {capture.qualified}: it lacks CREATE on database {database}",
                sql.SQL("GRANT CREATE ON DATABASE {} TO {};").format(ident(database), ident(role)),
            )
        if not owns:
            problems.add(
                f"role {role} may not create publication {capture.name}: table"
                f" {capture.qualified} is owned by {owner}, and only its owner may publish it",
                sql.SQL(
                    "GRANT {o} TO {r};  -- or, as {o}: CREATE PUBLICATION {p} FOR TABLE {t};"
                ).format(o=ident(owner), r=ident(role), p=pub, t=capture.table_sql()),
            )
        return
    every_operation, all_tables, has_table, tables = publication
    if not has_table:
        problems.add(
            f"publication {capture.name} exists but does not publish table {capture.qualified}",
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {};").format(pub, capture.table_sql()),
        )
    if all_tables or tables > 1:
        problems.add(
            f"publication {capture.name} publishes other tables than {capture.qualified}",
            sql.SQL("DROP PUBLICATION {p}; CREATE PUBLICATION {p} FOR TABLE {t};").format(
                p=pub, t=capture.table_sql()
            ),
        )
    if not every_operation:
        problems.add(
            f"publication {capture.name} of table {capture.qualified} does not publish every"
            " operation",
            sql.SQL(
                "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');"
            ).format(pub),
        )
