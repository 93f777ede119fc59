//! The ledger and drift on PostgreSQL: records written with the job's success (and every digest
//! they name into `record_manifest`, so `/digests/{digest}` is an index look-up), the queries
//! behind `/images`, `/digests` and drift watch, drift rows upserted by their open-problem index.

use sqlx::FromRow;

use super::super::{
    Drift, DriftKind, DriftRecorded, EnqueueError, Error, JobReferrers, Lease, NewDrift, NewJob,
    NewNotice, NewRecord, ProgressRow, Record, corrupt, parse_json, parse_policy,
};
use super::PgStore;
use super::enqueue::enqueue_all;
use super::queue::{job_keys, lock, notify};

macro_rules! record_columns {
    () => {
        "r.id, r.job_id, r.source_repo, r.source_ref, r.tag, r.source_digest, r.mirror_repo,
    r.mirror_digest, r.media_type, r.manifests::text as manifests, r.size_bytes, r.requested_by::text as requested_by,
    r.verified_at, r.mirror_tag, r.policy, r.subset::text as subset"
    };
}

#[derive(FromRow)]
struct RecordRow {
    id: i64,
    job_id: i64,
    source_repo: String,
    source_ref: String,
    tag: Option<String>,
    source_digest: String,
    mirror_repo: String,
    mirror_digest: String,
    media_type: String,
    manifests: String,
    size_bytes: i64,
    requested_by: String,
    verified_at: i64,
    mirror_tag: Option<String>,
    policy: Option<String>,
    subset: Option<String>,
}

impl RecordRow {
    fn into_record(self) -> Result<Record, Error> {
        let manifests = match parse_json("record manifests", &self.manifests)? {
            serde_json::Value::Array(a) => a,
            _ => return Err(corrupt("record manifests", self.manifests)),
        };
        Ok(Record {
            manifests,
            requested_by: parse_json("requested_by", &self.requested_by)?,
            policy: parse_policy(self.policy.as_deref())?,
            id: self.id,
            job_id: self.job_id,
            source_repo: self.source_repo,
            source_ref: self.source_ref,
            tag: self.tag,
            source_digest: self.source_digest,
            mirror_repo: self.mirror_repo,
            mirror_digest: self.mirror_digest,
            media_type: self.media_type,
            size_bytes: self.size_bytes,
            verified_at: self.verified_at,
            mirror_tag: self.mirror_tag,
            subset: self
                .subset
                .as_deref()
                .map(|s| serde_json::from_str(s).map_err(|_| corrupt("record subset", s)))
                .transpose()?,
        })
    }
}

fn records(rows: Vec<RecordRow>) -> Result<Vec<Record>, Error> {
    rows.into_iter().map(RecordRow::into_record).collect()
}

macro_rules! drift_columns {
    () => {
        "id, mirror_repo, mirror_tag, source_repo, source_tag, kind, recorded_digest, observed_digest,
    missing::text as missing, policy, job_id, detected_at, last_seen_at, resolved_at"
    };
}

#[derive(FromRow)]
struct DriftRow {
    id: i64,
    mirror_repo: String,
    mirror_tag: Option<String>,
    source_repo: String,
    source_tag: Option<String>,
    kind: String,
    recorded_digest: String,
    observed_digest: Option<String>,
    missing: Option<String>,
    policy: String,
    job_id: Option<i64>,
    detected_at: i64,
    last_seen_at: i64,
    resolved_at: Option<i64>,
}

impl DriftRow {
    fn into_drift(self) -> Result<Drift, Error> {
        let missing = self
            .missing
            .as_deref()
            .map(|m| {
                serde_json::from_str::<Vec<String>>(m).map_err(|_| corrupt("drift missing", m))
            })
            .transpose()?;
        Ok(Drift {
            kind: self
                .kind
                .parse::<DriftKind>()
                .map_err(|_| corrupt("drift kind", &self.kind))?,
            policy: self
                .policy
                .parse()
                .map_err(|_| corrupt("policy", &self.policy))?,
            missing,
            id: self.id,
            mirror_repo: self.mirror_repo,
            mirror_tag: self.mirror_tag,
            source_repo: self.source_repo,
            source_tag: self.source_tag,
            recorded_digest: self.recorded_digest,
            observed_digest: self.observed_digest,
            job_id: self.job_id,
            detected_at: self.detected_at,
            last_seen_at: self.last_seen_at,
            resolved_at: self.resolved_at,
        })
    }
}

fn drifts(rows: Vec<DriftRow>) -> Result<Vec<Drift>, Error> {
    rows.into_iter().map(DriftRow::into_drift).collect()
}

impl PgStore {
    pub(in crate::store) async fn succeed_with_record(
        &self,
        lease: &Lease,
        r: &NewRecord,
        p: ProgressRow,
        referrers: Option<&JobReferrers>,
        notice: Option<&NewNotice>,
    ) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "update job set state = 'succeeded', lease_token = null, lease_expires_at = null, last_error = null,
                 bytes_done = $1, bytes_total = $2, blobs_done = $3, blobs_total = $4,
                 finished_at = mm_now_ms(), updated_at = mm_now_ms(),
                 referrers_state = $7, referrers_failed = $8::jsonb
             where id = $5 and lease_token = $6 and state = 'running'",
        )
        .bind(p.bytes_done)
        .bind(p.bytes_total)
        .bind(p.blobs_done)
        .bind(p.blobs_total)
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
        let manifests = serde_json::Value::from(r.manifests.clone()).to_string();
        let id: i64 = sqlx::query_scalar(
            "insert into mirror_record (job_id, source_repo, source_ref, tag, source_digest, mirror_repo, mirror_digest,
                 media_type, manifests, size_bytes, requested_by, verified_at, mirror_tag, policy, subset)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11::jsonb, $12, $13, $14, $15::jsonb) returning id",
        )
        .bind(r.job_id)
        .bind(&r.source_repo)
        .bind(&r.source_ref)
        .bind(&r.tag)
        .bind(&r.source_digest)
        .bind(&r.mirror_repo)
        .bind(&r.mirror_digest)
        .bind(&r.media_type)
        .bind(&manifests)
        .bind(r.size_bytes)
        .bind(r.requested_by.to_string())
        .bind(r.verified_at)
        .bind(&r.mirror_tag)
        .bind(r.policy.map(|p| p.as_str()))
        .bind(
            r.subset
                .as_ref()
                .map(|s| serde_json::to_value(s).unwrap_or_default().to_string()),
        )
        .fetch_one(&mut *tx)
        .await?;
        // Every digest the record names: the image (as the source and the mirror know it), each
        // manifest, each referrer, each child of a subset.
        sqlx::query(
            "insert into record_manifest (record_id, digest)
             select $1, d from (
                 select $2::text as d
                 union select $4::text
                 union select e->>'digest' from jsonb_array_elements($3::jsonb) e
                 union select c->>'digest'
                     from jsonb_array_elements(coalesce($5::jsonb -> 'children', '[]'::jsonb)) c) s
             where d is not null
             on conflict do nothing",
        )
        .bind(id)
        .bind(&r.source_digest)
        .bind(&manifests)
        .bind(&r.mirror_digest)
        .bind(
            r.subset
                .as_ref()
                .map(|s| serde_json::to_value(s).unwrap_or_default().to_string()),
        )
        .execute(&mut *tx)
        .await?;
        // Whatever drift this job was queued to follow or repair is settled by it.
        sqlx::query(
            "update drift set resolved_at = mm_now_ms() where job_id = $1 and resolved_at is null",
        )
        .bind(lease.job.id)
        .execute(&mut *tx)
        .await?;
        if let Some(n) = notice {
            super::queue::finish_notices(&mut tx, lease.job.id, n).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    pub(in crate::store) async fn by_repo(&self, repo: &str) -> Result<Vec<Record>, Error> {
        records(
            sqlx::query_as(concat!(
                "select ",
                record_columns!(),
                " from mirror_record r where r.source_repo = $1 or r.mirror_repo = $1
                 order by r.verified_at desc, r.id desc"
            ))
            .bind(repo)
            .fetch_all(&self.pool)
            .await?,
        )
    }

    pub(in crate::store) async fn by_repo_tag(
        &self,
        repo: &str,
        tag: &str,
    ) -> Result<Vec<Record>, Error> {
        records(
            sqlx::query_as(concat!("select ", record_columns!(), " from mirror_record r
                 where (r.source_repo = $1 and r.tag = $2) or (r.mirror_repo = $1 and r.mirror_tag = $2)
                 order by r.verified_at desc, r.id desc"))
            .bind(repo)
            .bind(tag)
            .fetch_all(&self.pool)
            .await?,
        )
    }

    pub(in crate::store) async fn by_digest(&self, digest: &str) -> Result<Vec<Record>, Error> {
        records(
            sqlx::query_as(concat!(
                "select ",
                record_columns!(),
                " from mirror_record r
                 where r.id in (select record_id from record_manifest where digest = $1)
                 order by r.verified_at, r.id"
            ))
            .bind(digest)
            .fetch_all(&self.pool)
            .await?,
        )
    }

    pub(in crate::store) async fn latest(
        &self,
        query: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Record>, Error> {
        records(
            sqlx::query_as(concat!("select ", record_columns!(), " from mirror_record r
                 where r.id = (select max(x.id) from mirror_record x
                               where x.mirror_repo = r.mirror_repo
                                 and coalesce(x.mirror_tag, '@' || x.source_digest) = coalesce(r.mirror_tag, '@' || r.source_digest))
                   and ($1::text is null or strpos(r.source_repo, $1) > 0 or strpos(r.mirror_repo, $1) > 0)
                 order by r.verified_at desc, r.id desc limit $2"))
            .bind(query)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?,
        )
    }

    pub(in crate::store) async fn watched(&self) -> Result<Vec<Record>, Error> {
        records(
            sqlx::query_as(concat!(
                "select ",
                record_columns!(),
                " from mirror_record r
                 join (select max(id) as id from mirror_record
                       group by mirror_repo, coalesce(mirror_tag, '@' || source_digest)) newest
                   on newest.id = r.id
                 order by r.mirror_repo, r.id"
            ))
            .fetch_all(&self.pool)
            .await?,
        )
    }

    pub(in crate::store) async fn record_drift_and_enqueue(
        &self,
        d: &NewDrift,
        job: Option<NewJob>,
        notice: Option<&(dyn Fn(&Drift) -> NewNotice + Sync)>,
    ) -> Result<DriftRecorded, Error> {
        let mut tx = self.pool.begin().await?;
        if let Some(j) = &job {
            lock(&mut tx, job_keys(std::slice::from_ref(j))).await?;
        }
        let missing = d
            .missing
            .as_ref()
            .map(|m| serde_json::Value::from(m.clone()).to_string());
        // One statement, race-free across replicas: the open-problem index decides insert or
        // "seen again"; xmax = 0 only on a freshly inserted row.
        let (row, new): (DriftRow, bool) = {
            #[derive(FromRow)]
            struct Upserted {
                #[sqlx(flatten)]
                row: DriftRow,
                inserted: bool,
            }
            let u: Upserted = sqlx::query_as(concat!("insert into drift (mirror_repo, mirror_tag, source_repo, source_tag, kind, recorded_digest,
                     observed_digest, missing, policy, detected_at, last_seen_at)
                 values ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, mm_now_ms(), mm_now_ms())
                 on conflict (mirror_repo, coalesce(mirror_tag, ''), kind, recorded_digest, coalesce(observed_digest, ''))
                     where resolved_at is null
                 do update set last_seen_at = mm_now_ms(), missing = excluded.missing, policy = excluded.policy
                 returning ", drift_columns!(), ", (xmax = 0) as inserted"))
            .bind(&d.mirror_repo)
            .bind(&d.mirror_tag)
            .bind(&d.source_repo)
            .bind(&d.source_tag)
            .bind(d.kind.as_str())
            .bind(&d.recorded_digest)
            .bind(&d.observed_digest)
            .bind(&missing)
            .bind(d.policy.as_str())
            .fetch_one(&mut *tx)
            .await?;
            (u.row, u.inserted)
        };
        let mut drift = row.into_drift()?;
        let mut queued = None;
        let mut created = 0;
        if let Some(mut job) = job {
            job.requested_by = serde_json::json!({
                "kind": "drift", "drift_id": drift.id, "reason": d.kind.as_str()
            });
            let mut answers = enqueue_all(&mut tx, std::slice::from_ref(&job), &[], false)
                .await?
                .answers;
            match answers.pop().expect("one answer per request") {
                Ok(q) => {
                    sqlx::query("update drift set job_id = $1 where id = $2")
                        .bind(q.job.id)
                        .bind(drift.id)
                        .execute(&mut *tx)
                        .await?;
                    drift.job_id = Some(q.job.id);
                    created = q.created() as usize;
                    queued = Some(Ok(q));
                }
                Err(EnqueueError::Store(e)) => return Err(e),
                Err(refused) => queued = Some(Err(refused)),
            }
        }
        // Announced once, when first seen: stored with the row, sent from the outbox.
        let noticed = match notice.filter(|_| new) {
            Some(build) => {
                super::outbox::insert(&mut tx, &build(&drift)).await?;
                true
            }
            None => false,
        };
        notify(&mut tx, created).await?;
        tx.commit().await?;
        self.woke(created);
        Ok(DriftRecorded {
            drift,
            new,
            noticed,
            queued,
        })
    }

    pub(in crate::store) async fn resolve_unseen_drift(
        &self,
        mirror_repo: &str,
        mirror_tag: Option<&str>,
        recorded_digest: &str,
        seen: &[i64],
    ) -> Result<u64, Error> {
        Ok(sqlx::query(
            "update drift set resolved_at = mm_now_ms()
             where resolved_at is null and mirror_repo = $1 and coalesce(mirror_tag, '') = coalesce($2, '')
               and ($2::text is not null or recorded_digest = $3)
               and id <> all($4)",
        )
        .bind(mirror_repo)
        .bind(mirror_tag)
        .bind(recorded_digest)
        .bind(seen)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    pub(in crate::store) async fn open_drift(&self, repo: &str) -> Result<Vec<Drift>, Error> {
        drifts(
            sqlx::query_as(concat!(
                "select ",
                drift_columns!(),
                " from drift
                 where resolved_at is null and (mirror_repo = $1 or source_repo = $1)
                 order by id desc"
            ))
            .bind(repo)
            .fetch_all(&self.pool)
            .await?,
        )
    }

    pub(in crate::store) async fn list_drift(
        &self,
        all: bool,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<Drift>, Error> {
        drifts(
            sqlx::query_as(concat!(
                "select ",
                drift_columns!(),
                " from drift
                 where ($1 or resolved_at is null) and ($2::bigint is null or id < $2)
                 order by id desc limit $3"
            ))
            .bind(all)
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?,
        )
    }

    pub(in crate::store) async fn open_drift_counts(&self) -> Result<Vec<(DriftKind, i64)>, Error> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "select kind, count(*) from drift where resolved_at is null group by kind order by kind",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(k, n)| Ok((k.parse().map_err(|_| corrupt("drift kind", k))?, n)))
            .collect()
    }
}
