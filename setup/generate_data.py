"""Demo source data: shop users in MongoDB, products and orders in PostgreSQL.

    python setup/generate_data.py [--users N] [--products N] [--orders N] [--seed S]
                                  [--env-file .stack/env]

Users carry no timestamps (the reason the pipeline snapshots them); products and orders carry
`updated_at`. Every load replaces the previous one, and the same seed gives the same rows
(timestamps are the same offsets from the time of the run), so a demo can be reset at will.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import accumulate, islice
from pathlib import Path
from typing import Any

DDL = Path(__file__).resolve().parent / "init" / "postgres.sql"
CHUNK = 10_000
ORDER_DAYS = 90
STATUSES = ("pending", "paid", "shipped", "delivered", "cancelled")
STATUS_WEIGHTS = (10, 15, 20, 45, 10)
PRODUCT_COLUMNS = ("product_id", "name", "category", "price", "created_at", "updated_at")
ORDER_COLUMNS = (
    "order_id",
    "user_id",
    "product_id",
    "quantity",
    "amount",
    "status",
    "created_at",
    "updated_at",
)
# A fixed ObjectId prefix: _id is a function of the user number, so reruns reproduce it.
OBJECT_ID_EPOCH = 1_700_000_000
OBJECT_ID_MIDDLE = bytes.fromhex("c0ffee0042")

FIRST_NAMES = (
    "Ada", "Adaeze", "Adebayo", "Adewale", "Aisha", "Amaka", "Amina", "Babajide", "Bisi",
    "Bola", "Chidi", "Chiamaka", "Chinedu", "Chioma", "Damilola", "Ebere", "Efe", "Emeka",
    "Esther", "Fatima", "Femi", "Funke", "Funmilayo", "Gbenga", "Hadiza", "Halima", "Ibrahim",
    "Ifeanyi", "Ifeoma", "Ikechukwu", "Jide", "Kelechi", "Kemi", "Kunle", "Ladi", "Musa",
    "Ngozi", "Nkechi", "Nnamdi", "Obinna", "Ogechi", "Olamide", "Olumide", "Oluwaseun",
    "Segun", "Seyi", "Sola", "Tari", "Temitope", "Tobi", "Tochukwu", "Tunde", "Uche", "Usman",
    "Yemi", "Yetunde", "Yusuf", "Zainab",
)  # fmt: skip
LAST_NAMES = (
    "Abubakar", "Adebayo", "Adeleke", "Adeyemi", "Afolabi", "Akande", "Akpan", "Aliyu", "Anyanwu",
    "Bakare", "Balogun", "Bello", "Chukwu", "Danjuma", "Eze", "Ezeh", "Fashola", "Ibekwe",
    "Idowu", "Igwe", "Musa", "Nwachukwu", "Nwankwo", "Obi", "Odukoya", "Ogunleye", "Ojo",
    "Okafor", "Okeke", "Okonkwo", "Okoro", "Olawale", "Onyeka", "Oyelaran", "Salami", "Sanni",
    "Suleiman", "Uchenna", "Udoh", "Umar", "Usman", "Yakubu",
)  # fmt: skip
OCCUPATIONS = (
    "Accountant", "Architect", "Banker", "Civil Servant", "Data Analyst", "Doctor", "Driver",
    "Electrician", "Engineer", "Entrepreneur", "Farmer", "Fashion Designer", "Journalist",
    "Lawyer", "Lecturer", "Mechanic", "Nurse", "Pharmacist", "Photographer", "Pilot",
    "Product Manager", "Sales Representative", "Software Developer", "Student", "Tailor",
    "Teacher", "Trader", "Civil Engineer", "Chef", "Musician",
)  # fmt: skip
# Nigeria's 36 states and the FCT, weighted roughly by how many online shoppers live there.
STATE_WEIGHTS = {
    "Lagos": 14, "Abuja FCT": 6, "Kano": 6, "Rivers": 5, "Oyo": 5, "Kaduna": 4, "Ogun": 4,
    "Anambra": 3, "Delta": 3, "Edo": 3, "Enugu": 3, "Imo": 3, "Akwa Ibom": 2, "Kwara": 2,
    "Osun": 2, "Ondo": 2, "Plateau": 2, "Abia": 2, "Borno": 2, "Katsina": 2, "Bauchi": 2,
    "Benue": 2, "Cross River": 2, "Niger": 2, "Sokoto": 1, "Adamawa": 1, "Bayelsa": 1,
    "Ebonyi": 1, "Ekiti": 1, "Gombe": 1, "Jigawa": 1, "Kebbi": 1, "Kogi": 1, "Nasarawa": 1,
    "Taraba": 1, "Yobe": 1, "Zamfara": 1,
}  # fmt: skip
STATES = tuple(STATE_WEIGHTS)
STATE_CUM_WEIGHTS = tuple(accumulate(STATE_WEIGHTS.values()))
# category -> (brands, (item, lowest price, highest price) in naira)
CATALOGUE: dict[str, tuple[tuple[str, ...], tuple[tuple[str, int, int], ...]]] = {
    "Phones": (
        ("Tecno", "Infinix", "Itel", "Samsung"),
        (("Smartphone", 85_000, 900_000), ("Feature Phone", 9_000, 25_000)),
    ),
    "Computing": (
        ("HP", "Lenovo", "Dell", "Logitech"),
        (("Laptop", 250_000, 1_800_000), ("Wireless Mouse", 4_000, 20_000)),
    ),
    "Electronics": (
        ("Oraimo", "JBL", "Hisense", "LG"),
        (("Bluetooth Speaker", 12_000, 120_000), ("Power Bank", 8_000, 35_000)),
    ),
    "Home & Kitchen": (
        ("Binatone", "Scanfrost", "Kenwood", "Qasa"),
        (("Blender", 18_000, 90_000), ("Rechargeable Fan", 25_000, 80_000)),
    ),
    "Groceries": (
        ("Mama Gold", "Royal Stallion", "Devon King's", "Golden Penny"),
        (("Rice 50kg", 60_000, 95_000), ("Vegetable Oil 5L", 9_000, 18_000)),
    ),
    "Fashion": (
        ("Vlisco", "Adire Lagos", "Nike", "Ceeon"),
        (("Ankara Fabric 6yd", 8_000, 40_000), ("Sneakers", 15_000, 120_000)),
    ),
    "Beauty": (
        ("Zaron", "House of Tara", "Nivea", "Arami"),
        (("Shea Butter", 2_000, 9_000), ("Fragrance", 10_000, 85_000)),
    ),
    "Books": (
        ("Cassava Republic", "Farafina", "Longman", "Macmillan"),
        (("Novel", 3_500, 15_000), ("Textbook", 6_000, 30_000)),
    ),
}
QUANTITY_WEIGHTS = (60, 20, 10, 6, 4)


def user_id(number: int) -> str:
    """The business key, e.g. USER00000001."""
    return f"USER{number:08d}"


def user_object_id(number: int) -> Any:
    """A reproducible ObjectId for the n-th user (its timestamp part is n seconds after a fixed
    epoch), so that reruns and simulated inserts never disagree about `_id`."""
    from bson import ObjectId

    raw = (OBJECT_ID_EPOCH + number).to_bytes(4, "big") + OBJECT_ID_MIDDLE
    return ObjectId(raw + (number % 2**24).to_bytes(3, "big"))


def make_user(rng: random.Random, number: int) -> dict[str, Any]:
    """One MongoDB user document, in the seed's shape."""
    return {
        "_id": user_object_id(number),
        "user_id": user_id(number),
        "firstName": rng.choice(FIRST_NAMES),
        "lastName": rng.choice(LAST_NAMES),
        "occupation": rng.choice(OCCUPATIONS),
        "state": rng.choices(STATES, cum_weights=STATE_CUM_WEIGHTS)[0],
    }


def make_products(rng: random.Random, count: int, now: datetime) -> list[tuple[Any, ...]]:
    """Products created before the order history starts; some were repriced since."""
    rows = []
    for product_id in range(1, count + 1):
        category = rng.choice(tuple(CATALOGUE))
        brands, items = CATALOGUE[category]
        item, low, high = rng.choice(items)
        price = Decimal(rng.randrange(low, high, 50)).quantize(Decimal("0.01"))
        created = now - timedelta(days=rng.uniform(ORDER_DAYS, 365))
        updated = created
        if rng.random() < 0.3:
            updated = created + (now - created) * rng.random()
        name = f"{rng.choice(brands)} {item} #{product_id}"
        rows.append((product_id, name, category, price, created, updated))
    return rows


def make_orders(
    rng: random.Random, count: int, users: int, prices: Sequence[Decimal], now: datetime
) -> Iterator[tuple[Any, ...]]:
    """Orders over the last ORDER_DAYS days; a pending order was never touched after creation."""
    for order_id in range(1, count + 1):
        product_id = rng.randint(1, len(prices))
        quantity = rng.choices(range(1, 6), weights=QUANTITY_WEIGHTS)[0]
        status = rng.choices(STATUSES, weights=STATUS_WEIGHTS)[0]
        created = now - timedelta(seconds=rng.uniform(0, ORDER_DAYS * 86_400))
        updated = created
        if status != "pending":
            updated = created + min(now - created, timedelta(days=14)) * rng.random()
        amount = prices[product_id - 1] * quantity
        user = user_id(rng.randint(1, users))
        yield (order_id, user, product_id, quantity, amount, status, created, updated)


def copy_rows(
    cursor: Any, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]
) -> int:
    """Load rows with COPY in chunks: orders of magnitude faster than INSERTs, bounded memory."""
    total = 0
    iterator = iter(rows)
    while chunk := list(islice(iterator, CHUNK * 10)):
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        for row in chunk:
            writer.writerow(v.isoformat() if isinstance(v, datetime) else v for v in row)
        buffer.seek(0)
        sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)"
        cursor.copy_expert(sql, buffer)
        total += len(chunk)
    return total


def load_users(mongo_uri: str, mongo_db: str, documents: Iterable[dict[str, Any]]) -> int:
    """Replace the users collection (drop first, so a rerun yields exactly this data)."""
    import pymongo

    total = 0
    with pymongo.MongoClient(mongo_uri) as client:
        collection = client[mongo_db]["users"]
        collection.drop()
        iterator = iter(documents)
        while chunk := list(islice(iterator, CHUNK)):
            collection.insert_many(chunk)
            total += len(chunk)
    return total


def load_postgres(
    postgres_dsn: str, products: Sequence[tuple[Any, ...]], orders: Iterable[tuple[Any, ...]]
) -> tuple[int, int]:
    """Create the tables if missing and replace their rows, in one transaction."""
    import psycopg2

    conn = psycopg2.connect(postgres_dsn)
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute(DDL.read_text())
            cursor.execute("TRUNCATE public.orders, public.products")
            loaded_products = copy_rows(cursor, "public.products", PRODUCT_COLUMNS, products)
            loaded_orders = copy_rows(cursor, "public.orders", ORDER_COLUMNS, orders)
    finally:
        conn.close()
    return loaded_products, loaded_orders


def generate(
    mongo_uri: str,
    mongo_db: str,
    postgres_dsn: str,
    users: int,
    products: int,
    orders: int,
    seed: int = 42,
) -> dict[str, int]:
    """Load a fresh, seeded data set into both sources; returns the row counts written."""
    if min(users, products, orders) < 0:
        raise ValueError("counts must not be negative")
    if orders and not (users and products):
        raise ValueError("orders need at least one user and one product to reference")
    rng = random.Random(seed)
    now = datetime.now(UTC)
    loaded_users = load_users(mongo_uri, mongo_db, (make_user(rng, n) for n in range(1, users + 1)))
    product_rows = make_products(rng, products, now)
    prices = [row[3] for row in product_rows]
    order_rows = make_orders(rng, orders, users, prices, now)
    loaded_products, loaded_orders = load_postgres(postgres_dsn, product_rows, order_rows)
    return {"users": loaded_users, "products": loaded_products, "orders": loaded_orders}


def read_env_file(path: Path) -> dict[str, str]:
    """`export NAME=value` lines, as written by `python -m pipeline.stack up`."""
    env = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "export":
            words = words[1:]
        if len(words) == 1 and "=" in words[0]:
            key, value = words[0].split("=", 1)
            env[key] = value
    return env


def source_settings(env_file: Path | None) -> dict[str, str]:
    """Connection settings from the environment; an explicit --env-file wins over it."""
    env = dict(os.environ)
    if env_file is not None:
        env.update(read_env_file(env_file))
    missing = [name for name in ("CDC_MONGO_URI", "CDC_POSTGRES_DSN") if not env.get(name)]
    if missing:
        raise SystemExit(
            f"error: {', '.join(missing)} not set: source .stack/env or pass --env-file"
        )
    return {
        "mongo_uri": env["CDC_MONGO_URI"],
        "mongo_db": env.get("CDC_MONGO_DB") or "source",
        "postgres_dsn": env["CDC_POSTGRES_DSN"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=150_000)
    parser.add_argument("--products", type=int, default=200)
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--env-file", type=Path, help="e.g. .stack/env")
    args = parser.parse_args(argv)
    settings = source_settings(args.env_file)
    started = time.monotonic()
    counts = generate(
        **settings, users=args.users, products=args.products, orders=args.orders, seed=args.seed
    )
    print(
        f"loaded {counts['users']} users into MongoDB {settings['mongo_db']}.users, "
        f"{counts['products']} products and {counts['orders']} orders into PostgreSQL "
        f"in {time.monotonic() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
