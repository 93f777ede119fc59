//! A batch of enqueues in a constant number of round trips, whatever its size (group commit that
//! stays cheap as the batch grows): [`begin`] opens the transaction and takes the advisory locks
//! in one; one statement claims the owners of every target repository and reads every live job
//! the batch could join; each request is decided in order in memory (a request may join or
//! widen one queued earlier in the same batch); and one statement writes it all: the new jobs
//! (`INSERT … SELECT FROM unnest(…)`), the widened ones, the requests with their job links, and
//! the `NOTIFY`. With `COMMIT` that is 4 round trips and one fsync per batch.
//!
//! The transaction holds the advisory locks of every target repository in the batch (see
//! `queue.rs`), so what is read here cannot change before the commit.
//!
//! **Plans.** Every read here is a lookup by key. On a fresh database (tables never analysed,
//! as after a deploy, until autovacuum's first round a minute later) the planner took the tables
//! for empty and cached plans that scanned every live job and every owner in each batch: the
//! batch slowed down as the queue grew (f) in bench/ fell from 2,000/s to 1,100/s). The
//! transaction therefore turns off the scans and joins that only pay on large sets
//! (`SET LOCAL`, in [`begin`]'s round trip): the plans are index lookups per key at any size.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres, Transaction};

use super::super::{
    Decision, EnqueueError, Enqueued, Error, Job, JobState, NewJob, decide, source_repo,
};
use super::CHANNEL;
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

/// What the lookups of a batch may use: index scans and nested loops (see the module doc).
const PLANNER: &str = "set local enable_seqscan = off; set local enable_bitmapscan = off;
     set local enable_hashjoin = off; set local enable_mergejoin = off;";

/// Opens an enqueue's transaction in one round trip: `BEGIN`, the planner settings of the
/// batch's lookups, and the advisory locks of `keys` (sorted, each once) until it ends.
pub(super) async fn begin(
    pool: &PgPool,
    mut keys: Vec<i64>,
) -> sqlx::Result<Transaction<'static, Postgres>> {
    keys.sort_unstable();
    keys.dedup();
    // Numbers only, formatted here: nothing a request says reaches this text.
    let keys: Vec<String> = keys.iter().map(i64::to_string).collect();
    pool.begin_with(AssertSqlSafe(format!(
        "begin; {PLANNER} select mm_lock_keys('{{{}}}'::bigint[]);",
        keys.join(",")
    )))
    .await
}

/// A request whose jobs are the next entries of the batch, one per target it names; stored
/// (with its job links) when at least one of them was.
pub(super) struct RequestRow<'a> {
    pub source: &'a str,
    pub requested_by: &'a serde_json::Value,
    pub targets: Vec<&'a str>,
}

/// What a batch wrote.
pub(super) struct Written {
    /// One answer per job of the batch, in order.
    pub answers: Vec<Result<Enqueued, EnqueueError>>,
    /// Each request's id; none when every one of its jobs was refused.
    pub requests: Vec<Option<i64>>,
    /// Jobs created (workers to wake).
    pub created: usize,
}

/// Enqueues `batch` inside `tx` (opened by [`begin`] with the batch's keys) and stores
/// `requests` (whose jobs, in order, are the batch), with a `NOTIFY` of the jobs created when
/// `notify`; one answer per job, in order.
pub(super) async fn enqueue_all(
    tx: &mut PgConnection,
    batch: &[NewJob],
    requests: &[RequestRow<'_>],
    notify: bool,
) -> Result<Written, Error> {
    // Owners: the first request for a repository claims it if nobody has.
    let sources: Vec<String> = batch.iter().map(|n| source_repo(&n.source)).collect();
    let mut first_claim: Vec<(String, String)> = Vec::new();
    for (n, s) in batch.iter().zip(&sources) {
        if !first_claim.iter().any(|(r, _)| r == &n.target_repo) {
            first_claim.push((n.target_repo.clone(), s.clone()));
        }
    }
    let (repos, claimants): (Vec<String>, Vec<String>) = first_claim.into_iter().unzip();

    // Every live job of the batch's keys, newest first per key: an index lookup per key.
    let keys: Vec<Key> = batch.iter().map(key).collect();
    let mut distinct: Vec<&Key> = keys.iter().collect();
    distinct.sort_unstable();
    distinct.dedup();
    let (ks, kr, kt): (Vec<&str>, Vec<&str>, Vec<&str>) = distinct.iter().fold(
        (Vec::new(), Vec::new(), Vec::new()),
        |(mut a, mut b, mut c), (s, r, t)| {
            a.push(s.as_str());
            b.push(r.as_str());
            c.push(t.as_str());
            (a, b, c)
        },
    );

    // Both in one statement: the owners as two arrays, the live jobs (usually none) as JSON.
    let (owner_repos, owner_sources, live_json): (
        Option<Vec<String>>,
        Option<Vec<String>>,
        String,
    ) = sqlx::query_as(concat!(
        "with claimed as (
                 insert into mirror_owner (mirror_repo, source_repo, created_at)
                 select r, s, mm_now_ms() from unnest($1::text[], $2::text[]) as c(r, s)
                 on conflict (mirror_repo) do nothing
                 returning mirror_repo, source_repo),
             owners as (
                 select mirror_repo, source_repo from claimed
                 union all
                 select mirror_repo, source_repo from mirror_owner where mirror_repo = any($1))
             select o.repos, o.sources, coalesce(l.jobs::text, '[]')
             from (select array_agg(mirror_repo) as repos, array_agg(source_repo) as sources
                   from owners) as o,
                  (select json_agg(j order by j.id desc) as jobs
                   from unnest($3::text[], $4::text[], $5::text[]) as k(s, r, t),
                   lateral (select ",
        job_columns!(),
        " from job
                       where state in ('queued', 'running')
                         and source = k.s and target_repo = k.r and coalesce(target_tag, '') = k.t
                       offset 0) as j) as l"
    ))
    .bind(&repos)
    .bind(&claimants)
    .bind(&ks)
    .bind(&kr)
    .bind(&kt)
    .fetch_one(&mut *tx)
    .await?;
    let owners: HashMap<String, String> = owner_repos
        .unwrap_or_default()
        .into_iter()
        .zip(owner_sources.unwrap_or_default())
        .collect();
    let rows: Vec<JobRow> = serde_json::from_str(&live_json).map_err(|e| Error::Corrupt {
        what: "live jobs",
        value: e.to_string(),
    })?;
    let mut live: HashMap<Key, Vec<Job>> = HashMap::new();
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
                    platforms: new.platforms.clone(),
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

    // The requests with a stored job, and their links (request, position, target, job; a
    // pending id for a job this batch inserts).
    let mut stored: Vec<Option<usize>> = Vec::with_capacity(requests.len());
    let (mut r_source, mut r_by) = (Vec::new(), Vec::new());
    let (mut l_request, mut l_pos, mut l_target, mut l_job) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut next = 0;
    for r in requests {
        let Some(mine) = answers.get(next..next + r.targets.len()) else {
            break;
        };
        next += r.targets.len();
        if mine.iter().all(|a| matches!(a, Answer::Refused(_))) {
            stored.push(None);
            continue;
        }
        stored.push(Some(r_source.len()));
        r_source.push(r.source);
        r_by.push(r.requested_by.to_string());
        let ok = mine.iter().zip(&r.targets).filter_map(|(a, t)| match a {
            Answer::Refused(_) => None,
            Answer::Existing { id, .. } => Some((*id, t)),
            Answer::Inserted { n, .. } => Some((pending_id(*n), t)),
        });
        for (p, (job, t)) in ok.enumerate() {
            l_request.push(r_source.len() as i64);
            l_pos.push(p as i64);
            l_target.push(*t);
            l_job.push(job);
        }
    }
    if !requests.is_empty() && next != batch.len() {
        return Err(Error::Corrupt {
            what: "enqueue batch",
            value: format!("{next} jobs in the requests, {} in the batch", batch.len()),
        });
    }
    // One per job inserted (the answers that join or widen one of them are not new jobs).
    let created = inserts.len();

    // The writes, in one statement. Identity values follow the insert order (ordinality), so
    // the ids sorted are the inserts (and the requests) in order; every time is the
    // transaction's `now()`, returned with them.
    let mut inserted: Vec<Job> = Vec::new();
    let mut now = 0;
    let mut request_ids: Vec<i64> = Vec::new();
    if !inserts.is_empty() || !widened.is_empty() || !r_source.is_empty() {
        let col = |f: fn(&Job) -> Option<String>| inserts.iter().map(f).collect::<Vec<_>>();
        let w: Vec<&Job> = widened.values().collect();
        let wrote: (Vec<i64>, Vec<i64>, i64, i64, i64, i64) = sqlx::query_as(
            "with ins as (
                 insert into job (source, target_repo, target_tag, state, max_attempts, run_at, requested_by,
                     created_at, updated_at, referrers, policy, repair, platforms)
                 select s, r, t, 'queued', m, mm_now_ms(), b::jsonb, mm_now_ms(), mm_now_ms(), f, p, x, ps::jsonb
                 from unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bool[], $7::text[], $8::bool[], $9::text[])
                     with ordinality as i(s, r, t, m, b, f, p, x, ps, n)
                 order by n
                 returning id),
             upd as (
                 update job set referrers = u.f, policy = u.p, repair = u.x, updated_at = mm_now_ms()
                 from unnest($10::bigint[], $11::bool[], $12::text[], $13::bool[]) as u(uid, f, p, x)
                 where job.id = u.uid
                 returning job.id),
             req as (
                 insert into request (source, requested_by, created_at)
                 select s, b::jsonb, mm_now_ms() from unnest($14::text[], $15::text[])
                     with ordinality as i(s, b, n)
                 order by n
                 returning id),
             link as (
                 insert into request_job (request_id, position, target, job_id)
                 select r.id, l.pos, l.target, coalesce(j.id, l.job)
                 from unnest($16::bigint[], $17::bigint[], $18::text[], $19::bigint[]) as l(rq, pos, target, job)
                 join (select id, row_number() over (order by id) as n from req) as r on r.n = l.rq
                 left join (select id, row_number() over (order by id) as n from ins) as j
                     on l.job < 0 and j.n = -l.job
                 returning 1)
             select array(select id from ins order by id), array(select id from req order by id),
                 (select count(*) from upd), (select count(*) from link), mm_now_ms(),
                 (select count(*) from (select pg_notify($20, $21::text) where $21 > 0) as n)",
        )
        .bind(col(|j| Some(j.source.clone())))
        .bind(col(|j| Some(j.target_repo.clone())))
        .bind(col(|j| j.target_tag.clone()))
        .bind(inserts.iter().map(|j| j.max_attempts).collect::<Vec<_>>())
        .bind(col(|j| Some(j.requested_by.to_string())))
        .bind(inserts.iter().map(|j| j.referrers).collect::<Vec<_>>())
        .bind(col(|j| j.policy.map(|p| p.as_str().to_string())))
        .bind(inserts.iter().map(|j| j.repair).collect::<Vec<_>>())
        .bind(col(|j| {
            j.platforms
                .as_ref()
                .map(|p| serde_json::Value::from(p.names().to_vec()).to_string())
        }))
        .bind(w.iter().map(|j| j.id).collect::<Vec<_>>())
        .bind(w.iter().map(|j| j.referrers).collect::<Vec<_>>())
        .bind(
            w.iter()
                .map(|j| j.policy.map(|p| p.as_str().to_string()))
                .collect::<Vec<_>>(),
        )
        .bind(w.iter().map(|j| j.repair).collect::<Vec<_>>())
        .bind(&r_source)
        .bind(&r_by)
        .bind(&l_request)
        .bind(&l_pos)
        .bind(&l_target)
        .bind(&l_job)
        .bind(CHANNEL)
        .bind(if notify { created as i64 } else { 0 })
        .fetch_one(&mut *tx)
        .await?;
        let (ids, rids, updated, links, at, _notified) = wrote;
        if ids.len() != inserts.len()
            || rids.len() != r_source.len()
            || updated as usize != w.len()
            || links as usize != l_job.len()
        {
            return Err(Error::Corrupt {
                what: "enqueue writes",
                value: format!(
                    "{} of {} jobs inserted, {} of {} widened, {} of {} requests, {} of {} links",
                    ids.len(),
                    inserts.len(),
                    updated,
                    w.len(),
                    rids.len(),
                    r_source.len(),
                    links,
                    l_job.len()
                ),
            });
        }
        now = at;
        request_ids = rids;
        inserted = inserts
            .into_iter()
            .zip(ids)
            .map(|(j, id)| Job {
                id,
                run_at: now,
                created_at: now,
                updated_at: now,
                ..j
            })
            .collect();
    }
    let find_existing = |id: i64| -> Result<Job, Error> {
        let found = live.values().flatten().find(|j| j.id == id);
        match (widened.get(&id), found) {
            (Some(w), _) => Ok(Job {
                updated_at: now,
                ..w.clone()
            }),
            (None, Some(j)) => Ok(j.clone()),
            (None, None) => Err(Error::Corrupt {
                what: "joined job",
                value: id.to_string(),
            }),
        }
    };
    let answers = answers
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
                    // Queued after a job this batch inserted (for other platforms): its real id.
                    dedupe: match dedupe {
                        Dedupe::QueuedAfter(id) if id < 0 => {
                            Dedupe::QueuedAfter(inserted[(-id - 1) as usize].id)
                        }
                        other => other,
                    },
                }),
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Written {
        answers,
        requests: stored
            .into_iter()
            .map(|s| s.map(|i| request_ids[i]))
            .collect(),
        created,
    })
}
