//! The notice outbox on PostgreSQL: notices inserted in the transaction that records what they
//! announce; senders on any replica take due rows with `FOR UPDATE SKIP LOCKED` and push them
//! ahead by a lease, so no two replicas send the same notice at once.

use std::time::Duration;

use sqlx::{FromRow, PgConnection};

use super::super::{Error, NewNotice, Notice, NoticeState, corrupt};
use super::{PgStore, ms};

#[derive(FromRow)]
struct NoticeRow {
    id: i64,
    event: String,
    body: String,
    state: String,
    attempts: i64,
    next_attempt_at: i64,
    last_error: Option<String>,
    created_at: i64,
    updated_at: i64,
    delivered_at: Option<i64>,
}

impl NoticeRow {
    fn into_notice(self) -> Result<Notice, Error> {
        Ok(Notice {
            event: self
                .event
                .parse()
                .map_err(|_| corrupt("notice event", &self.event))?,
            state: self
                .state
                .parse()
                .map_err(|_| corrupt("notice state", &self.state))?,
            id: self.id,
            body: self.body,
            attempts: self.attempts,
            next_attempt_at: self.next_attempt_at,
            last_error: self.last_error,
            created_at: self.created_at,
            updated_at: self.updated_at,
            delivered_at: self.delivered_at,
        })
    }
}

fn notices(rows: Vec<NoticeRow>) -> Result<Vec<Notice>, Error> {
    rows.into_iter().map(NoticeRow::into_notice).collect()
}

/// Stores `n` as pending, due now, inside the caller's transaction.
pub(super) async fn insert(tx: &mut PgConnection, n: &NewNotice) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "insert into notice (event, body, state, next_attempt_at, created_at, updated_at)
         values ($1, $2, 'pending', mm_now_ms(), mm_now_ms(), mm_now_ms()) returning id",
    )
    .bind(n.event.as_str())
    .bind(&n.body)
    .fetch_one(&mut *tx)
    .await
}

impl PgStore {
    pub(in crate::store) async fn claim_notices(
        &self,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<Notice>, Error> {
        let mut rows: Vec<NoticeRow> = sqlx::query_as(
            "with due as materialized (
                 select id from notice where state = 'pending' and next_attempt_at <= mm_now_ms()
                 order by next_attempt_at, id limit $1 for update skip locked)
             update notice n set next_attempt_at = mm_now_ms() + $2 from due where n.id = due.id
             returning n.*",
        )
        .bind(limit)
        .bind(ms(lease))
        .fetch_all(&self.pool)
        .await?;
        rows.sort_by_key(|n| n.id);
        notices(rows)
    }

    pub(in crate::store) async fn release_notice(&self, id: i64) -> Result<(), Error> {
        sqlx::query(
            "update notice set next_attempt_at = mm_now_ms() where id = $1 and state = 'pending'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(in crate::store) async fn next_notice_in(&self) -> Result<Option<Duration>, Error> {
        let wait: Option<i64> = sqlx::query_scalar(
            "select min(next_attempt_at) - mm_now_ms() from notice where state = 'pending'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(wait.map(|w| Duration::from_millis(w.max(0) as u64)))
    }

    pub(in crate::store) async fn notice_delivered(&self, id: i64) -> Result<(), Error> {
        sqlx::query(
            "update notice set state = 'delivered', attempts = attempts + 1, last_error = null,
                 delivered_at = mm_now_ms(), updated_at = mm_now_ms()
             where id = $1 and state = 'pending'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(in crate::store) async fn notice_failed(
        &self,
        id: i64,
        error: &str,
        retry_after: Option<Duration>,
    ) -> Result<(), Error> {
        sqlx::query(
            "update notice set attempts = attempts + 1, last_error = $1, updated_at = mm_now_ms(),
                 state = case when $2::bigint is null then 'failed' else 'pending' end,
                 next_attempt_at = coalesce(mm_now_ms() + $2::bigint, next_attempt_at)
             where id = $3 and state = 'pending'",
        )
        .bind(error)
        .bind(retry_after.map(ms))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(in crate::store) async fn notices(
        &self,
        state: Option<NoticeState>,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<Notice>, Error> {
        notices(
            sqlx::query_as(
                "select * from notice where ($1::text is null or state = $1)
                     and ($2::bigint is null or id < $2) order by id desc limit $3",
            )
            .bind(state.map(NoticeState::as_str))
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?,
        )
    }

    pub(in crate::store) async fn notice_counts(&self) -> Result<Vec<(NoticeState, i64)>, Error> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("select state, count(*) from notice group by state")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(s, n)| Ok((s.parse().map_err(|_| corrupt("notice state", s))?, n)))
            .collect()
    }
}
