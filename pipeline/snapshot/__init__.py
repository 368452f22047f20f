"""Snapshot: a raw batch -> SCD2 history that looks exactly like a dbt snapshot.

`diff` is the pure diff of Arrow tables (the semantics); `plan` the SQL a merge runs, as
strings; `storage` the versions table and its view; `merge` the phases of applying a batch;
`invariants` the checks; `maintenance` rebuild and adopt; `tasks` the Luigi task.
"""
