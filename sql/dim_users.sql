-- Current users: the open version (dbt_valid_to IS NULL) of each user in the SCD2 snapshot.
-- materialized: table
-- order_by: ifNull(user_id, '')
-- tests:
--   user_id: [unique, not_null]
--   _id: [unique, not_null]
--   state: [{not_null: {severity: warn}}]
SELECT
    user_id,
    _id,
    firstName,
    lastName,
    occupation,
    state,
    dbt_valid_from AS valid_from,
    dbt_updated_at AS updated_at
FROM {{ database }}.users_snapshot
WHERE dbt_valid_to IS NULL
