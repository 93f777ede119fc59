//! Every SQL statement about the notice outbox: notices are stored in the transaction that records
//! what they announce, then delivered (or given up on) by the sender in `notify`.

use sqlx::FromRow;

use super::db::{Db, now_ms};
use crate::store::{NewNotice, NoticeState};

/// A notice row (`event` and `state` as their names; see `NoticeEvent`, `NoticeState`).
#[derive(Debug, Clone, FromRow)]
pub struct Notice {
    pub id: i64,
    pub event: String,
    pub body: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub delivered_at: Option<i64>,
}

/// Stores `n` as pending, due now, inside the caller's transaction.
pub async fn insert(tx: &mut sqlx::SqliteConnection, n: &NewNotice) -> sqlx::Result<i64> {
    let now = now_ms();
    sqlx::query_scalar(
        "insert into notice (event, body, state, next_attempt_at, created_at, updated_at)
         values (?1, ?2, 'pending', ?3, ?3, ?3) returning id",
    )
    .bind(n.event.as_str())
    .bind(&n.body)
    .bind(now)
    .fetch_one(&mut *tx)
    .await
}

/// Takes up to `limit` pending notices due at `now`, oldest first: each is not due again for
/// `lease_ms` unless its attempt is recorded before.
pub async fn claim(db: &Db, now: i64, limit: i64, lease_ms: i64) -> sqlx::Result<Vec<Notice>> {
    let mut due: Vec<Notice> = sqlx::query_as(
        "update notice set next_attempt_at = ?1 + ?3
         where id in (select id from notice where state = 'pending' and next_attempt_at <= ?1
                      order by next_attempt_at, id limit ?2)
         returning *",
    )
    .bind(now)
    .bind(limit)
    .bind(lease_ms)
    .fetch_all(&db.write)
    .await?;
    due.sort_by_key(|n| n.id);
    Ok(due)
}

/// Makes taken notice `id` due at `now` again, its attempt not counted.
pub async fn release(db: &Db, id: i64, now: i64) -> sqlx::Result<()> {
    sqlx::query("update notice set next_attempt_at = ?1 where id = ?2 and state = 'pending'")
        .bind(now)
        .bind(id)
        .execute(&db.write)
        .await?;
    Ok(())
}

/// When the next pending notice is due (unix ms).
pub async fn next_due(db: &Db) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar("select min(next_attempt_at) from notice where state = 'pending'")
        .fetch_one(&db.read)
        .await
}

/// Marks notice `id` delivered (its attempts counted).
pub async fn delivered(db: &Db, id: i64) -> sqlx::Result<()> {
    let now = now_ms();
    sqlx::query(
        "update notice set state = 'delivered', attempts = attempts + 1, last_error = null, delivered_at = ?1, updated_at = ?1
         where id = ?2 and state = 'pending'",
    )
    .bind(now)
    .bind(id)
    .execute(&db.write)
    .await?;
    Ok(())
}

/// Records a failed attempt: pending again at `retry_at`, or failed for good when it is `None`.
pub async fn attempt_failed(
    db: &Db,
    id: i64,
    error: &str,
    retry_at: Option<i64>,
) -> sqlx::Result<()> {
    let now = now_ms();
    sqlx::query(
        "update notice set attempts = attempts + 1, last_error = ?1, updated_at = ?2,
             state = case when ?3 is null then 'failed' else 'pending' end,
             next_attempt_at = ifnull(?3, next_attempt_at)
         where id = ?4 and state = 'pending'",
    )
    .bind(error)
    .bind(now)
    .bind(retry_at)
    .bind(id)
    .execute(&db.write)
    .await?;
    Ok(())
}

/// Notices newest first, optionally in one state, with ids below `before` (for paging).
pub async fn list(
    db: &Db,
    state: Option<NoticeState>,
    limit: i64,
    before: Option<i64>,
) -> sqlx::Result<Vec<Notice>> {
    sqlx::query_as(
        "select * from notice where (?1 is null or state = ?1) and (?2 is null or id < ?2) order by id desc limit ?3",
    )
    .bind(state.map(NoticeState::as_str))
    .bind(before)
    .bind(limit)
    .fetch_all(&db.read)
    .await
}

/// Notices per state, for metrics.
pub async fn counts(db: &Db) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("select state, count(*) from notice group by state")
        .fetch_all(&db.read)
        .await
}
