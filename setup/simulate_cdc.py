"""Simulated activity in both sources, to watch the pipeline capture changes.

    python setup/simulate_cdc.py --changes N [--seed S] [--env-file .stack/env]

MongoDB users: new sign-ups, people changing occupation or moving state, closed accounts.
PostgreSQL: new orders, orders moving along their lifecycle, repriced products, deleted orders.
Every PostgreSQL change sets `updated_at = now()`, as an application would; the MongoDB changes
leave no trace but the data itself. Which rows change, and how, depends only on the seed and
the data, so a run can be reproduced.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

if __package__:
    from .generate_data import OCCUPATIONS, STATES, make_user, source_settings
else:
    from generate_data import OCCUPATIONS, STATES, make_user, source_settings

# share of each kind of change, in percent of --changes
MIX = {
    "users_inserted": 15,
    "users_updated": 25,
    "users_deleted": 5,
    "orders_inserted": 20,
    "orders_updated": 20,
    "orders_deleted": 5,
    "products_updated": 10,
}
NEXT_STATUS = {
    "pending": ("paid", "cancelled"),
    "paid": ("shipped", "cancelled"),
    "shipped": ("delivered",),
}
USER_NUMBER = re.compile(r"USER(\d+)")
EXAMPLES = 3


def plan(changes: int) -> dict[str, int]:
    """Split N changes over the kinds in MIX; the counts add up to exactly N."""
    counts = {kind: changes * share // 100 for kind, share in MIX.items()}
    by_remainder = sorted(MIX, key=lambda kind: -(changes * MIX[kind] % 100))
    for kind in by_remainder[: changes - sum(counts.values())]:
        counts[kind] += 1
    return counts


def _other(rng: random.Random, choices: Sequence[str], current: Any) -> str:
    """A value different from the current one, so that every update is a real change."""
    return rng.choice([choice for choice in choices if choice != current])


def change_users(
    db: Any, rng: random.Random, counts: dict[str, int], done: dict[str, list[str]]
) -> list[str]:
    """Update, delete, then insert users; returns the user_ids that exist afterwards."""
    from pymongo import UpdateOne

    users = db["users"]
    ids = sorted(doc["user_id"] for doc in users.find({}, {"_id": 0, "user_id": 1}))
    n_update = min(counts["users_updated"], len(ids))
    n_delete = min(counts["users_deleted"], len(ids) - n_update)
    picked = rng.sample(ids, n_update + n_delete)
    to_update, to_delete = picked[:n_update], picked[n_update:]
    projection = {"_id": 0, "user_id": 1, "occupation": 1, "state": 1}
    current = {
        doc["user_id"]: doc for doc in users.find({"user_id": {"$in": to_update}}, projection)
    }
    updates = []
    for uid in to_update:
        field = rng.choice(("occupation", "state", "both"))
        change = {}
        if field in ("occupation", "both"):
            change["occupation"] = _other(rng, OCCUPATIONS, current[uid].get("occupation"))
        if field in ("state", "both"):
            change["state"] = _other(rng, STATES, current[uid].get("state"))
        updates.append(UpdateOne({"user_id": uid}, {"$set": change}))
    if updates:
        users.bulk_write(updates)
    if to_delete:
        users.delete_many({"user_id": {"$in": to_delete}})
    numbers = [int(m.group(1)) for uid in ids if (m := USER_NUMBER.fullmatch(uid))]
    first = max(numbers, default=0) + 1
    new_users = [make_user(rng, n) for n in range(first, first + counts["users_inserted"])]
    if new_users:
        users.insert_many(new_users)
    done["users_updated"], done["users_deleted"] = to_update, to_delete
    done["users_inserted"] = [doc["user_id"] for doc in new_users]
    deleted = set(to_delete)
    return [uid for uid in ids if uid not in deleted] + done["users_inserted"]


def change_postgres(
    cursor: Any,
    rng: random.Random,
    counts: dict[str, int],
    user_ids: Sequence[str],
    done: dict[str, list[str]],
) -> None:
    """Reprice products, move orders along, delete some, add new ones; updated_at = now()."""
    from psycopg2.extras import execute_values

    cursor.execute("SELECT product_id, price FROM public.products ORDER BY product_id")
    prices: dict[int, Decimal] = dict(cursor.fetchall())
    repriced = rng.sample(sorted(prices), min(counts["products_updated"], len(prices)))
    for product_id in repriced:
        factor = Decimal(rng.uniform(0.85, 1.2))
        new_price = (prices[product_id] * factor).quantize(Decimal("1")).quantize(Decimal("0.01"))
        prices[product_id] = new_price if new_price != prices[product_id] else new_price + 50
    if repriced:
        execute_values(
            cursor,
            "UPDATE public.products p SET price = v.price, updated_at = now() "
            "FROM (VALUES %s) AS v(product_id, price) WHERE p.product_id = v.product_id",
            [(product_id, prices[product_id]) for product_id in repriced],
        )

    cursor.execute(
        "SELECT order_id, status FROM public.orders WHERE status = ANY(%s) ORDER BY order_id",
        (list(NEXT_STATUS),),
    )
    open_orders: dict[int, str] = dict(cursor.fetchall())
    moved = rng.sample(sorted(open_orders), min(counts["orders_updated"], len(open_orders)))
    if moved:
        execute_values(
            cursor,
            "UPDATE public.orders o SET status = v.status, updated_at = now() "
            "FROM (VALUES %s) AS v(order_id, status) WHERE o.order_id = v.order_id",
            [(order_id, rng.choice(NEXT_STATUS[open_orders[order_id]])) for order_id in moved],
        )

    cursor.execute("SELECT order_id FROM public.orders ORDER BY order_id")
    all_orders = [row[0] for row in cursor.fetchall()]
    untouched = sorted(set(all_orders) - set(moved))
    deleted = rng.sample(untouched, min(counts["orders_deleted"], len(untouched)))
    if deleted:
        cursor.execute("DELETE FROM public.orders WHERE order_id = ANY(%s)", (deleted,))

    first = max(all_orders, default=0) + 1
    n_insert = counts["orders_inserted"] if user_ids and prices else 0
    new_orders = []
    for order_id in range(first, first + n_insert):
        product_id = rng.choice(sorted(prices))
        quantity = rng.randint(1, 3)
        amount = prices[product_id] * quantity
        new_orders.append((order_id, rng.choice(user_ids), product_id, quantity, amount))
    if new_orders:
        execute_values(
            cursor,
            "INSERT INTO public.orders (order_id, user_id, product_id, quantity, amount, status, "
            "created_at, updated_at) VALUES %s",
            new_orders,
            template="(%s, %s, %s, %s, %s, 'pending', now(), now())",
        )
    done["products_updated"] = [str(p) for p in repriced]
    done["orders_updated"] = [str(o) for o in moved]
    done["orders_deleted"] = [str(o) for o in deleted]
    done["orders_inserted"] = [str(row[0]) for row in new_orders]


def simulate(
    mongo_uri: str, mongo_db: str, postgres_dsn: str, changes: int, seed: int
) -> dict[str, int]:
    """Apply about `changes` changes across both sources, print them, and return the counts."""
    import psycopg2
    import pymongo

    rng = random.Random(seed)
    counts = plan(changes)
    done: dict[str, list[str]] = {}
    with pymongo.MongoClient(mongo_uri) as client:
        user_ids = change_users(client[mongo_db], rng, counts, done)
    conn = psycopg2.connect(postgres_dsn)
    try:
        with conn, conn.cursor() as cursor:
            change_postgres(cursor, rng, counts, user_ids, done)
    finally:
        conn.close()
    report(mongo_db, done)
    return {kind: len(done[kind]) for kind in MIX}


def report(mongo_db: str, done: dict[str, list[str]]) -> None:
    """Print what changed, with a few ids to look up in the warehouse afterwards."""

    def line(label: str, kind: str) -> str:
        ids = done[kind]
        more = ", ..." if len(ids) > EXAMPLES else ""
        examples = f" ({', '.join(ids[:EXAMPLES])}{more})" if ids else ""
        return f"  {len(ids):>6} {label}{examples}"

    print(f"MongoDB {mongo_db}.users:")
    print(line("users inserted", "users_inserted"))
    print(line("users with a new occupation and/or state", "users_updated"))
    print(line("users deleted", "users_deleted"))
    print("PostgreSQL public.orders / public.products:")
    print(line("orders inserted", "orders_inserted"))
    print(line("orders moved to a new status", "orders_updated"))
    print(line("orders deleted", "orders_deleted"))
    print(line("product prices changed", "products_updated"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, required=True, help="how many changes in total")
    parser.add_argument("--seed", type=int, help="default: a random one, printed")
    parser.add_argument("--env-file", type=Path, help="e.g. .stack/env")
    args = parser.parse_args(argv)
    if args.changes < 0:
        parser.error("--changes must not be negative")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"seed {seed} (pass --seed {seed} to repeat these changes on the same data)")
    simulate(**source_settings(args.env_file), changes=args.changes, seed=seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
