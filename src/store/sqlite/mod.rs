//! The SQLite backend: one file, WAL, `synchronous=FULL`, one writer connection, `BEGIN
//! IMMEDIATE` for every read-then-write. The statements live in `queue`, `ledger` and `outbox`
//! (functions over an executor or a transaction, so units of work compose them); this module
//! maps their rows to the store's typed records.

mod db;
mod ledger;
mod outbox;
mod queue;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::{
    Delivery, Drift, DriftKind, DriftRecorded, EnqueueError, Enqueued, Error, Job, JobReferrers,
    JobState, JobStats, Lease, NewDrift, NewJob, NewNotice, NewRecord, NewRequest, Notice,
    NoticeState, ProgressRow, Record, Request, RequestEnqueued, Round, RoundKind, RoundSlot,
    WriterState, corrupt, now_ms, parse_json, parse_policy,
};
use db::Db;

pub use db::MIGRATOR;

/// SQLite through the existing `Db` pools.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    db: Db,
    /// Rung after an enqueue that created a job (one process: no one else to tell).
    pub(super) wake: Arc<Notify>,
    /// Where blobs are on targets: (registry, digest) → repository → when seen (ms). In memory:
    /// one process owns the file, and it knows what it put where (migrations/sqlite-next/).
    blobs: Arc<std::sync::Mutex<BlobMap>>,
    /// Whether jobs failed by the rescue announce their end (notices are configured).
    pub(super) announce: bool,
    /// Moved by this store's ledger writes: one process owns the file, so it hears every change.
    pub(super) versions: Arc<super::LedgerVersions>,
}

/// slot, replica, started_at, finished_at, result (JSON text).
type RoundRow = (i64, String, i64, Option<i64>, Option<String>);

type BlobMap = std::collections::HashMap<(String, String), std::collections::HashMap<String, i64>>;

impl From<queue::EnqueueError> for EnqueueError {
    fn from(e: queue::EnqueueError) -> Self {
        match e {
            queue::EnqueueError::Owned {
                mirror_repo,
                owner,
                requested,
            } => EnqueueError::Owned {
                mirror_repo,
                owner,
                requested,
            },
            queue::EnqueueError::Db(e) => EnqueueError::Store(Error::Database(e)),
            queue::EnqueueError::Corrupt(e) => EnqueueError::Store(e),
        }
    }
}

fn job(j: queue::Job) -> Result<Job, Error> {
    Ok(Job {
        state: j
            .state
            .parse()
            .map_err(|_| corrupt("job state", &j.state))?,
        requested_by: parse_json("requested_by", &j.requested_by)?,
        policy: parse_policy(j.policy.as_deref())?,
        id: j.id,
        source: j.source,
        source_digest: j.source_digest,
        target_repo: j.target_repo,
        target_tag: j.target_tag,
        attempts: j.attempts,
        max_attempts: j.max_attempts,
        run_at: j.run_at,
        lease_expires_at: j.lease_expires_at,
        last_error: j.last_error,
        bytes_done: j.bytes_done,
        bytes_total: j.bytes_total,
        blobs_done: j.blobs_done,
        blobs_total: j.blobs_total,
        created_at: j.created_at,
        updated_at: j.updated_at,
        started_at: j.started_at,
        finished_at: j.finished_at,
        referrers: j.referrers,
        repair: j.repair,
        referrers_state: j
            .referrers_state
            .as_deref()
            .map(|r| r.parse().map_err(|_| corrupt("referrers state", r)))
            .transpose()?,
        referrers_failed: j
            .referrers_failed
            .as_deref()
            .map(|f| parse_json("referrers_failed", f))
            .transpose()?,
        platforms: j
            .platforms
            .as_deref()
            .map(|p| serde_json::from_str(p).map_err(|_| corrupt("job platforms", p)))
            .transpose()?,
    })
}

fn request_from(row: queue::RequestRow, jobs: Vec<(String, queue::Job)>) -> Result<Request, Error> {
    Ok(Request {
        id: row.id,
        source: row.source,
        source_digest: row.source_digest,
        requested_by: parse_json("requested_by", &row.requested_by)?,
        created_at: row.created_at,
        jobs: jobs
            .into_iter()
            .map(|(t, j)| Ok((t, job(j)?)))
            .collect::<Result<_, Error>>()?,
    })
}

fn notice(n: outbox::Notice) -> Result<Notice, Error> {
    Ok(Notice {
        event: n
            .event
            .parse()
            .map_err(|_| corrupt("notice event", &n.event))?,
        state: n
            .state
            .parse()
            .map_err(|_| corrupt("notice state", &n.state))?,
        id: n.id,
        body: n.body,
        attempts: n.attempts,
        next_attempt_at: n.next_attempt_at,
        last_error: n.last_error,
        created_at: n.created_at,
        updated_at: n.updated_at,
        delivered_at: n.delivered_at,
    })
}

fn enqueued(q: queue::Enqueued) -> Result<Enqueued, Error> {
    Ok(Enqueued {
        job: job(q.job)?,
        dedupe: q.dedupe,
    })
}

/// The row `queue.rs` expects for a lease: only the id is read by its writes.
fn queue_lease(l: &Lease) -> queue::Lease {
    let j = &l.job;
    queue::Lease {
        token: l.token.clone(),
        job: queue::Job {
            id: j.id,
            source: j.source.clone(),
            source_digest: j.source_digest.clone(),
            target_repo: j.target_repo.clone(),
            target_tag: j.target_tag.clone(),
            state: j.state.as_str().to_string(),
            attempts: j.attempts,
            max_attempts: j.max_attempts,
            run_at: j.run_at,
            lease_expires_at: j.lease_expires_at,
            last_error: j.last_error.clone(),
            requested_by: j.requested_by.to_string(),
            bytes_done: j.bytes_done,
            bytes_total: j.bytes_total,
            blobs_done: j.blobs_done,
            blobs_total: j.blobs_total,
            created_at: j.created_at,
            updated_at: j.updated_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            referrers: j.referrers,
            policy: j.policy.map(|p| p.as_str().to_string()),
            repair: j.repair,
            // Not read by the lease's writes.
            referrers_state: None,
            referrers_failed: None,
            platforms: None,
        },
    }
}

fn record(r: ledger::Record) -> Result<Record, Error> {
    let manifests = match parse_json("record manifests", &r.manifests)? {
        serde_json::Value::Array(a) => a,
        _ => return Err(corrupt("record manifests", r.manifests)),
    };
    Ok(Record {
        manifests,
        requested_by: parse_json("requested_by", &r.requested_by)?,
        policy: parse_policy(r.policy.as_deref())?,
        id: r.id,
        job_id: r.job_id,
        source_repo: r.source_repo,
        source_ref: r.source_ref,
        tag: r.tag,
        source_digest: r.source_digest,
        mirror_repo: r.mirror_repo,
        mirror_digest: r.mirror_digest,
        media_type: r.media_type,
        size_bytes: r.size_bytes,
        verified_at: r.verified_at,
        mirror_tag: r.mirror_tag,
        subset: r
            .subset
            .as_deref()
            .map(|s| serde_json::from_str(s).map_err(|_| corrupt("record subset", s)))
            .transpose()?,
    })
}

fn records(rs: Vec<ledger::Record>) -> Result<Vec<Record>, Error> {
    rs.into_iter().map(record).collect()
}

fn drift(d: ledger::Drift) -> Result<Drift, Error> {
    let missing = d
        .missing
        .as_deref()
        .map(|m| serde_json::from_str::<Vec<String>>(m).map_err(|_| corrupt("drift missing", m)))
        .transpose()?;
    Ok(Drift {
        kind: d.kind.parse().map_err(|_| corrupt("drift kind", &d.kind))?,
        policy: d.policy.parse().map_err(|_| corrupt("policy", &d.policy))?,
        missing,
        id: d.id,
        mirror_repo: d.mirror_repo,
        mirror_tag: d.mirror_tag,
        source_repo: d.source_repo,
        source_tag: d.source_tag,
        recorded_digest: d.recorded_digest,
        observed_digest: d.observed_digest,
        job_id: d.job_id,
        detected_at: d.detected_at,
        last_seen_at: d.last_seen_at,
        resolved_at: d.resolved_at,
    })
}

impl SqliteStore {
    /// Opens (creating if missing) the file at `location` and applies the migrations.
    pub async fn open(location: &str) -> Result<SqliteStore, Error> {
        let db = Db::open(location).await.map_err(|e| Error::Config {
            location: location.to_string(),
            reason: format!("{e:#}; give a writable file path, a sqlite: URL or a postgres:// URL"),
        })?;
        Ok(SqliteStore::from_db(db))
    }

    /// The store over an open `Db` (while callers still hold one).
    pub fn from_db(db: Db) -> SqliteStore {
        SqliteStore {
            db,
            wake: Arc::new(Notify::new()),
            blobs: Arc::default(),
            announce: false,
            versions: Arc::new(super::LedgerVersions::new(true)),
        }
    }

    pub(super) async fn ready(&self) -> Result<WriterState, Error> {
        self.db
            .ready()
            .await
            .map_err(|e| Error::NotReady(format!("{e:#}")))
    }

    /// The pools, for the importer.
    pub(in crate::store) fn db(&self) -> &Db {
        &self.db
    }

    pub(super) async fn close(&self) {
        self.db.write.close().await;
        self.db.read.close().await;
    }

    fn woke(&self, created: usize) {
        // One idle worker per new job (a request to several targets makes several at once).
        for _ in 0..created {
            self.wake.notify_one();
        }
    }

    pub(super) async fn enqueue_many(
        &self,
        new: &[NewJob],
    ) -> Result<Vec<Result<Enqueued, EnqueueError>>, Error> {
        let mut tx = self.db.write.begin_with("BEGIN IMMEDIATE").await?;
        let mut out = Vec::with_capacity(new.len());
        for n in new {
            match queue::enqueue_in(&mut tx, n).await {
                Err(queue::EnqueueError::Db(e)) => return Err(e.into()),
                Err(queue::EnqueueError::Corrupt(e)) => return Err(e),
                Err(refused) => out.push(Err(refused.into())),
                Ok(q) => out.push(Ok(enqueued(q)?)),
            }
        }
        tx.commit().await?;
        self.woke(out.iter().flatten().filter(|q| q.created()).count());
        Ok(out)
    }

    pub(super) async fn enqueue_requests(
        &self,
        requests: &[NewRequest],
    ) -> Result<Vec<RequestEnqueued>, Error> {
        let mut tx = self.db.write.begin_with("BEGIN IMMEDIATE").await?;
        let mut out = Vec::with_capacity(requests.len());
        let mut created = 0;
        for r in requests {
            let mut jobs = Vec::with_capacity(r.jobs.len());
            for (target, n) in &r.jobs {
                match queue::enqueue_in(&mut tx, n).await {
                    Err(queue::EnqueueError::Db(e)) => return Err(e.into()),
                    Err(refused) => jobs.push((target.clone(), Err(refused.into()))),
                    Ok(q) => {
                        let q = enqueued(q)?;
                        created += q.created() as usize;
                        jobs.push((target.clone(), Ok(q)));
                    }
                }
            }
            let stored: Vec<(&str, i64)> = jobs
                .iter()
                .filter_map(|(t, q)| q.as_ref().ok().map(|q| (t.as_str(), q.job.id)))
                .collect();
            let id = match stored.is_empty() {
                true => None,
                false => Some(queue::insert_request(&mut tx, r, &stored).await?),
            };
            out.push(RequestEnqueued { id, jobs });
        }
        tx.commit().await?;
        self.woke(created);
        Ok(out)
    }

    pub(super) async fn request(&self, id: i64) -> Result<Option<Request>, Error> {
        let Some((row, jobs)) = queue::request(&self.db, id).await? else {
            return Ok(None);
        };
        request_from(row, jobs).map(Some)
    }

    pub(super) async fn request_digest(&self, job_id: i64) -> Result<Option<String>, Error> {
        Ok(queue::request_digest(&self.db, job_id).await?)
    }

    pub(super) async fn settle_request_digest(
        &self,
        job_id: i64,
        digest: &str,
    ) -> Result<String, Error> {
        Ok(queue::settle_request_digest(&self.db, job_id, digest).await?)
    }

    pub(super) async fn owner(&self, mirror_repo: &str) -> Result<Option<String>, Error> {
        Ok(queue::owner(&self.db, mirror_repo).await?)
    }

    pub(super) async fn claim(&self, lease: Duration) -> Result<Option<Lease>, Error> {
        match queue::claim(&self.db, lease, self.announce).await? {
            None => Ok(None),
            Some(l) => Ok(Some(Lease {
                token: l.token,
                job: job(l.job)?,
            })),
        }
    }

    pub(super) async fn claim_group(&self, lease: Duration) -> Result<Vec<Lease>, Error> {
        queue::claim_group(&self.db, lease, true, self.announce)
            .await?
            .into_iter()
            .map(|l| {
                Ok(Lease {
                    token: l.token,
                    job: job(l.job)?,
                })
            })
            .collect()
    }

    pub(super) async fn heartbeat(
        &self,
        lease: &Lease,
        duration: Duration,
        p: ProgressRow,
    ) -> Result<bool, Error> {
        Ok(queue::heartbeat(&self.db, &queue_lease(lease), duration, p).await?)
    }

    pub(super) async fn set_source_digest(
        &self,
        lease: &Lease,
        digest: &str,
    ) -> Result<bool, Error> {
        Ok(queue::set_source_digest(&self.db, &queue_lease(lease), digest).await?)
    }

    pub(super) async fn succeed_with_record(
        &self,
        lease: &Lease,
        r: &NewRecord,
        p: ProgressRow,
        referrers: Option<&JobReferrers>,
        notice: Option<&NewNotice>,
    ) -> Result<bool, Error> {
        let record = ledger::NewRecord {
            job_id: r.job_id,
            source_repo: r.source_repo.clone(),
            source_ref: r.source_ref.clone(),
            tag: r.tag.clone(),
            source_digest: r.source_digest.clone(),
            mirror_repo: r.mirror_repo.clone(),
            mirror_digest: r.mirror_digest.clone(),
            media_type: r.media_type.clone(),
            manifests: serde_json::Value::from(r.manifests.clone()).to_string(),
            size_bytes: r.size_bytes,
            requested_by: r.requested_by.to_string(),
            verified_at: r.verified_at,
            mirror_tag: r.mirror_tag.clone(),
            policy: r.policy.map(|p| p.as_str().to_string()),
            subset: r
                .subset
                .as_ref()
                .map(|s| serde_json::to_value(s).unwrap_or_default().to_string()),
        };
        Ok(queue::succeed(&self.db, &queue_lease(lease), &record, p, notice, referrers).await?)
    }

    pub(super) async fn retry_later(
        &self,
        lease: &Lease,
        error: &str,
        after: Duration,
    ) -> Result<bool, Error> {
        Ok(queue::retry_later(&self.db, &queue_lease(lease), error, after).await?)
    }

    pub(super) async fn defer(
        &self,
        lease: &Lease,
        error: &str,
        after: Duration,
    ) -> Result<bool, Error> {
        let run_at = now_ms() + after.as_millis() as i64;
        Ok(queue::defer(&self.db, &queue_lease(lease), error, run_at).await?)
    }

    pub(super) async fn fail(
        &self,
        lease: &Lease,
        error: &str,
        notice: Option<&NewNotice>,
    ) -> Result<bool, Error> {
        Ok(queue::fail(&self.db, &queue_lease(lease), error, notice).await?)
    }

    pub(super) async fn release(&self, lease: &Lease) -> Result<bool, Error> {
        Ok(queue::release(&self.db, &queue_lease(lease)).await?)
    }

    pub(super) async fn get(&self, id: i64) -> Result<Option<Job>, Error> {
        queue::get(&self.db, id).await?.map(job).transpose()
    }

    pub(super) async fn list(
        &self,
        state: Option<JobState>,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<Job>, Error> {
        queue::list(&self.db, state.map(JobState::as_str), limit, before)
            .await?
            .into_iter()
            .map(job)
            .collect()
    }

    pub(super) async fn stats(&self) -> Result<JobStats, Error> {
        let (by_state, oldest_queued_ms) = queue::stats(&self.db).await?;
        let by_state = by_state
            .into_iter()
            .map(|(s, n)| Ok((s.parse().map_err(|_| corrupt("job state", s))?, n)))
            .collect::<Result<_, Error>>()?;
        Ok(JobStats {
            by_state,
            oldest_queued_ms,
        })
    }

    pub(super) async fn next_due(&self) -> Result<Option<Duration>, Error> {
        Ok(queue::next_due(&self.db)
            .await?
            .map(|due| Duration::from_millis((due - now_ms()).max(0) as u64)))
    }

    pub(super) async fn deliver(
        &self,
        delivery_id: &str,
        jobs: &[NewJob],
        respond: &(dyn Fn(&[Enqueued]) -> serde_json::Value + Sync),
    ) -> Result<Delivery, EnqueueError> {
        let mut tx = self.db.write.begin_with("BEGIN IMMEDIATE").await?;
        if let Some((status, response)) = queue::find_delivery(&mut tx, delivery_id).await? {
            tx.commit().await?;
            return Ok(Delivery::Before {
                status: u16::try_from(status)
                    .map_err(|_| corrupt("delivery status", status.to_string()))?,
                response: parse_json("delivery response", &response)?,
            });
        }
        let mut out = Vec::with_capacity(jobs.len());
        for j in jobs {
            out.push(enqueued(queue::enqueue_in(&mut tx, j).await?)?);
        }
        let response = respond(&out);
        queue::store_delivery(&mut tx, delivery_id, 202, &response.to_string()).await?;
        tx.commit().await?;
        self.woke(out.iter().filter(|q| q.created()).count());
        Ok(Delivery::New {
            enqueued: out,
            response,
        })
    }

    pub(super) async fn by_repo(&self, repo: &str) -> Result<Vec<Record>, Error> {
        records(ledger::by_repo(&self.db, repo).await?)
    }

    pub(super) async fn by_repo_tag(&self, repo: &str, tag: &str) -> Result<Vec<Record>, Error> {
        records(ledger::by_repo_tag(&self.db, repo, tag).await?)
    }

    pub(super) async fn by_digest(&self, digest: &str) -> Result<Vec<Record>, Error> {
        records(ledger::by_digest(&self.db, digest).await?)
    }

    pub(super) async fn latest(
        &self,
        query: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Record>, Error> {
        records(ledger::latest(&self.db, query, limit).await?)
    }

    pub(super) async fn watched(&self) -> Result<Vec<Record>, Error> {
        records(ledger::watched(&self.db).await?)
    }

    pub(super) async fn record_drift_and_enqueue(
        &self,
        d: &NewDrift,
        job: Option<NewJob>,
        notice: Option<&(dyn Fn(&Drift) -> NewNotice + Sync)>,
    ) -> Result<DriftRecorded, Error> {
        let new_drift = ledger::NewDrift {
            mirror_repo: d.mirror_repo.clone(),
            mirror_tag: d.mirror_tag.clone(),
            source_repo: d.source_repo.clone(),
            source_tag: d.source_tag.clone(),
            kind: d.kind.as_str(),
            recorded_digest: d.recorded_digest.clone(),
            observed_digest: d.observed_digest.clone(),
            missing: d
                .missing
                .as_ref()
                .map(|m| serde_json::Value::from(m.clone()).to_string()),
            policy: d.policy.as_str().to_string(),
        };
        let mut tx = self.db.write.begin_with("BEGIN IMMEDIATE").await?;
        let (mut row, new) = ledger::upsert_drift(&mut tx, &new_drift, now_ms()).await?;
        let mut queued = None;
        if let Some(mut job) = job {
            job.requested_by = serde_json::json!({ "kind": "drift", "drift_id": row.id, "reason": d.kind.as_str() });
            match queue::enqueue_in(&mut tx, &job).await {
                Ok(q) => {
                    ledger::set_drift_job(&mut tx, row.id, q.job.id).await?;
                    row.job_id = Some(q.job.id);
                    queued = Some(Ok(enqueued(q)?));
                }
                Err(queue::EnqueueError::Db(e)) => return Err(e.into()),
                Err(queue::EnqueueError::Corrupt(e)) => return Err(e),
                Err(refused) => queued = Some(Err(refused.into())),
            }
        }
        // Announced once, when first seen: stored with the row, sent from the outbox.
        let drift = drift(row)?;
        let noticed = match notice.filter(|_| new) {
            Some(build) => {
                outbox::insert(&mut tx, &build(&drift)).await?;
                true
            }
            None => false,
        };
        tx.commit().await?;
        if let Some(Ok(q)) = &queued {
            self.woke(q.created() as usize);
        }
        Ok(DriftRecorded {
            drift,
            new,
            noticed,
            queued,
        })
    }

    pub(super) async fn resolve_unseen_drift(
        &self,
        mirror_repo: &str,
        mirror_tag: Option<&str>,
        recorded_digest: &str,
        seen: &[i64],
    ) -> Result<u64, Error> {
        Ok(ledger::resolve_unseen_drift(
            &self.db,
            mirror_repo,
            mirror_tag,
            recorded_digest,
            seen,
            now_ms(),
        )
        .await?)
    }

    pub(super) async fn open_drift(&self, repo: &str) -> Result<Vec<Drift>, Error> {
        ledger::open_drift(&self.db, repo)
            .await?
            .into_iter()
            .map(drift)
            .collect()
    }

    pub(super) async fn list_drift(
        &self,
        all: bool,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<Drift>, Error> {
        ledger::list_drift(&self.db, all, limit, before)
            .await?
            .into_iter()
            .map(drift)
            .collect()
    }

    pub(super) async fn open_drift_counts(&self) -> Result<Vec<(DriftKind, i64)>, Error> {
        ledger::open_drift_counts(&self.db)
            .await?
            .into_iter()
            .map(|(k, n)| Ok((k.parse().map_err(|_| corrupt("drift kind", k))?, n)))
            .collect()
    }

    pub(super) async fn claim_round(
        &self,
        kind: RoundKind,
        interval: Duration,
        replica: &str,
    ) -> Result<Option<RoundSlot>, Error> {
        let now = now_ms();
        let every = (interval.as_millis() as i64).max(1);
        let slot: Option<i64> = sqlx::query_scalar(
            "insert into round_slot (kind, slot, interval_ms, replica, started_at)
             values (?1, ?2, ?3, ?4, ?5) on conflict (kind, slot) do nothing returning slot",
        )
        .bind(kind.as_str())
        .bind(now / every)
        .bind(every)
        .bind(replica)
        .bind(now)
        .fetch_optional(&self.db.write)
        .await?;
        Ok(slot.map(|slot| RoundSlot { kind, slot }))
    }

    pub(super) async fn next_round_in(&self, interval: Duration) -> Result<Duration, Error> {
        let every = (interval.as_millis() as i64).max(1);
        Ok(Duration::from_millis((every - now_ms() % every) as u64))
    }

    pub(super) async fn finish_round(
        &self,
        slot: RoundSlot,
        result: &serde_json::Value,
    ) -> Result<(), Error> {
        sqlx::query(
            "update round_slot set finished_at = ?1, result = ?2 where kind = ?3 and slot = ?4",
        )
        .bind(now_ms())
        .bind(result.to_string())
        .bind(slot.kind.as_str())
        .bind(slot.slot)
        .execute(&self.db.write)
        .await?;
        Ok(())
    }

    pub(super) async fn last_round(&self, kind: RoundKind) -> Result<Option<Round>, Error> {
        let row: Option<RoundRow> = sqlx::query_as(
            "select slot, replica, started_at, finished_at, result from round_slot
             where kind = ?1 and finished_at is not null order by finished_at desc, slot desc limit 1",
        )
        .bind(kind.as_str())
        .fetch_optional(&self.db.read)
        .await?;
        row.map(|(slot, replica, started_at, finished_at, result)| {
            Ok(Round {
                kind,
                slot,
                replica,
                started_at,
                finished_at,
                result: result.map(|r| parse_json("round result", &r)).transpose()?,
            })
        })
        .transpose()
    }

    pub(super) async fn record_blobs(
        &self,
        registry: &str,
        repo: &str,
        digests: &[String],
    ) -> Result<(), Error> {
        let now = now_ms();
        let mut blobs = self.blobs.lock().expect("blobs lock");
        for d in digests {
            blobs
                .entry((registry.to_string(), d.clone()))
                .or_default()
                .insert(repo.to_string(), now);
        }
        Ok(())
    }

    pub(super) async fn blob_repos(
        &self,
        registry: &str,
        digest: &str,
        limit: i64,
    ) -> Result<Vec<String>, Error> {
        let blobs = self.blobs.lock().expect("blobs lock");
        let mut repos: Vec<(&String, &i64)> = blobs
            .get(&(registry.to_string(), digest.to_string()))
            .map(|m| m.iter().collect())
            .unwrap_or_default();
        repos.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        Ok(repos
            .into_iter()
            .take(limit.max(0) as usize)
            .map(|(r, _)| r.clone())
            .collect())
    }

    pub(super) async fn forget_blob(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
    ) -> Result<(), Error> {
        let mut blobs = self.blobs.lock().expect("blobs lock");
        if let Some(m) = blobs.get_mut(&(registry.to_string(), digest.to_string())) {
            m.remove(repo);
        }
        Ok(())
    }

    pub(super) async fn claim_notices(
        &self,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<Notice>, Error> {
        outbox::claim(&self.db, now_ms(), limit, lease.as_millis() as i64)
            .await?
            .into_iter()
            .map(notice)
            .collect()
    }

    pub(super) async fn release_notice(&self, id: i64) -> Result<(), Error> {
        Ok(outbox::release(&self.db, id, now_ms()).await?)
    }

    pub(super) async fn next_notice_in(&self) -> Result<Option<Duration>, Error> {
        Ok(outbox::next_due(&self.db)
            .await?
            .map(|due| Duration::from_millis((due - now_ms()).max(0) as u64)))
    }

    pub(super) async fn notice_delivered(&self, id: i64) -> Result<(), Error> {
        Ok(outbox::delivered(&self.db, id).await?)
    }

    pub(super) async fn notice_failed(
        &self,
        id: i64,
        error: &str,
        retry_after: Option<Duration>,
    ) -> Result<(), Error> {
        let retry_at = retry_after.map(|d| now_ms() + d.as_millis() as i64);
        Ok(outbox::attempt_failed(&self.db, id, error, retry_at).await?)
    }

    pub(super) async fn notices(
        &self,
        state: Option<NoticeState>,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<Notice>, Error> {
        outbox::list(&self.db, state, limit, before)
            .await?
            .into_iter()
            .map(notice)
            .collect()
    }

    pub(super) async fn notice_counts(&self) -> Result<Vec<(NoticeState, i64)>, Error> {
        outbox::counts(&self.db)
            .await?
            .into_iter()
            .map(|(s, n)| Ok((s.parse().map_err(|_| corrupt("notice state", s))?, n)))
            .collect()
    }
}
