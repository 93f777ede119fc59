//! A batch of enqueues in a constant number of statements (group commit that stays cheap as the
//! batch grows): claim the owners of every target repository at once, read every live job the
//! batch could join at once, decide each request in order in memory (a request may join or widen
//! one queued earlier in the same batch), then write the new jobs with one `INSERT … SELECT FROM
//! unnest(…)` and the widened ones with one `UPDATE … FROM unnest(…)`.
//!
//! The caller's transaction holds the advisory locks of every target repository in the batch
//! (see `queue.rs`), so what is read here cannot change before the commit.

use std::collections::HashMap;

use sqlx::PgConnection;

use super::super::{
    Decision, EnqueueError, Enqueued, Error, Job, JobState, NewJob, decide, source_repo,
};
use super::queue::{JobRow, job_columns};
use crate::store::Dedupe;

/// The dedupe key: source, target repository, target tag.
type Key = (String, String, String);

fn key(n: &NewJob) -> Key {
    (
        n.source.clone(),
        n.target_repo.clone(),
        n.target_tag.clone().unwrap_or_default(),
    )
}

/// Where a request's answer comes from once the writes are done.
enum Answer {
    Refused(EnqueueError),
    /// An existing job (joined as it is, or widened).
    Existing {
        id: i64,
        dedupe: Dedupe,
    },
    /// The `n`th job inserted by this batch.
    Inserted {
        n: usize,
        dedupe: Dedupe,
    },
}

/// Ids below zero stand for jobs this batch will insert: -1 is the first.
fn pending_id(n: usize) -> i64 {
    -(n as i64) - 1
}

/// Enqueues `batch` inside `tx`; one answer per request, in order.
pub(super) async fn enqueue_all(
    tx: &mut PgConnection,
    batch: &[NewJob],
) -> Result<Vec<Result<Enqueued, EnqueueError>>, Error> {
    // Owners: the first request for a repository claims it if nobody has.
    let sources: Vec<String> = batch.iter().map(|n| source_repo(&n.source)).collect();
    let mut first_claim: Vec<(String, String)> = Vec::new();
    for (n, s) in batch.iter().zip(&sources) {
        if !first_claim.iter().any(|(r, _)| r == &n.target_repo) {
            first_claim.push((n.target_repo.clone(), s.clone()));
        }
    }
    let (repos, claimants): (Vec<String>, Vec<String>) = first_claim.into_iter().unzip();
    let owners: HashMap<String, String> = sqlx::query_as::<_, (String, String)>(
        "with claimed as (
             insert into mirror_owner (mirror_repo, source_repo, created_at)
             select r, s, mm_now_ms() from unnest($1::text[], $2::text[]) as c(r, s)
             on conflict (mirror_repo) do nothing
             returning mirror_repo, source_repo)
         select mirror_repo, source_repo from claimed
         union all
         select mirror_repo, source_repo from mirror_owner where mirror_repo = any($1)",
    )
    .bind(&repos)
    .bind(&claimants)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();

    // Every live job of the batch's keys, newest first per key.
    let keys: Vec<Key> = batch.iter().map(key).collect();
    let (ks, kr, kt): (Vec<String>, Vec<String>, Vec<String>) = keys.iter().cloned().fold(
        (Vec::new(), Vec::new(), Vec::new()),
        |(mut a, mut b, mut c), (s, r, t)| {
            a.push(s);
            b.push(r);
            c.push(t);
            (a, b, c)
        },
    );
    let mut live: HashMap<Key, Vec<Job>> = HashMap::new();
    let rows = sqlx::query_as::<_, JobRow>(concat!(
        "select ",
        job_columns!(),
        " from job
         where state in ('queued', 'running')
           and (source, target_repo, coalesce(target_tag, '')) in
               (select * from unnest($1::text[], $2::text[], $3::text[]))
         order by id desc"
    ))
    .bind(&ks)
    .bind(&kr)
    .bind(&kt)
    .fetch_all(&mut *tx)
    .await?;
    for row in rows {
        let job = row.into_job()?;
        let k = (
            job.source.clone(),
            job.target_repo.clone(),
            job.target_tag.clone().unwrap_or_default(),
        );
        live.entry(k).or_default().push(job);
    }

    // Decide in request order, as if one by one.
    let mut inserts: Vec<Job> = Vec::new();
    let mut widened: HashMap<i64, Job> = HashMap::new();
    let mut answers = Vec::with_capacity(batch.len());
    for ((new, source), k) in batch.iter().zip(&sources).zip(keys) {
        let owner = &owners[&new.target_repo];
        if owner != source {
            answers.push(Answer::Refused(EnqueueError::Owned {
                mirror_repo: new.target_repo.clone(),
                owner: owner.clone(),
                requested: source.clone(),
            }));
            continue;
        }
        let jobs = live.entry(k).or_default();
        let answer = |id: i64, dedupe: Dedupe| {
            if id < 0 {
                Answer::Inserted {
                    n: (-id - 1) as usize,
                    dedupe,
                }
            } else {
                Answer::Existing { id, dedupe }
            }
        };
        match decide(jobs, new) {
            Decision::Join(i) => answers.push(answer(jobs[i].id, Dedupe::Joined)),
            Decision::Merge {
                index,
                referrers,
                policy,
                repair,
            } => {
                let j = &mut jobs[index];
                (j.referrers, j.policy, j.repair) = (referrers, policy, repair);
                if j.id < 0 {
                    inserts[(-j.id - 1) as usize] = j.clone();
                } else {
                    widened.insert(j.id, j.clone());
                }
                answers.push(answer(j.id, Dedupe::Merged));
            }
            Decision::Insert { after } => {
                let requested_by = new.requested_by.clone();
                let n = inserts.len();
                let job = Job {
                    id: pending_id(n),
                    source: new.source.clone(),
                    source_digest: None,
                    target_repo: new.target_repo.clone(),
                    target_tag: new.target_tag.clone(),
                    state: JobState::Queued,
                    attempts: 0,
                    max_attempts: new.max_attempts,
                    run_at: 0,
                    lease_expires_at: None,
                    last_error: None,
                    requested_by,
                    bytes_done: 0,
                    bytes_total: 0,
                    blobs_done: 0,
                    blobs_total: 0,
                    created_at: 0,
                    updated_at: 0,
                    started_at: None,
                    finished_at: None,
                    referrers: new.referrers,
                    policy: new.policy,
                    repair: new.repair,
                    referrers_state: None,
                    referrers_failed: None,
                };
                jobs.insert(0, job.clone());
                inserts.push(job);
                answers.push(Answer::Inserted {
                    n,
                    dedupe: after.map_or(Dedupe::New, Dedupe::QueuedAfter),
                });
            }
        }
    }

    // The writes: one statement each. Identity values follow the insert order (ordinality), so
    // the returned rows sorted by id are the inserts in order.
    let mut inserted: Vec<Job> = Vec::new();
    if !inserts.is_empty() {
        let col = |f: fn(&Job) -> Option<String>| inserts.iter().map(f).collect::<Vec<_>>();
        let rows = sqlx::query_as::<_, JobRow>(concat!(
            "insert into job (source, target_repo, target_tag, state, max_attempts, run_at, requested_by,
                 created_at, updated_at, referrers, policy, repair)
             select s, r, t, 'queued', m, mm_now_ms(), b::jsonb, mm_now_ms(), mm_now_ms(), f, p, x
             from unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bool[], $7::text[], $8::bool[])
                 with ordinality as i(s, r, t, m, b, f, p, x, n)
             order by n
             returning ",
            job_columns!()
        ))
        .bind(col(|j| Some(j.source.clone())))
        .bind(col(|j| Some(j.target_repo.clone())))
        .bind(col(|j| j.target_tag.clone()))
        .bind(inserts.iter().map(|j| j.max_attempts).collect::<Vec<_>>())
        .bind(col(|j| Some(j.requested_by.to_string())))
        .bind(inserts.iter().map(|j| j.referrers).collect::<Vec<_>>())
        .bind(col(|j| j.policy.map(|p| p.as_str().to_string())))
        .bind(inserts.iter().map(|j| j.repair).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        inserted = rows
            .into_iter()
            .map(JobRow::into_job)
            .collect::<Result<_, _>>()?;
        inserted.sort_by_key(|j| j.id);
        if inserted.len() != inserts.len() {
            return Err(Error::Corrupt {
                what: "insert result",
                value: format!("{} rows for {} jobs", inserted.len(), inserts.len()),
            });
        }
    }
    let mut existing: HashMap<i64, Job> = HashMap::new();
    if !widened.is_empty() {
        let w: Vec<&Job> = widened.values().collect();
        let rows = sqlx::query_as::<_, JobRow>(concat!(
            "update job set referrers = u.f, policy = u.p, repair = u.x, updated_at = mm_now_ms()
             from unnest($1::bigint[], $2::bool[], $3::text[], $4::bool[]) as u(uid, f, p, x)
             where job.id = u.uid
             returning ",
            job_columns!()
        ))
        .bind(w.iter().map(|j| j.id).collect::<Vec<_>>())
        .bind(w.iter().map(|j| j.referrers).collect::<Vec<_>>())
        .bind(
            w.iter()
                .map(|j| j.policy.map(|p| p.as_str().to_string()))
                .collect::<Vec<_>>(),
        )
        .bind(w.iter().map(|j| j.repair).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let j = row.into_job()?;
            existing.insert(j.id, j);
        }
    }
    let find_existing = |id: i64| -> Result<Job, Error> {
        if let Some(j) = existing.get(&id) {
            return Ok(j.clone());
        }
        live.values()
            .flatten()
            .find(|j| j.id == id)
            .cloned()
            .ok_or_else(|| Error::Corrupt {
                what: "joined job",
                value: id.to_string(),
            })
    };
    answers
        .into_iter()
        .map(|a| {
            Ok(match a {
                Answer::Refused(e) => Err(e),
                Answer::Existing { id, dedupe } => Ok(Enqueued {
                    job: find_existing(id)?,
                    dedupe,
                }),
                Answer::Inserted { n, dedupe } => Ok(Enqueued {
                    job: inserted[n].clone(),
                    dedupe,
                }),
            })
        })
        .collect()
}
