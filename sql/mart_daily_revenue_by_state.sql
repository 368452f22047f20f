-- Per day of created_at (UTC) and the user's state valid then: the number of orders and their
-- revenue (sum of amount), both over orders whose status is not 'cancelled'.
-- materialized: table
-- order_by: order_date
-- partition_by: toYYYYMM(order_date)
-- tests:
--   order_date: [not_null]
--   orders: [not_null]
--   revenue: [not_null]
--   state: [{not_null: {severity: warn}}]
SELECT
    toDate(assumeNotNull(created_at)) AS order_date,
    state,
    count() AS orders,
    sum(amount) AS revenue
FROM {{ database }}.fct_orders
WHERE created_at IS NOT NULL AND status != 'cancelled'
GROUP BY order_date, state
