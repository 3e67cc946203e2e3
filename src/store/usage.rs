//! Usage counters in Postgres: operations per client, key and day.

use uuid::Uuid;

use super::keys::ts;
use super::{Store, StoreError};

/// Operations counted for a client (and key; nil when none) on a day (unix seconds at 00:00 UTC).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageRow {
    /// The client.
    pub client_id: Uuid,
    /// The managed key or secret, nil for stateless calls.
    pub key_id: Uuid,
    /// The operation, e.g. `datakey`, `key.read`.
    pub operation: String,
    /// The day.
    pub day: i64,
    /// How many.
    pub count: i64,
}

impl Store {
    /// Adds operation counts.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn add_usage(&self, rows: &[UsageRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let clients: Vec<Uuid> = rows.iter().map(|r| r.client_id).collect();
        let keys: Vec<Uuid> = rows.iter().map(|r| r.key_id).collect();
        let operations: Vec<String> = rows.iter().map(|r| r.operation.clone()).collect();
        let days: Vec<f64> = rows.iter().map(|r| ts(r.day)).collect();
        let counts: Vec<i64> = rows.iter().map(|r| r.count).collect();
        sqlx::query(
            "INSERT INTO usage_daily (client_id, key_id, operation, day, count)
             SELECT c, k, o, (to_timestamp(d) AT TIME ZONE 'UTC')::date, n
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::float8[], $5::bigint[])
                  AS t(c, k, o, d, n)
             ON CONFLICT (client_id, key_id, operation, day)
             DO UPDATE SET count = usage_daily.count + EXCLUDED.count",
        )
        .bind(&clients)
        .bind(&keys)
        .bind(&operations)
        .bind(&days)
        .bind(&counts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Operation counts since `since` (unix seconds), for one client and/or key.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn usage(
        &self,
        client: Option<Uuid>,
        key: Option<Uuid>,
        since: i64,
    ) -> Result<Vec<UsageRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT client_id, key_id, operation,
                    extract(epoch FROM day::timestamp)::bigint AS day, count
             FROM usage_daily
             WHERE ($1::uuid IS NULL OR client_id = $1) AND ($2::uuid IS NULL OR key_id = $2)
               AND day >= (to_timestamp($3) AT TIME ZONE 'UTC')::date
             ORDER BY day, client_id, key_id, operation LIMIT 10000",
        )
        .bind(client)
        .bind(key)
        .bind(ts(since))
        .fetch_all(&self.pool)
        .await?)
    }
}
