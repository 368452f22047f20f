-- Each current order with the user's state and occupation valid at the order's created_at.
--
-- Point-in-time join on users_snapshot: the version with
-- dbt_valid_from <= created_at < coalesce(dbt_valid_to, far future). Orders placed before the
-- user's history starts take the earliest known version; orders of unknown users, or placed
-- while the user did not exist (after a hard delete), get NULL. It runs on ClickHouse 18.16 too,
-- which has no window functions and no non-equi joins: each order is joined to every version of
-- its user and the version is picked with argMaxIf / argMinIf in a GROUP BY. Versions are
-- carried as tuples so a NULL state or occupation is picked, not skipped.
--
-- materialized: table
-- order_by: order_id
-- tests:
--   order_id: [unique, not_null]
--   user_id: [not_null, {relationships: {to: users_snapshot, field: user_id, severity: warn}}]
--   created_at: [not_null]
--   status: [{accepted_values: {values: [pending, paid, shipped, delivered, cancelled], severity: warn}}]
--   state: [{not_null: {severity: warn}}]
SELECT
    order_id,
    user_id,
    product_id,
    quantity,
    amount,
    status,
    created_at,
    updated_at,
    multiIf(
        max(in_effect) = 1, tupleElement(argMaxIf(version, v_valid_from, in_effect = 1), 1),
        ifNull(created_at < minIf(v_valid_from, has_version = 1), 0) = 1,
            tupleElement(argMinIf(version, v_valid_from, has_version = 1), 1),
        NULL
    ) AS state,
    multiIf(
        max(in_effect) = 1, tupleElement(argMaxIf(version, v_valid_from, in_effect = 1), 2),
        ifNull(created_at < minIf(v_valid_from, has_version = 1), 0) = 1,
            tupleElement(argMinIf(version, v_valid_from, has_version = 1), 2),
        NULL
    ) AS occupation
FROM
(
    SELECT
        order_id,
        user_id,
        product_id,
        quantity,
        amount,
        status,
        created_at,
        updated_at,
        has_version,
        v_valid_from,
        tuple(v_state, v_occupation) AS version,
        ifNull(
            has_version = 1
            AND v_valid_from <= created_at
            AND (v_valid_to IS NULL OR created_at < v_valid_to),
            0
        ) AS in_effect
    FROM
    (
        SELECT order_id, user_id, product_id, quantity, amount, status, created_at, updated_at
        FROM {{ database }}.orders_snapshot
        WHERE dbt_valid_to IS NULL
    ) AS orders
    ALL LEFT JOIN
    (
        SELECT
            assumeNotNull(user_id) AS user_id,
            toUInt8(1) AS has_version,
            dbt_valid_from AS v_valid_from,
            dbt_valid_to AS v_valid_to,
            state AS v_state,
            occupation AS v_occupation
        FROM {{ database }}.users_snapshot
        WHERE user_id IS NOT NULL
    ) AS versions
    USING user_id
) AS order_versions
GROUP BY order_id, user_id, product_id, quantity, amount, status, created_at, updated_at
