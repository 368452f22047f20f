"""Load: a staged batch -> the entity's raw table (the only writer of raw tables).

`raw` loads a batch exactly once, `drift` evolves the table's columns, `retention` bounds
full-scan copies, `keys` loads reconciliation key lists, `rehash` rewrites a batch's change
hashes after a `check_cols` change; `tasks` holds the Luigi task.
"""
