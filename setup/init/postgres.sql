-- Source tables of the demo shop (PostgreSQL side). Idempotent: generate_data.py runs it on
-- every load, and the postgres image runs it once from /docker-entrypoint-initdb.d.
-- `updated_at` drives incremental extraction, hence its index.

CREATE TABLE IF NOT EXISTS public.products (
    product_id  integer PRIMARY KEY,
    name        text,
    category    text,
    price       numeric(10, 2),
    created_at  timestamptz DEFAULT now(),
    updated_at  timestamptz DEFAULT now()
);

CREATE INDEX IF NOT EXISTS products_updated_at_idx ON public.products (updated_at);

CREATE TABLE IF NOT EXISTS public.orders (
    order_id    bigint PRIMARY KEY,
    user_id     text,
    product_id  integer,
    quantity    integer,
    amount      numeric(12, 2),
    status      text,
    created_at  timestamptz DEFAULT now(),
    updated_at  timestamptz DEFAULT now()
);

CREATE INDEX IF NOT EXISTS orders_updated_at_idx ON public.orders (updated_at);
