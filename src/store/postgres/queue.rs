//! Jobs on PostgreSQL: enqueue (ownership, dedupe, one writer per target tag), claim, lease
//! writes, look-ups. Every "now" is the database's (`mm_now_ms()`), so replicas whose clocks
//! disagree still agree on leases and due times.
//!
//! **Dedupe and order.** Issue 12's rules allow several live jobs per source and target (one
//! running, one queued after it), and a job put back in the queue (retry, defer, release) may
//! meet a queued one, so a unique index over queued jobs would refuse legitimate states.
//! Instead an enqueue takes a transaction-scoped advisory lock per target repository (all the
//! batch's keys, sorted, in one call to `mm_lock_keys`) before it reads the live jobs: two
//! replicas enqueueing for the same repository take turns, the decision (join, merge, insert
//! after) sees every committed job, and ids on one target tag are handed out in commit order — so
//! "no older live job on this tag" really means the request came first. Repositories that
//! differ proceed in parallel. Sorted keys and locks taken before any row is written mean two
//! batches never deadlock.

use std::time::Duration;

use rand::Rng as _;
use sha2::Digest as _;
use sqlx::{FromRow, PgConnection};

use super::super::{
    Delivery, EnqueueError, Enqueued, Error, Job, JobState, JobStats, Landed, Lease, NewJob,
    NewNotice, NewRequest, ProgressRow, Request, RequestEnqueued, corrupt, parse_json,
    parse_policy,
};
use super::enqueue::{RequestRow, begin, enqueue_all};
use super::{CHANNEL, PgStore, ms};

/// The job columns, JSON as text (decoded at the edge, in [`JobRow::into_job`]).
macro_rules! job_columns {
    () => {
        "id, source, source_digest, target_repo, target_tag, state, attempts, max_attempts, run_at,
    lease_expires_at, last_error, requested_by::text as requested_by, bytes_done, bytes_total, blobs_done, blobs_total,
    created_at, updated_at, started_at, finished_at, referrers, policy, repair, referrers_state,
    referrers_failed::text as referrers_failed, platforms::text as platforms"
    };
}
pub(super) use job_columns;

/// A job as read (JSON as text); also decoded from `json_agg` of the same columns.
#[derive(FromRow, serde::Deserialize)]
pub(super) struct JobRow {
    id: i64,
    source: String,
    source_digest: Option<String>,
    target_repo: String,
    target_tag: Option<String>,
    state: String,
    attempts: i64,
    max_attempts: i64,
    run_at: i64,
    lease_expires_at: Option<i64>,
    last_error: Option<String>,
    requested_by: String,
    bytes_done: i64,
    bytes_total: i64,
    blobs_done: i64,
    blobs_total: i64,
    created_at: i64,
    updated_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    referrers: bool,
    policy: Option<String>,
    repair: bool,
    referrers_state: Option<String>,
    referrers_failed: Option<String>,
    platforms: Option<String>,
}

impl JobRow {
    pub(super) fn into_job(self) -> Result<Job, Error> {
        Ok(Job {
            state: self
                .state
                .parse::<JobState>()
                .map_err(|_| corrupt("job state", &self.state))?,
            requested_by: parse_json("requested_by", &self.requested_by)?,
            policy: parse_policy(self.policy.as_deref())?,
            id: self.id,
            source: self.source,
            source_digest: self.source_digest,
            target_repo: self.target_repo,
            target_tag: self.target_tag,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            run_at: self.run_at,
            lease_expires_at: self.lease_expires_at,
            last_error: self.last_error,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
            blobs_done: self.blobs_done,
            blobs_total: self.blobs_total,
            created_at: self.created_at,
            updated_at: self.updated_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            referrers: self.referrers,
            repair: self.repair,
            referrers_state: self
                .referrers_state
                .as_deref()
                .map(|r| r.parse().map_err(|_| corrupt("referrers state", r)))
                .transpose()?,
            referrers_failed: self
                .referrers_failed
                .as_deref()
                .map(|f| parse_json("referrers_failed", f))
                .transpose()?,
            platforms: self
                .platforms
                .as_deref()
                .map(|p| serde_json::from_str(p).map_err(|_| corrupt("job platforms", p)))
                .transpose()?,
        })
    }
}

/// A queued job `j` waits while an older live job writes the same target tag.
macro_rules! not_waiting {
    () => {
        "(j.target_tag is null or not exists (
    select 1 from job o where o.target_repo = j.target_repo and o.target_tag = j.target_tag
        and o.state in ('queued', 'running') and o.id < j.id))"
    };
}

/// The advisory-lock key of a name (a target repository, a delivery id): 64 bits of its sha256.
fn lock_key(kind: &str, name: &str) -> i64 {
    let h = sha2::Sha256::digest(format!("mirror-mirror:{kind}:{name}"));
    i64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
}

/// Takes the advisory locks of `keys` (sorted, each once) until the transaction ends.
pub(super) async fn lock(tx: &mut PgConnection, mut keys: Vec<i64>) -> sqlx::Result<()> {
    keys.sort_unstable();
    keys.dedup();
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query("select mm_lock_keys($1)")
        .bind(keys)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The lock keys serialising enqueues of `jobs`.
pub(super) fn job_keys(jobs: &[NewJob]) -> Vec<i64> {
    jobs.iter()
        .map(|j| lock_key("target", &j.target_repo))
        .collect()
}

/// Tells every replica's workers that `created` jobs were queued (delivered at commit).
pub(super) async fn notify(tx: &mut PgConnection, created: usize) -> sqlx::Result<()> {
    if created > 0 {
        sqlx::query("select pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(created.to_string())
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

fn lease_token() -> String {
    hex::encode(rand::rng().random::<[u8; 16]>())
}

impl PgStore {
    pub(in crate::store) async fn enqueue_many(
        &self,
        new: &[NewJob],
    ) -> Result<Vec<Result<Enqueued, EnqueueError>>, Error> {
        let mut tx = begin(&self.pool, job_keys(new)).await?;
        let written = enqueue_all(&mut tx, new, &[], true).await?;
        tx.commit().await?;
        self.woke(written.created);
        Ok(written.answers)
    }

    /// One batch: [`begin`], one read, one write, `COMMIT` (see `enqueue.rs`).
    pub(in crate::store) async fn enqueue_requests(
        &self,
        requests: &[NewRequest],
    ) -> Result<Vec<RequestEnqueued>, Error> {
        let flat: Vec<NewJob> = requests
            .iter()
            .flat_map(|r| r.jobs.iter().map(|(_, j)| j.clone()))
            .collect();
        let rows: Vec<RequestRow> = requests
            .iter()
            .map(|r| RequestRow {
                source: &r.source,
                requested_by: &r.requested_by,
                targets: r.jobs.iter().map(|(t, _)| t.as_str()).collect(),
            })
            .collect();
        let mut tx = begin(&self.pool, job_keys(&flat)).await?;
        let written = enqueue_all(&mut tx, &flat, &rows, true).await?;
        tx.commit().await?;
        self.woke(written.created);
        let mut answers = written.answers.into_iter();
        Ok(requests
            .iter()
            .zip(written.requests)
            .map(|(r, id)| RequestEnqueued {
                id,
                jobs: r
                    .jobs
                    .iter()
                    .map(|(t, _)| (t.clone(), answers.next().expect("one answer per job")))
                    .collect(),
            })
            .collect())
    }

    pub(in crate::store) async fn request(&self, id: i64) -> Result<Option<Request>, Error> {
        let mut conn = self.pool.acquire().await?;
        request_on(&mut conn, id).await
    }

    pub(in crate::store) async fn request_digest(
        &self,
        job_id: i64,
    ) -> Result<Option<String>, Error> {
        Ok(sqlx::query_scalar(
            "select r.source_digest from request r
             where r.id = (select min(request_id) from request_job where job_id = $1)",
        )
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }

    pub(in crate::store) async fn settle_request_digest(
        &self,
        job_id: i64,
        digest: &str,
    ) -> Result<String, Error> {
        let settled: Option<String> = sqlx::query_scalar(
            "update request set source_digest = coalesce(source_digest, $1)
             where id = (select min(request_id) from request_job where job_id = $2)
             returning source_digest",
        )
        .bind(digest)
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(settled.unwrap_or_else(|| digest.to_string()))
    }

    pub(in crate::store) async fn owner(&self, mirror_repo: &str) -> Result<Option<String>, Error> {
        Ok(
            sqlx::query_scalar("select source_repo from mirror_owner where mirror_repo = $1")
                .bind(mirror_repo)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Puts running jobs whose lease expired back in the queue, or fails them when their
    /// attempts are spent. Any replica does it; two at once each touch a row once (the second
    /// re-checks the row after the first's update and finds the lease live or the job queued).
    async fn rescue(&self) -> Result<(), Error> {
        const FAIL_SPENT: &str = concat!(
            "update job set state = 'failed', lease_token = null, lease_expires_at = null,
                 finished_at = mm_now_ms(), updated_at = mm_now_ms(),
                 last_error = coalesce(last_error || '; ', '') || 'the worker running it stopped and no attempts are left'
             where state = 'running' and lease_expires_at < mm_now_ms() and attempts >= max_attempts
             returning ",
            job_columns!()
        );
        let failed = if self.announce {
            // Failed with the notices of their end, in one transaction.
            let mut tx = self.pool.begin().await?;
            let rows: Vec<JobRow> = sqlx::query_as(FAIL_SPENT).fetch_all(&mut *tx).await?;
            let failed = rows.len() as u64;
            for row in rows {
                let ended = row.into_job()?;
                finish_notices(&mut tx, ended.id, &ended.end_notice(None)).await?;
            }
            tx.commit().await?;
            failed
        } else {
            sqlx::query(FAIL_SPENT)
                .execute(&self.pool)
                .await?
                .rows_affected()
        };
        // Its own statement, so its own "now": a lease that ran out since the one above is
        // requeued only with attempts left (else the next rescue fails it).
        let requeued = sqlx::query(
            "update job set state = 'queued', lease_token = null, lease_expires_at = null, updated_at = mm_now_ms()
             where state = 'running' and lease_expires_at < mm_now_ms() and attempts < max_attempts",
        )
        .execute(&self.pool)
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

    pub(in crate::store) async fn claim(&self, lease: Duration) -> Result<Option<Lease>, Error> {
        Ok(self.claim_with(lease, false).await?.into_iter().next())
    }

    pub(in crate::store) async fn claim_group(&self, lease: Duration) -> Result<Vec<Lease>, Error> {
        self.claim_with(lease, true).await
    }

    /// The next due job and, with `siblings`, the other queued, due jobs of its requests, in
    /// one transaction (the claimed job first).
    async fn claim_with(&self, lease: Duration, siblings: bool) -> Result<Vec<Lease>, Error> {
        self.rescue().await?;
        let token = lease_token();
        let mut tx = self.pool.begin().await?;
        // The CTE is materialized so the row lock is taken once, by the LIMIT 1 scan; SKIP
        // LOCKED lets racing replicas take the next job instead of queueing behind this one.
        // With siblings, a job whose request has an older job claimable now is left to the
        // worker claiming that one (it takes this one with it): two workers woken at once
        // would otherwise split a request (this snapshot still sees the other's claim queued).
        let row = sqlx::query_as::<_, JobRow>(concat!("with next as materialized (
                 select j.id as next_id from job j
                 where j.state = 'queued' and j.run_at <= mm_now_ms() and ", not_waiting!(), "
                     and (not $3 or not exists (
                         select 1 from request_job mine
                         join request_job theirs on theirs.request_id = mine.request_id
                         join job s on s.id = theirs.job_id
                         where mine.job_id = j.id and s.id < j.id and s.state = 'queued'
                             and s.run_at <= mm_now_ms()
                             and (s.target_tag is null or not exists (
                                 select 1 from job o where o.target_repo = s.target_repo
                                     and o.target_tag = s.target_tag
                                     and o.state in ('queued', 'running') and o.id < s.id))))
                 order by j.run_at, j.id
                 limit 1
                 for update skip locked)
             update job set state = 'running', attempts = attempts + 1, lease_token = $1,
                 lease_expires_at = mm_now_ms() + $2, started_at = coalesce(started_at, mm_now_ms()),
                 updated_at = mm_now_ms()
             from next where job.id = next.next_id and job.state = 'queued'
             returning ", job_columns!()))
        .bind(&token)
        .bind(ms(lease))
        .bind(siblings)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(Vec::new());
        };
        let lead = Lease {
            job: row.into_job()?,
            token,
        };
        let lead_id = lead.job.id;
        let mut out = vec![lead];
        if !siblings {
            tx.commit().await?;
            return Ok(out);
        }
        // SKIP LOCKED: a sibling another replica is claiming now is left to it.
        let ids: Vec<i64> = sqlx::query_scalar(concat!(
            "select j.id from job j
             where j.id in (select rj.job_id from request_job rj where rj.request_id in
                     (select request_id from request_job where job_id = $1))
                 and j.id <> $1 and j.state = 'queued' and j.run_at <= mm_now_ms() and ",
            not_waiting!(),
            " order by j.id
             for update of j skip locked"
        ))
        .bind(lead_id)
        .fetch_all(&mut *tx)
        .await?;
        for id in ids {
            let token = lease_token();
            let row = sqlx::query_as::<_, JobRow>(concat!(
                "update job set state = 'running', attempts = attempts + 1, lease_token = $1,
                     lease_expires_at = mm_now_ms() + $2, started_at = coalesce(started_at, mm_now_ms()),
                     updated_at = mm_now_ms()
                 where id = $3 and state = 'queued'
                 returning ",
                job_columns!()
            ))
            .bind(&token)
            .bind(ms(lease))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(r) = row {
                out.push(Lease {
                    job: r.into_job()?,
                    token,
                });
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(in crate::store) async fn heartbeat(
        &self,
        lease: &Lease,
        duration: Duration,
        p: ProgressRow,
    ) -> Result<bool, Error> {
        let n = sqlx::query(
            "update job set lease_expires_at = mm_now_ms() + $1, bytes_done = $2, bytes_total = $3,
                 blobs_done = $4, blobs_total = $5, updated_at = mm_now_ms()
             where id = $6 and lease_token = $7 and state = 'running'",
        )
        .bind(ms(duration))
        .bind(p.bytes_done)
        .bind(p.bytes_total)
        .bind(p.blobs_done)
        .bind(p.blobs_total)
        .bind(lease.job.id)
        .bind(&lease.token)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    pub(in crate::store) async fn set_source_digest(
        &self,
        lease: &Lease,
        digest: &str,
    ) -> Result<bool, Error> {
        let n = sqlx::query(
            "update job set source_digest = $1, updated_at = mm_now_ms()
             where id = $2 and lease_token = $3 and state = 'running'",
        )
        .bind(digest)
        .bind(lease.job.id)
        .bind(&lease.token)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    pub(in crate::store) async fn retry_later(
        &self,
        lease: &Lease,
        error: &str,
        after: Duration,
    ) -> Result<bool, Error> {
        let n = sqlx::query(
            "update job set state = 'queued', lease_token = null, lease_expires_at = null, last_error = $1,
                 run_at = mm_now_ms() + $2, updated_at = mm_now_ms()
             where id = $3 and lease_token = $4 and state = 'running'",
        )
        .bind(error)
        .bind(ms(after))
        .bind(lease.job.id)
        .bind(&lease.token)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Queued again `after` from now with its attempt given back; `error` replaces the last
    /// error if given.
    async fn requeue(
        &self,
        lease: &Lease,
        error: Option<&str>,
        after: Duration,
    ) -> Result<bool, Error> {
        let n = sqlx::query(
            "update job set state = 'queued', lease_token = null, lease_expires_at = null,
                 attempts = greatest(attempts - 1, 0), last_error = coalesce($1, last_error),
                 run_at = mm_now_ms() + $2, updated_at = mm_now_ms()
             where id = $3 and lease_token = $4 and state = 'running'",
        )
        .bind(error)
        .bind(ms(after))
        .bind(lease.job.id)
        .bind(&lease.token)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    pub(in crate::store) async fn defer(
        &self,
        lease: &Lease,
        error: &str,
        after: Duration,
    ) -> Result<bool, Error> {
        self.requeue(lease, Some(error), after).await
    }

    pub(in crate::store) async fn release(&self, lease: &Lease) -> Result<bool, Error> {
        self.requeue(lease, None, Duration::ZERO).await
    }

    pub(in crate::store) async fn fail(
        &self,
        lease: &Lease,
        error: &str,
        notice: Option<&NewNotice>,
    ) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "update job set state = 'failed', lease_token = null, lease_expires_at = null, last_error = $1,
                 finished_at = mm_now_ms(), updated_at = mm_now_ms()
             where id = $2 and lease_token = $3 and state = 'running'",
        )
        .bind(error)
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

    pub(in crate::store) async fn get(&self, id: i64) -> Result<Option<Job>, Error> {
        sqlx::query_as::<_, JobRow>(concat!(
            "select ",
            job_columns!(),
            " from job where id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .map(JobRow::into_job)
        .transpose()
    }

    pub(in crate::store) async fn list(
        &self,
        state: Option<JobState>,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<Job>, Error> {
        sqlx::query_as::<_, JobRow>(concat!(
            "select ",
            job_columns!(),
            " from job
             where ($1::text is null or state = $1) and ($2::bigint is null or id < $2)
             order by id desc limit $3"
        ))
        .bind(state.map(JobState::as_str))
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(JobRow::into_job)
        .collect()
    }

    pub(in crate::store) async fn stats(&self) -> Result<JobStats, Error> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("select state, count(*) from job group by state order by state")
                .fetch_all(&self.pool)
                .await?;
        let by_state = rows
            .into_iter()
            .map(|(s, n)| Ok((s.parse().map_err(|_| corrupt("job state", s))?, n)))
            .collect::<Result<_, Error>>()?;
        let oldest_queued_ms: Option<i64> = sqlx::query_scalar(
            "select mm_now_ms() - min(created_at) from job where state = 'queued'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(JobStats {
            by_state,
            oldest_queued_ms,
        })
    }

    pub(in crate::store) async fn next_due(&self) -> Result<Option<Duration>, Error> {
        let due: Option<i64> = sqlx::query_scalar(concat!(
            "select min(j.run_at) - mm_now_ms() from job j
             where j.state = 'queued' and ",
            not_waiting!()
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok(due.map(|ms| Duration::from_millis(ms.max(0) as u64)))
    }

    pub(in crate::store) async fn deliver(
        &self,
        delivery_id: &str,
        jobs: &[NewJob],
        respond: &(dyn Fn(&[Enqueued]) -> serde_json::Value + Sync),
    ) -> Result<Delivery, EnqueueError> {
        let mut keys = job_keys(jobs);
        // Two replicas handling a redelivery at once: one answers, the other answers as before.
        keys.push(lock_key("delivery", delivery_id));
        let mut tx = begin(&self.pool, keys).await?;
        let before: Option<(i64, String)> = sqlx::query_as(
            "select status, response::text from github_delivery where delivery_id = $1",
        )
        .bind(delivery_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((status, response)) = before {
            tx.commit().await?;
            return Ok(Delivery::Before {
                status: u16::try_from(status)
                    .map_err(|_| corrupt("delivery status", status.to_string()))?,
                response: parse_json("delivery response", &response)?,
            });
        }
        // All or nothing: the first refusal fails the delivery (the transaction rolls back).
        let written = enqueue_all(&mut tx, jobs, &[], true).await?;
        let created = written.created;
        let out = written.answers.into_iter().collect::<Result<Vec<_>, _>>()?;
        let response = respond(&out);
        sqlx::query(
            "insert into github_delivery (delivery_id, status, response, created_at)
             values ($1, 202, $2::jsonb, mm_now_ms())",
        )
        .bind(delivery_id)
        .bind(response.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.woke(created);
        Ok(Delivery::New {
            enqueued: out,
            response,
        })
    }
}

/// Request `id` with its targets' jobs, read on `conn` (inside a transaction: what it wrote so
/// far counts).
async fn request_on(conn: &mut PgConnection, id: i64) -> Result<Option<Request>, Error> {
    let Some((source, source_digest, requested_by, created_at)): Option<(
        String,
        Option<String>,
        String,
        i64,
    )> = sqlx::query_as(
        "select source, source_digest, requested_by::text, created_at from request where id = $1",
    )
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
        job: JobRow,
    }
    let rows: Vec<Targeted> = sqlx::query_as(concat!(
        "select rj.target as target, ",
        job_columns!(),
        " from request_job rj join job on job.id = rj.job_id where rj.request_id = $1 order by rj.position"
    ))
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(Request {
        id,
        source,
        source_digest,
        requested_by: parse_json("requested_by", &requested_by)?,
        created_at,
        jobs: rows
            .into_iter()
            .map(|t| Ok((t.target, t.job.into_job()?)))
            .collect::<Result<_, Error>>()?,
    }))
}

/// Stores the notices of job `job_id`'s end in `tx`, with its result: its own `notice`, unless
/// every request it belongs to names several targets — such a request announces itself once,
/// with every target's outcome, when this job is the last of its jobs to end. The request rows
/// are locked first, so two of its jobs ending at once on two replicas see each other: the one
/// that ends second (after the other's commit) sends the notice.
pub(super) async fn finish_notices(
    tx: &mut PgConnection,
    job_id: i64,
    notice: &NewNotice,
) -> Result<(), Error> {
    let requests: Vec<(i64, i64)> = sqlx::query_as(
        "select r.id, (select count(*) from request_job x where x.request_id = r.id)
         from request r where r.id in (select request_id from request_job where job_id = $1)
         order by r.id for update of r",
    )
    .bind(job_id)
    .fetch_all(&mut *tx)
    .await?;
    if requests.iter().any(|(_, targets)| *targets == 1) || requests.is_empty() {
        super::outbox::insert(tx, notice).await?;
    }
    for (id, _) in requests.into_iter().filter(|(_, targets)| *targets > 1) {
        let Some(request) = request_on(tx, id).await? else {
            continue;
        };
        if !request.finished() {
            continue;
        }
        let landed: Vec<Landed> = sqlx::query_as::<_, (i64, String, String)>(
            "select job_id, mirror_repo, mirror_digest from mirror_record
             where job_id in (select job_id from request_job where request_id = $1)",
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
        super::outbox::insert(tx, &request.completion_notice(&landed)).await?;
    }
    Ok(())
}
