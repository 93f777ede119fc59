//! Periodic rounds once per interval across replicas: a slot row per round, the first insert wins.

use std::time::Duration;

use super::super::{Error, Round, RoundKind, RoundSlot, corrupt, parse_json};
use super::{PgStore, ms};

/// slot, replica, started_at, finished_at, result (JSON text).
type RoundRow = (i64, String, i64, Option<i64>, Option<String>);

/// An interval in ms, at least 1 (slots divide by it).
fn interval_ms(d: Duration) -> i64 {
    ms(d).max(1)
}

impl PgStore {
    pub(in crate::store) async fn claim_round(
        &self,
        kind: RoundKind,
        interval: Duration,
        replica: &str,
    ) -> Result<Option<RoundSlot>, Error> {
        let slot: Option<i64> = sqlx::query_scalar(
            "insert into round_slot (kind, slot, interval_ms, replica, started_at)
             values ($1, mm_now_ms() / $2, $2, $3, mm_now_ms())
             on conflict (kind, slot) do nothing
             returning slot",
        )
        .bind(kind.as_str())
        .bind(interval_ms(interval))
        .bind(replica)
        .fetch_optional(&self.pool)
        .await?;
        Ok(slot.map(|slot| RoundSlot { kind, slot }))
    }

    pub(in crate::store) async fn next_round_in(
        &self,
        interval: Duration,
    ) -> Result<Duration, Error> {
        let left: i64 = sqlx::query_scalar("select $1 - mm_now_ms() % $1")
            .bind(interval_ms(interval))
            .fetch_one(&self.pool)
            .await?;
        Ok(Duration::from_millis(left.max(0) as u64))
    }

    pub(in crate::store) async fn finish_round(
        &self,
        slot: RoundSlot,
        result: &serde_json::Value,
    ) -> Result<(), Error> {
        sqlx::query(
            "update round_slot set finished_at = mm_now_ms(), result = $3::jsonb
             where kind = $1 and slot = $2",
        )
        .bind(slot.kind.as_str())
        .bind(slot.slot)
        .bind(result.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(in crate::store) async fn last_round(
        &self,
        kind: RoundKind,
    ) -> Result<Option<Round>, Error> {
        let row: Option<RoundRow> = sqlx::query_as(
            "select slot, replica, started_at, finished_at, result::text from round_slot
             where kind = $1 and finished_at is not null order by finished_at desc, slot desc limit 1",
        )
        .bind(kind.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(slot, replica, started_at, finished_at, result)| {
            Ok(Round {
                kind,
                slot,
                replica,
                started_at,
                finished_at,
                result: result
                    .map(|r| parse_json("round result", &r))
                    .transpose()
                    .map_err(|_| corrupt("round result", "not JSON"))?,
            })
        })
        .transpose()
    }
}
