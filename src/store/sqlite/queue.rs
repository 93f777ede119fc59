//! Every SQL statement about jobs: enqueue (with ownership of the mirror name and dedupe), claim
//! with a lease (one writer per target tag), heartbeat, finish, retry, release, rescue. Writes of
//! a claimed job are guarded by its lease token.

use std::time::Duration;

use rand::Rng as _;
use serde::Serialize;
use sqlx::FromRow;

use super::db::{Db, now_ms};
use super::ledger::{self, NewRecord};
use super::outbox;
use crate::store::{
    Decision, Dedupe, JobReferrers, Landed, NewJob, NewNotice, NewRequest, ProgressRow,
};

/// A job as stored.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Job {
    pub id: i64,
    pub source: String,
    pub source_digest: Option<String>,
    pub target_repo: String,
    pub target_tag: Option<String>,
    pub state: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub run_at: i64,
    pub lease_expires_at: Option<i64>,
    pub last_error: Option<String>,
    pub requested_by: String,
    pub bytes_done: i64,
    pub bytes_total: i64,
    pub blobs_done: i64,
    pub blobs_total: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Whether referrers (signatures, attestations) are copied too.
    pub referrers: bool,
    /// Drift policy asked for (`follow`/`pin`); none means the service default.
    pub policy: Option<String>,
    /// Re-check every manifest on the target (drift repair), not only the top one.
    pub repair: bool,
    /// `copied` or `failed` once the job succeeded with referrers on (see [`ReferrersState`]).
    pub referrers_state: Option<String>,
    /// What could not be looked up or copied, as JSON.
    pub referrers_failed: Option<String>,
    /// Only these platforms (a JSON array), or the whole image (null).
    pub platforms: Option<String>,
}

/// A claimed job: the job and the lease that lets its worker write it.
#[derive(Debug, Clone)]
pub struct Lease {
    pub job: Job,
    pub token: String,
}

/// Why a request was not stored as a job.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The mirror repository already belongs to another source repository.
    #[error(
        "mirror repository {mirror_repo} belongs to {owner}; {requested} cannot be written there (name another target)"
    )]
    Owned {
        mirror_repo: String,
        owner: String,
        requested: String,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// A live job's row holds what the code never writes.
    #[error(transparent)]
    Corrupt(crate::store::Error),
}

/// A request stored, or joined to a live job.
#[derive(Debug, Clone)]
pub struct Enqueued {
    pub job: Job,
    pub dedupe: Dedupe,
}

/// The owner of `mirror_repo`, claiming it for `source_repo` if it has none yet.
async fn claim_owner(
    tx: &mut sqlx::SqliteConnection,
    mirror_repo: &str,
    source_repo: &str,
) -> sqlx::Result<String> {
    sqlx::query(
        "insert into mirror_owner (mirror_repo, source_repo, created_at) values (?1, ?2, ?3)
         on conflict (mirror_repo) do nothing",
    )
    .bind(mirror_repo)
    .bind(source_repo)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    sqlx::query_scalar("select source_repo from mirror_owner where mirror_repo = ?1")
        .bind(mirror_repo)
        .fetch_one(&mut *tx)
        .await
}

/// The source repository a mirror repository belongs to, if it was ever used.
pub async fn owner(db: &Db, mirror_repo: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("select source_repo from mirror_owner where mirror_repo = ?1")
        .bind(mirror_repo)
        .fetch_optional(&db.read)
        .await
}

/// Stores a job, or joins the live job for the same source and target (see `Dedupe`), inside
/// the caller's (immediate) transaction, to store other rows with the jobs.
pub async fn enqueue_in(
    tx: &mut sqlx::SqliteConnection,
    new: &NewJob,
) -> Result<Enqueued, EnqueueError> {
    let source = crate::store::source_repo(&new.source);
    let owner = claim_owner(tx, &new.target_repo, &source).await?;
    if owner != source {
        return Err(EnqueueError::Owned {
            mirror_repo: new.target_repo.clone(),
            owner,
            requested: source,
        });
    }
    let live: Vec<Job> = sqlx::query_as(
        "select * from job where source = ?1 and target_repo = ?2 and ifnull(target_tag, '') = ifnull(?3, '')
         and state in ('queued', 'running') order by id desc",
    )
    .bind(&new.source)
    .bind(&new.target_repo)
    .bind(&new.target_tag)
    .fetch_all(&mut *tx)
    .await?;
    let typed = live
        .iter()
        .cloned()
        .map(super::job)
        .collect::<Result<Vec<_>, _>>()
        .map_err(EnqueueError::Corrupt)?;
    let after = match crate::store::decide(&typed, new) {
        Decision::Join(i) => {
            return Ok(Enqueued {
                job: live[i].clone(),
                dedupe: Dedupe::Joined,
            });
        }
        Decision::Merge {
            index,
            referrers,
            policy,
            repair,
        } => {
            let job: Job = sqlx::query_as(
                "update job set referrers = ?1, policy = ?2, repair = ?3, updated_at = ?4 where id = ?5 returning *",
            )
            .bind(referrers)
            .bind(policy.map(|p| p.as_str()))
            .bind(repair)
            .bind(now_ms())
            .bind(live[index].id)
            .fetch_one(&mut *tx)
            .await?;
            return Ok(Enqueued {
                job,
                dedupe: Dedupe::Merged,
            });
        }
        Decision::Insert { after } => after,
    };
    let now = now_ms();
    let job: Job = sqlx::query_as(
        "insert into job (source, target_repo, target_tag, state, max_attempts, run_at, requested_by, created_at, updated_at, referrers, policy, repair, platforms)
         values (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?5, ?5, ?7, ?8, ?9, ?10) returning *",
    )
    .bind(&new.source)
    .bind(&new.target_repo)
    .bind(&new.target_tag)
    .bind(new.max_attempts)
    .bind(now)
    .bind(new.requested_by.to_string())
    .bind(new.referrers)
    .bind(new.policy.map(|p| p.as_str()))
    .bind(new.repair)
    .bind(
        new.platforms
            .as_ref()
            .map(|p| serde_json::Value::from(p.names().to_vec()).to_string()),
    )
    .fetch_one(&mut *tx)
    .await?;
    Ok(Enqueued {
        job,
        dedupe: after.map_or(Dedupe::New, Dedupe::QueuedAfter),
    })
}

/// A queued job `j` waits while an older live job writes the same target tag: one writer per
/// tag, in the order the requests came, so the tag ends at the newest request's digest.
macro_rules! not_waiting {
    () => {
        "(j.target_tag is null or not exists (
            select 1 from job o where o.target_repo = j.target_repo and ifnull(o.target_tag, '') = ifnull(j.target_tag, '')
                and o.state in ('queued', 'running') and o.id < j.id))"
    };
}

fn lease_token() -> String {
    hex::encode(rand::rng().random::<[u8; 16]>())
}

/// Claims the next due job for `lease`: one `UPDATE … RETURNING` that sets a fresh lease token.
/// Jobs whose lease expired (their worker died) go back to the queue first.
pub async fn claim(db: &Db, lease: Duration, announce: bool) -> sqlx::Result<Option<Lease>> {
    Ok(claim_group(db, lease, false, announce)
        .await?
        .into_iter()
        .next())
}

/// [`claim`], and with `siblings` the other queued and due jobs of the claimed job's requests
/// (one per other target), each with a lease token of its own, in the same transaction: the
/// worker copies them together, reading the source once. A sibling that waits for an older job
/// writing its tag is left queued. The claimed job comes first.
pub async fn claim_group(
    db: &Db,
    lease: Duration,
    siblings: bool,
    announce: bool,
) -> sqlx::Result<Vec<Lease>> {
    let now = now_ms();
    let token = lease_token();
    let mut tx = db.write.begin_with("BEGIN IMMEDIATE").await?;
    rescue(&mut tx, now, announce).await?;
    let job: Option<Job> = sqlx::query_as(concat!(
        "update job set state = 'running', attempts = attempts + 1, lease_token = ?2, lease_expires_at = ?3,
             started_at = ifnull(started_at, ?1), updated_at = ?1
         where id = (select j.id from job j where j.state = 'queued' and j.run_at <= ?1 and ",
        not_waiting!(),
        " order by j.run_at, j.id limit 1)
         returning *"
    ))
    .bind(now)
    .bind(&token)
    .bind(now + lease.as_millis() as i64)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(job) = job else {
        tx.commit().await?;
        return Ok(Vec::new());
    };
    let lead = job.id;
    let mut out = vec![Lease { job, token }];
    if siblings {
        let ids: Vec<i64> = sqlx::query_scalar(concat!(
            "select distinct j.id from job j join request_job rj on rj.job_id = j.id
             where rj.request_id in (select request_id from request_job where job_id = ?1)
                 and j.id <> ?1 and j.state = 'queued' and j.run_at <= ?2 and ",
            not_waiting!(),
            " order by j.id"
        ))
        .bind(lead)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for id in ids {
            let token = lease_token();
            let job: Option<Job> = sqlx::query_as(
                "update job set state = 'running', attempts = attempts + 1, lease_token = ?2, lease_expires_at = ?3,
                     started_at = ifnull(started_at, ?1), updated_at = ?1
                 where id = ?4 and state = 'queued' returning *",
            )
            .bind(now)
            .bind(&token)
            .bind(now + lease.as_millis() as i64)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            out.extend(job.map(|job| Lease { job, token }));
        }
    }
    tx.commit().await?;
    Ok(out)
}

/// Puts running jobs whose lease expired back in the queue (or fails them when their attempts are
/// spent, announcing their end when `announce`): a process killed mid-copy resumes after a restart.
async fn rescue(conn: &mut sqlx::SqliteConnection, now: i64, announce: bool) -> sqlx::Result<()> {
    let failed: Vec<Job> = sqlx::query_as(
        "update job set state = 'failed', lease_token = null, lease_expires_at = null, finished_at = ?1, updated_at = ?1,
             last_error = ifnull(last_error || '; ', '') || 'the worker running it stopped and no attempts are left'
         where state = 'running' and lease_expires_at < ?1 and attempts >= max_attempts
         returning *",
    )
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    if announce {
        for j in &failed {
            let ended = super::job(j.clone()).map_err(|e| sqlx::Error::Decode(e.into()))?;
            finish_notices(conn, j.id, &ended.end_notice(None)).await?;
        }
    }
    let failed = failed.len() as u64;
    let requeued = sqlx::query(
        "update job set state = 'queued', lease_token = null, lease_expires_at = null, updated_at = ?1
         where state = 'running' and lease_expires_at < ?1 and attempts < max_attempts",
    )
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if failed + requeued > 0 {
        tracing::warn!(
            requeued,
            failed,
            "rescued jobs whose worker stopped renewing its lease"
        );
    }
    Ok(())
}

/// Renews the lease and records progress. False when the lease is lost: stop writing.
pub async fn heartbeat(
    db: &Db,
    lease: &Lease,
    duration: Duration,
    p: ProgressRow,
) -> sqlx::Result<bool> {
    let now = now_ms();
    let n = sqlx::query(
        "update job set lease_expires_at = ?1, bytes_done = ?2, bytes_total = ?3, blobs_done = ?4, blobs_total = ?5, updated_at = ?6
         where id = ?7 and lease_token = ?8 and state = 'running'",
    )
    .bind(now + duration.as_millis() as i64)
    .bind(p.bytes_done)
    .bind(p.bytes_total)
    .bind(p.blobs_done)
    .bind(p.blobs_total)
    .bind(now)
    .bind(lease.job.id)
    .bind(&lease.token)
    .execute(&db.write)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Stores the digest the source resolved to (first attempt only). False when the lease is lost.
pub async fn set_source_digest(db: &Db, lease: &Lease, digest: &str) -> sqlx::Result<bool> {
    let n = sqlx::query(
        "update job set source_digest = ?1, updated_at = ?2 where id = ?3 and lease_token = ?4 and state = 'running'",
    )
    .bind(digest)
    .bind(now_ms())
    .bind(lease.job.id)
    .bind(&lease.token)
    .execute(&db.write)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Marks the job succeeded and appends its ledger record (and its notice, if given, to the
/// outbox), in one transaction. False (and nothing written) when the lease is lost.
pub async fn succeed(
    db: &Db,
    lease: &Lease,
    record: &NewRecord,
    p: ProgressRow,
    notice: Option<&NewNotice>,
    referrers: Option<&JobReferrers>,
) -> sqlx::Result<bool> {
    let now = now_ms();
    let mut tx = db.write.begin_with("BEGIN IMMEDIATE").await?;
    let n = sqlx::query(
        "update job set state = 'succeeded', lease_token = null, lease_expires_at = null, last_error = null,
             bytes_done = ?1, bytes_total = ?2, blobs_done = ?3, blobs_total = ?4, finished_at = ?5, updated_at = ?5,
             referrers_state = ?8, referrers_failed = ?9
         where id = ?6 and lease_token = ?7 and state = 'running'",
    )
    .bind(p.bytes_done)
    .bind(p.bytes_total)
    .bind(p.blobs_done)
    .bind(p.blobs_total)
    .bind(now)
    .bind(lease.job.id)
    .bind(&lease.token)
    .bind(referrers.map(|r| r.state.as_str()))
    .bind(referrers.map(|r| r.failed.to_string()))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    ledger::insert(&mut tx, record).await?;
    if let Some(n) = notice {
        finish_notices(&mut tx, lease.job.id, n).await?;
    }
    // Whatever drift this job was queued to follow or repair is settled by it.
    sqlx::query("update drift set resolved_at = ?1 where job_id = ?2 and resolved_at is null")
        .bind(now)
        .bind(lease.job.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// Puts the job back in the queue until `after` has passed, with the error that made it wait.
pub async fn retry_later(
    db: &Db,
    lease: &Lease,
    error: &str,
    after: Duration,
) -> sqlx::Result<bool> {
    let now = now_ms();
    let n = sqlx::query(
        "update job set state = 'queued', lease_token = null, lease_expires_at = null, last_error = ?1, run_at = ?2, updated_at = ?3
         where id = ?4 and lease_token = ?5 and state = 'running'",
    )
    .bind(error)
    .bind(now + after.as_millis() as i64)
    .bind(now)
    .bind(lease.job.id)
    .bind(&lease.token)
    .execute(&db.write)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Puts the job back in the queue to run at `run_at` (unix ms) without spending an attempt: a
/// registry's rate limit cut the attempt short, not a fault. Keeps the reason it waits.
pub async fn defer(db: &Db, lease: &Lease, error: &str, run_at: i64) -> sqlx::Result<bool> {
    requeue(db, lease, Some(error), run_at).await
}

/// Queued again at `run_at` with its attempt given back; `error` replaces the last error if given.
async fn requeue(db: &Db, lease: &Lease, error: Option<&str>, run_at: i64) -> sqlx::Result<bool> {
    let now = now_ms();
    let n = sqlx::query(
        "update job set state = 'queued', lease_token = null, lease_expires_at = null, attempts = max(attempts - 1, 0),
             last_error = ifnull(?1, last_error), run_at = ?2, updated_at = ?3
         where id = ?4 and lease_token = ?5 and state = 'running'",
    )
    .bind(error)
    .bind(run_at)
    .bind(now)
    .bind(lease.job.id)
    .bind(&lease.token)
    .execute(&db.write)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Marks the job failed for good, with the reason (and stores its notice, if given, in the same
/// transaction). False (and nothing written) when the lease is lost.
pub async fn fail(
    db: &Db,
    lease: &Lease,
    error: &str,
    notice: Option<&NewNotice>,
) -> sqlx::Result<bool> {
    let now = now_ms();
    let mut tx = db.write.begin_with("BEGIN IMMEDIATE").await?;
    let n = sqlx::query(
        "update job set state = 'failed', lease_token = null, lease_expires_at = null, last_error = ?1, finished_at = ?2, updated_at = ?2
         where id = ?3 and lease_token = ?4 and state = 'running'",
    )
    .bind(error)
    .bind(now)
    .bind(lease.job.id)
    .bind(&lease.token)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    if let Some(n) = notice {
        finish_notices(&mut tx, lease.job.id, n).await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Gives a job back to the queue at shutdown without spending an attempt.
pub async fn release(db: &Db, lease: &Lease) -> sqlx::Result<bool> {
    requeue(db, lease, None, now_ms()).await
}

/// One job by id.
pub async fn get(db: &Db, id: i64) -> sqlx::Result<Option<Job>> {
    sqlx::query_as("select * from job where id = ?1")
        .bind(id)
        .fetch_optional(&db.read)
        .await
}

/// Jobs newest first, optionally in one state, with ids below `before` (for paging).
pub async fn list(
    db: &Db,
    state: Option<&str>,
    limit: i64,
    before: Option<i64>,
) -> sqlx::Result<Vec<Job>> {
    sqlx::query_as(
        "select * from job where (?1 is null or state = ?1) and (?2 is null or id < ?2) order by id desc limit ?3",
    )
    .bind(state)
    .bind(before)
    .bind(limit)
    .fetch_all(&db.read)
    .await
}

/// Jobs per state, and the age (ms) of the oldest queued job, for metrics.
pub async fn stats(db: &Db) -> sqlx::Result<(Vec<(String, i64)>, Option<i64>)> {
    let by_state: Vec<(String, i64)> =
        sqlx::query_as("select state, count(*) from job group by state")
            .fetch_all(&db.read)
            .await?;
    let oldest: Option<i64> =
        sqlx::query_scalar("select min(created_at) from job where state = 'queued'")
            .fetch_one(&db.read)
            .await?;
    Ok((by_state, oldest.map(|t| now_ms() - t)))
}

/// When the next queued job is due (unix ms), to sleep exactly until then. A job waiting for
/// an older one on the same target tag is not counted: the worker that finishes the older one
/// claims again at once.
pub async fn next_due(db: &Db) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(concat!(
        "select min(j.run_at) from job j where j.state = 'queued' and ",
        not_waiting!()
    ))
    .fetch_one(&db.read)
    .await
}

/// The answer given to a GitHub delivery, if it was handled before.
pub async fn find_delivery(
    tx: &mut sqlx::SqliteConnection,
    delivery_id: &str,
) -> sqlx::Result<Option<(i64, String)>> {
    sqlx::query_as("select status, response from github_delivery where delivery_id = ?1")
        .bind(delivery_id)
        .fetch_optional(&mut *tx)
        .await
}

/// Remembers the answer to a GitHub delivery, in the transaction that enqueued its jobs.
pub async fn store_delivery(
    tx: &mut sqlx::SqliteConnection,
    delivery_id: &str,
    status: i64,
    response: &str,
) -> sqlx::Result<()> {
    sqlx::query("insert into github_delivery (delivery_id, status, response, created_at) values (?1, ?2, ?3, ?4)")
        .bind(delivery_id)
        .bind(status)
        .bind(response)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Stores request `r` whose targets got the jobs `jobs` (`(target, job id)`, in order).
pub async fn insert_request(
    tx: &mut sqlx::SqliteConnection,
    r: &NewRequest,
    jobs: &[(&str, i64)],
) -> sqlx::Result<i64> {
    let id: i64 = sqlx::query_scalar(
        "insert into request (source, requested_by, created_at) values (?1, ?2, ?3) returning id",
    )
    .bind(&r.source)
    .bind(r.requested_by.to_string())
    .bind(now_ms())
    .fetch_one(&mut *tx)
    .await?;
    for (position, (target, job_id)) in jobs.iter().enumerate() {
        sqlx::query(
            "insert into request_job (request_id, position, target, job_id) values (?1, ?2, ?3, ?4)",
        )
        .bind(id)
        .bind(position as i64)
        .bind(target)
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
    }
    Ok(id)
}

/// A request row.
#[derive(Debug, Clone, FromRow)]
pub struct RequestRow {
    pub id: i64,
    pub source: String,
    pub source_digest: Option<String>,
    pub requested_by: String,
    pub created_at: i64,
}

/// Request `id` and its `(target, job)`s in order.
pub async fn request(db: &Db, id: i64) -> sqlx::Result<Option<(RequestRow, Vec<(String, Job)>)>> {
    let mut conn = db.read.acquire().await?;
    request_on(&mut conn, id).await
}

/// [`request`] on `conn` (inside a transaction: what it wrote so far counts).
async fn request_on(
    conn: &mut sqlx::SqliteConnection,
    id: i64,
) -> sqlx::Result<Option<(RequestRow, Vec<(String, Job)>)>> {
    let Some(row): Option<RequestRow> = sqlx::query_as("select * from request where id = ?1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    #[derive(FromRow)]
    struct Targeted {
        target: String,
        #[sqlx(flatten)]
        job: Job,
    }
    let jobs: Vec<Targeted> = sqlx::query_as(
        "select rj.target as target, j.* from request_job rj join job j on j.id = rj.job_id
         where rj.request_id = ?1 order by rj.position",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some((
        row,
        jobs.into_iter().map(|t| (t.target, t.job)).collect(),
    )))
}

/// Stores the notices of job `job_id`'s end in `tx`, with its result: its own `notice`, unless
/// every request it belongs to names several targets — such a request announces itself once,
/// with every target's outcome, when this job is the last of its jobs to end.
async fn finish_notices(
    tx: &mut sqlx::SqliteConnection,
    job_id: i64,
    notice: &NewNotice,
) -> sqlx::Result<()> {
    let requests: Vec<(i64, i64)> = sqlx::query_as(
        "select rj.request_id, (select count(*) from request_job x where x.request_id = rj.request_id)
         from request_job rj where rj.job_id = ?1 group by rj.request_id order by rj.request_id",
    )
    .bind(job_id)
    .fetch_all(&mut *tx)
    .await?;
    if requests.is_empty() || requests.iter().any(|(_, targets)| *targets == 1) {
        outbox::insert(tx, notice).await?;
    }
    for (id, _) in requests.into_iter().filter(|(_, targets)| *targets > 1) {
        let Some((row, jobs)) = request_on(tx, id).await? else {
            continue;
        };
        let request = super::request_from(row, jobs).map_err(|e| sqlx::Error::Decode(e.into()))?;
        if !request.finished() {
            continue;
        }
        let landed: Vec<Landed> = sqlx::query_as::<_, (i64, String, String)>(
            "select job_id, mirror_repo, mirror_digest from mirror_record
             where job_id in (select job_id from request_job where request_id = ?1)",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|(job_id, mirror_repo, mirror_digest)| Landed {
            job_id,
            mirror_repo,
            mirror_digest,
        })
        .collect();
        outbox::insert(tx, &request.completion_notice(&landed)).await?;
    }
    Ok(())
}

/// The digest the first request of job `job_id` settled on, if any.
pub async fn request_digest(db: &Db, job_id: i64) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "select r.source_digest from request r
         where r.id = (select min(request_id) from request_job where job_id = ?1)",
    )
    .bind(job_id)
    .fetch_optional(&db.read)
    .await
    .map(Option::flatten)
}

/// Settles the first request of job `job_id` on `digest` unless it already has one; returns
/// the request's digest (`digest` for a job of no request).
pub async fn settle_request_digest(db: &Db, job_id: i64, digest: &str) -> sqlx::Result<String> {
    let settled: Option<String> = sqlx::query_scalar(
        "update request set source_digest = ifnull(source_digest, ?1)
         where id = (select min(request_id) from request_job where job_id = ?2)
         returning source_digest",
    )
    .bind(digest)
    .bind(job_id)
    .fetch_optional(&db.write)
    .await?;
    Ok(settled.unwrap_or_else(|| digest.to_string()))
}
