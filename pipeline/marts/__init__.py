"""Marts: one ClickHouse SELECT per file under ``sql/``, built atomically and tested like dbt.

`project` loads the files and their dependency graph (found by sqlglot), `header` reads each
file's settings block, `build` materializes a mart, `data_tests` runs its tests; `tasks` holds
the Luigi task.
"""
