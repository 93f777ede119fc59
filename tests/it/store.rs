//! The store's conformance suite: every test runs against SQLite (a real file) and PostgreSQL (a
//! real server started by the harness, a fresh database per test) through the same `Store`
//! interface. "Replicas" are two `Store`s opened on the same database: on PostgreSQL that is what
//! N `serve` processes are; on SQLite two pools on one file.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use mirror_mirror::store::{
    Dedupe, Delivery, DriftKind, EnqueueError, JobReferrers, JobState, NewDrift, NewJob, NewNotice,
    NewRecord, NewRequest, NoticeEvent, NoticeState, Platforms, Policy, ProgressRow,
    ReferrersState, RoundKind, Store, Subset, SubsetChild, WriterState,
};
use serde_json::json;

use crate::support::postgres as pg;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

/// One database of `backend`, opened as many times as a test wants replicas.
struct Database {
    _dir: tempfile::TempDir,
    location: String,
}

impl Database {
    async fn new(backend: Backend) -> Database {
        let dir = tempfile::tempdir().unwrap();
        let location = match backend {
            Backend::Sqlite => dir.path().join("store.db").to_str().unwrap().to_string(),
            Backend::Postgres => pg::shared().database().await,
        };
        Database {
            _dir: dir,
            location,
        }
    }

    async fn open(&self) -> Store {
        Store::open(&self.location)
            .await
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.location))
    }
}

/// Generates `sqlite::NAME` and `postgres::NAME` for each conformance test `NAME(backend)`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

conformance!(
    fifty_identical_requests_make_one_job,
    racing_claims_take_each_job_once,
    a_stale_lease_writes_nothing_and_any_replica_rescues,
    retries_wait_for_their_time_and_attempts_run_out,
    release_and_defer_give_the_attempt_back,
    one_writer_per_target_tag_in_request_order,
    a_queued_job_widens_its_options_for_a_joining_request,
    a_mirror_repository_has_one_owner,
    records_are_found_by_every_digest_they_name,
    drift_is_recorded_once_and_its_job_resolves_it,
    a_github_delivery_is_handled_once,
    an_enqueue_wakes_the_workers_of_another_replica,
    group_commit_enqueues_many_durably,
    one_batch_dedupes_within_itself_as_if_one_by_one,
    a_round_runs_once_per_interval_across_replicas,
    racing_workers_write_a_tag_one_at_a_time_in_request_order,
    claims_and_completions_keep_up,
    a_blob_written_by_one_replica_is_found_by_another,
    a_request_for_a_running_pinned_job_waits_its_turn_on_the_tag,
    notices_are_stored_with_what_they_announce_and_sent_by_one_replica,
    referrers_state_is_kept_with_the_job,
    a_platform_subset_is_its_own_request,
    a_subset_record_is_found_by_its_children,
    a_request_to_several_targets_is_one_job_each_and_settles_one_digest,
    a_request_to_several_targets_is_announced_once_when_its_last_job_ends,
    a_job_the_rescue_fails_announces_its_end_and_ends_its_request,
    a_batch_answers_each_request_with_the_jobs_as_stored,
);

fn job(source: &str) -> NewJob {
    NewJob {
        source: source.to_string(),
        target_repo: format!(
            "127.0.0.1:1/mirror/{}",
            source.split([':', '@']).next().unwrap()
        ),
        target_tag: Some("1".into()),
        requested_by: json!({"kind": "token", "name": "t"}),
        max_attempts: 3,
        referrers: true,
        policy: None,
        repair: false,
        platforms: None,
    }
}

fn record(job_id: i64, mirror_repo: &str) -> NewRecord {
    NewRecord {
        job_id,
        source_repo: "docker.io/library/x".into(),
        source_ref: "docker.io/library/x:1".into(),
        tag: Some("1".into()),
        source_digest: "sha256:aa".into(),
        mirror_repo: mirror_repo.into(),
        mirror_digest: "sha256:aa".into(),
        media_type: "application/vnd.oci.image.index.v1+json".into(),
        manifests: vec![
            json!({"digest": "sha256:aa", "media_type": "index", "platform": null, "size": 10}),
            json!({"digest": "sha256:child", "media_type": "manifest", "platform": "linux/amd64", "size": 5}),
            json!({"digest": "sha256:sig", "referrer_of": "sha256:aa", "tag": "sha256-aa.sig"}),
        ],
        size_bytes: 15,
        requested_by: json!({"kind": "token", "name": "t"}),
        verified_at: 1,
        mirror_tag: Some("m1".into()),
        policy: Some(Policy::Pin),
        subset: None,
    }
}

/// Claims until a job comes (a lease that just expired needs the database clock to pass it).
async fn claim_within(store: &Store, lease: Duration) -> mirror_mirror::store::Lease {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = store.claim(lease).await.unwrap() {
            return l;
        }
        assert!(Instant::now() < deadline, "no job became claimable");
        tokio::task::yield_now().await;
    }
}

async fn fifty_identical_requests_make_one_job(backend: Backend) {
    let db = Database::new(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { store.enqueue(&job("docker.io/library/a:1")).await.unwrap() })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut created = 0;
    for t in tasks {
        let q = t.await.unwrap();
        ids.insert(q.job.id);
        created += q.created() as usize;
    }
    assert_eq!(
        ids.len(),
        1,
        "all 50 requests, on two replicas, return the same job"
    );
    assert_eq!(created, 1);
    let stats = a.stats().await.unwrap();
    assert_eq!(stats.by_state, vec![(JobState::Queued, 1)]);
    // Once it finished, the same request makes a new job.
    let lease = a.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert!(
        a.succeed_with_record(
            &lease,
            &record(lease.job.id, "m/x"),
            ProgressRow::default(),
            None,
            None
        )
        .await
        .unwrap()
    );
    let again = b.enqueue(&job("docker.io/library/a:1")).await.unwrap();
    assert_eq!(again.dedupe, Dedupe::New);
    assert_ne!(again.job.id, lease.job.id);
}

async fn racing_claims_take_each_job_once(backend: Backend) {
    let db = Database::new(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    for i in 0..40 {
        a.enqueue(&job(&format!("docker.io/library/j{i}:1")))
            .await
            .unwrap();
    }
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some(l) = store.claim(Duration::from_secs(30)).await.unwrap() {
                    mine.push(l.job.id);
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 40, "every job claimed");
    assert_eq!(unique.len(), 40, "no job claimed twice: {all:?}");
    assert_eq!(
        b.stats().await.unwrap().by_state,
        vec![(JobState::Running, 40)]
    );
}

async fn a_stale_lease_writes_nothing_and_any_replica_rescues(backend: Backend) {
    let db = Database::new(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    a.enqueue(&job("docker.io/library/s:1")).await.unwrap();
    // Replica A claims with a lease that expires at once (its worker "hangs").
    let stale = a.claim(Duration::ZERO).await.unwrap().unwrap();
    // Replica B finds the expired lease and takes the job over.
    let live = claim_within(&b, Duration::from_secs(30)).await;
    assert_eq!(stale.job.id, live.job.id);
    assert_ne!(stale.token, live.token);
    assert_eq!(live.job.attempts, 2);
    // A wakes up: every write it tries is refused.
    let p = ProgressRow::default();
    assert!(
        !a.heartbeat(&stale, Duration::from_secs(30), p)
            .await
            .unwrap()
    );
    assert!(!a.set_source_digest(&stale, "sha256:bb").await.unwrap());
    assert!(
        !a.succeed_with_record(&stale, &record(stale.job.id, "m/x"), p, None, None)
            .await
            .unwrap()
    );
    assert!(!a.fail(&stale, "x", None).await.unwrap());
    assert!(!a.retry_later(&stale, "x", Duration::ZERO).await.unwrap());
    assert!(!a.defer(&stale, "x", Duration::ZERO).await.unwrap());
    assert!(!a.release(&stale).await.unwrap());
    assert!(
        a.by_repo("m/x").await.unwrap().is_empty(),
        "A wrote no record"
    );
    let j = b.get(live.job.id).await.unwrap().unwrap();
    assert_eq!((j.state, j.source_digest), (JobState::Running, None));
    // B's writes land.
    assert!(
        b.heartbeat(&live, Duration::from_secs(30), p)
            .await
            .unwrap()
    );
    assert!(
        b.succeed_with_record(&live, &record(live.job.id, "m/x"), p, None, None)
            .await
            .unwrap()
    );
    let j = a.get(live.job.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(a.by_repo("m/x").await.unwrap().len(), 1);
}

async fn retries_wait_for_their_time_and_attempts_run_out(backend: Backend) {
    let db = Database::new(backend).await;
    let s = db.open().await;
    let first = s.enqueue(&job("docker.io/library/r:1")).await.unwrap();
    let l = s.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(l.job.id, first.job.id);
    assert!(
        s.retry_later(&l, "503", Duration::from_secs(3600))
            .await
            .unwrap()
    );
    assert!(
        s.claim(Duration::from_secs(30)).await.unwrap().is_none(),
        "not due yet"
    );
    let due = s.next_due().await.unwrap().expect("a job is due later");
    assert!(
        due > Duration::from_secs(3500) && due <= Duration::from_secs(3600),
        "{due:?}"
    );
    let j = s.get(l.job.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.last_error.as_deref(), j.attempts),
        (JobState::Queued, Some("503"), 1)
    );
    // A lease that expires with no attempts left fails the job with a reason.
    let dead = s.enqueue(&job("docker.io/library/dead:1")).await.unwrap();
    for attempt in 1..=3 {
        let l = claim_within(&s, Duration::ZERO).await;
        assert_eq!((l.job.id, l.job.attempts), (dead.job.id, attempt));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let j = loop {
        assert!(s.claim(Duration::from_secs(1)).await.unwrap().is_none());
        let j = s.get(dead.job.id).await.unwrap().unwrap();
        if j.state != JobState::Running || Instant::now() > deadline {
            break j;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(j.state, JobState::Failed);
    assert!(j.last_error.unwrap().contains("no attempts are left"));
    assert!(j.finished_at.is_some());
}

async fn release_and_defer_give_the_attempt_back(backend: Backend) {
    let db = Database::new(backend).await;
    let s = db.open().await;
    s.enqueue(&job("docker.io/library/rel:1")).await.unwrap();
    let l = s.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert!(s.release(&l).await.unwrap());
    // Deferred as often as a rate limit says, a job never runs out of attempts (3 here).
    for _ in 0..5 {
        let l = s
            .claim(Duration::from_secs(30))
            .await
            .unwrap()
            .expect("due");
        assert_eq!(l.job.attempts, 1);
        assert!(s.defer(&l, "rate-limited", Duration::ZERO).await.unwrap());
    }
    let l = s.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert!(
        s.defer(&l, "rate-limited until later", Duration::from_secs(3600))
            .await
            .unwrap()
    );
    assert!(
        !s.defer(&l, "again", Duration::ZERO).await.unwrap(),
        "the lease is gone"
    );
    assert!(
        s.claim(Duration::from_secs(30)).await.unwrap().is_none(),
        "not due yet"
    );
    let j = s.get(l.job.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempts, j.last_error.as_deref()),
        (JobState::Queued, 0, Some("rate-limited until later"))
    );
    assert!(j.run_at - j.updated_at >= 3_599_000, "{j:?}");
}

async fn one_writer_per_target_tag_in_request_order(backend: Backend) {
    let db = Database::new(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    let first = a.enqueue(&job("docker.io/library/t:1")).await.unwrap();
    let lease = a.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert!(a.set_source_digest(&lease, "sha256:aa").await.unwrap());
    // The running job already copies the digest the tag had: the same request again is a new
    // job, queued after it; a pinned request for the same tag queues after that.
    let second = b.enqueue(&job("docker.io/library/t:1")).await.unwrap();
    assert_eq!(second.dedupe, Dedupe::QueuedAfter(first.job.id));
    let mut pinned = job(&format!("docker.io/library/t:1@sha256:{}", "b".repeat(64)));
    pinned.target_repo = first.job.target_repo.clone();
    let third = a.enqueue(&pinned).await.unwrap();
    assert_eq!(third.dedupe, Dedupe::New);
    // A digest-only job is not held up; the tag's jobs wait for the running one.
    let mut other = job(&format!("docker.io/library/u@sha256:{}", "c".repeat(64)));
    other.target_tag = None;
    let other = b.enqueue(&other).await.unwrap();
    let next = b.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(next.job.id, other.job.id);
    assert!(
        b.claim(Duration::from_secs(30)).await.unwrap().is_none(),
        "one writer per target tag"
    );
    assert!(a.next_due().await.unwrap().is_none(), "nothing to wake for");
    let p = ProgressRow::default();
    assert!(
        a.succeed_with_record(&lease, &record(lease.job.id, "m/t"), p, None, None)
            .await
            .unwrap()
    );
    // In request order, one at a time, on whichever replica claims.
    let turn = b.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(turn.job.id, second.job.id);
    assert!(a.claim(Duration::from_secs(30)).await.unwrap().is_none());
    assert!(a.fail(&turn, "gone", None).await.unwrap());
    let last = a.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(last.job.id, third.job.id);
}

async fn a_queued_job_widens_its_options_for_a_joining_request(backend: Backend) {
    let db = Database::new(backend).await;
    let s = db.open().await;
    let mut plain = job("docker.io/library/o:1");
    plain.referrers = false;
    let first = s.enqueue(&plain).await.unwrap();
    assert_eq!(first.dedupe, Dedupe::New);
    assert_eq!(s.enqueue(&plain).await.unwrap().dedupe, Dedupe::Joined);
    let mut wider = plain.clone();
    wider.referrers = true;
    wider.policy = Some(Policy::Pin);
    let merged = s.enqueue(&wider).await.unwrap();
    assert_eq!(merged.dedupe, Dedupe::Merged);
    assert_eq!(merged.job.id, first.job.id);
    let j = s.get(first.job.id).await.unwrap().unwrap();
    assert_eq!((j.referrers, j.policy), (true, Some(Policy::Pin)));
    assert_eq!(s.enqueue(&plain).await.unwrap().dedupe, Dedupe::Joined);
    // Running and asked for less than a new request wants: queued after it.
    let l = s.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    let mut follow = plain.clone();
    follow.policy = Some(Policy::Follow);
    assert_eq!(
        s.enqueue(&follow).await.unwrap().dedupe,
        Dedupe::QueuedAfter(l.job.id)
    );
}

async fn a_mirror_repository_has_one_owner(backend: Backend) {
    let db = Database::new(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    let mine = job("docker.io/library/a:1");
    a.enqueue(&mine).await.unwrap();
    let mut theirs = job("docker.io/library/b:1");
    theirs.target_repo = mine.target_repo.clone();
    let err = b.enqueue(&theirs).await.unwrap_err();
    assert!(matches!(err, EnqueueError::Owned { .. }), "{err}");
    assert!(
        err.to_string().contains(
            "belongs to docker.io/library/a; docker.io/library/b cannot be written there"
        ),
        "{err}"
    );
    assert_eq!(
        b.owner(&mine.target_repo).await.unwrap().as_deref(),
        Some("docker.io/library/a")
    );
    // In one batch, the refused request does not fail its neighbour.
    let out = b
        .enqueue_many(&[theirs.clone(), job("docker.io/library/c:1")])
        .await
        .unwrap();
    assert!(matches!(out[0], Err(EnqueueError::Owned { .. })));
    assert_eq!(out[1].as_ref().unwrap().dedupe, Dedupe::New);
    assert_eq!(
        a.stats().await.unwrap().by_state,
        vec![(JobState::Queued, 2)]
    );
}

async fn records_are_found_by_every_digest_they_name(backend: Backend) {
    let db = Database::new(backend).await;
    let s = db.open().await;
    // Just opened, the writer connection may still be on its way into the pool (`Busy`).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.ready().await.unwrap() != WriterState::Idle {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never idled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.enqueue(&job("docker.io/library/x:1")).await.unwrap();
    let l = s.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    let want = record(l.job.id, "m/x");
    assert!(
        s.succeed_with_record(&l, &want, ProgressRow::default(), None, None)
            .await
            .unwrap()
    );
    for digest in ["sha256:aa", "sha256:child", "sha256:sig"] {
        let found = s.by_digest(digest).await.unwrap();
        assert_eq!(found.len(), 1, "{digest}");
        let r = &found[0];
        assert_eq!(
            (r.job_id, &r.manifests, &r.requested_by, r.policy),
            (
                l.job.id,
                &want.manifests,
                &want.requested_by,
                Some(Policy::Pin)
            )
        );
    }
    assert!(s.by_digest("sha256:other").await.unwrap().is_empty());
    assert_eq!(
        s.by_repo_tag("m/x", "m1").await.unwrap().len(),
        1,
        "by the mirror tag"
    );
    assert_eq!(
        s.by_repo_tag("docker.io/library/x", "1")
            .await
            .unwrap()
            .len(),
        1,
        "by the source tag"
    );
    assert!(s.by_repo_tag("m/x", "1").await.unwrap().is_empty());
    assert_eq!(s.latest(Some("library/x"), 10).await.unwrap().len(), 1);
    assert!(s.latest(Some("nothing"), 10).await.unwrap().is_empty());
    assert_eq!(s.watched().await.unwrap().len(), 1);
    let j = s.get(l.job.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Succeeded);
}

async fn drift_is_recorded_once_and_its_job_resolves_it(backend: Backend) {
    let db = Database::new(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    let d = NewDrift {
        mirror_repo: "127.0.0.1:1/mirror/docker.io/library/d".into(),
        mirror_tag: Some("1".into()),
        source_repo: "docker.io/library/d".into(),
        source_tag: Some("1".into()),
        kind: DriftKind::Missing,
        recorded_digest: "sha256:aa".into(),
        observed_digest: None,
        missing: Some(vec!["sha256:child".into()]),
        policy: Policy::Follow,
    };
    let mut repair = job(&format!("docker.io/library/d@sha256:{}", "a".repeat(64)));
    repair.repair = true;
    let first = a
        .record_drift_and_enqueue(&d, Some(repair.clone()), None)
        .await
        .unwrap();
    assert!(first.new);
    let q = first.queued.unwrap().unwrap();
    assert_eq!(q.dedupe, Dedupe::New);
    assert_eq!(first.drift.job_id, Some(q.job.id));
    assert_eq!(
        q.job.requested_by,
        json!({"kind": "drift", "drift_id": first.drift.id, "reason": "missing"})
    );
    // Seen again (by another replica): the same row, the same job.
    let again = b
        .record_drift_and_enqueue(&d, Some(repair), None)
        .await
        .unwrap();
    assert!(!again.new);
    assert_eq!(again.drift.id, first.drift.id);
    assert_eq!(again.queued.unwrap().unwrap().job.id, q.job.id);
    assert_eq!(
        a.open_drift_counts().await.unwrap(),
        vec![(DriftKind::Missing, 1)]
    );
    assert_eq!(a.open_drift("docker.io/library/d").await.unwrap().len(), 1);
    // The job that repairs it resolves it.
    let l = b.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(l.job.id, q.job.id);
    assert!(l.job.repair);
    assert!(
        b.succeed_with_record(
            &l,
            &record(l.job.id, &d.mirror_repo),
            ProgressRow::default(),
            None,
            None
        )
        .await
        .unwrap()
    );
    assert!(a.open_drift(&d.mirror_repo).await.unwrap().is_empty());
    let all = a.list_drift(true, 10, None).await.unwrap();
    assert_eq!(all.len(), 1);
    assert!(all[0].resolved_at.is_some());
    // A problem a later round no longer sees is resolved by it.
    let gone = NewDrift {
        kind: DriftKind::UpstreamGone,
        missing: None,
        ..d.clone()
    };
    let row = a.record_drift_and_enqueue(&gone, None, None).await.unwrap();
    assert!(row.new && row.queued.is_none());
    let mirror_tag = d.mirror_tag.as_deref();
    assert_eq!(
        a.resolve_unseen_drift(&d.mirror_repo, mirror_tag, "sha256:aa", &[row.drift.id])
            .await
            .unwrap(),
        0,
        "seen this round"
    );
    assert_eq!(
        a.resolve_unseen_drift(&d.mirror_repo, mirror_tag, "sha256:aa", &[])
            .await
            .unwrap(),
        1
    );
    assert!(a.list_drift(false, 10, None).await.unwrap().is_empty());
}

async fn a_github_delivery_is_handled_once(backend: Backend) {
    let db = Database::new(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    let jobs = [job("docker.io/library/g:1"), job("docker.io/library/h:1")];
    let respond = |q: &[mirror_mirror::store::Enqueued]| json!({ "jobs": q.iter().map(|q| q.job.id).collect::<Vec<_>>() });
    let tasks: Vec<_> = [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .map(|s| {
            let jobs = jobs.clone();
            tokio::spawn(async move { s.deliver("d-1", &jobs, &respond).await.unwrap() })
        })
        .collect();
    let mut answers = Vec::new();
    let mut new = 0;
    for t in tasks {
        match t.await.unwrap() {
            Delivery::New { enqueued, response } => {
                new += 1;
                assert!(enqueued.iter().all(|q| q.dedupe == Dedupe::New));
                answers.push(response);
            }
            Delivery::Before { status, response } => {
                assert_eq!(status, 202);
                answers.push(response);
            }
        }
    }
    assert_eq!(new, 1, "handled once across replicas");
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert_eq!(
        a.stats().await.unwrap().by_state,
        vec![(JobState::Queued, 2)]
    );
    // A refused job fails the whole delivery, and nothing of it is stored.
    let mut bad = job("docker.io/library/z:1");
    bad.target_repo = jobs[0].target_repo.clone();
    let err = a
        .deliver("d-2", &[job("docker.io/library/k:1"), bad], &respond)
        .await
        .unwrap_err();
    assert!(matches!(err, EnqueueError::Owned { .. }));
    assert_eq!(
        a.stats().await.unwrap().by_state,
        vec![(JobState::Queued, 2)]
    );
    assert!(
        a.owner("127.0.0.1:1/mirror/docker.io/library/k")
            .await
            .unwrap()
            .is_none()
    );
}

async fn an_enqueue_wakes_the_workers_of_another_replica(backend: Backend) {
    let db = Database::new(backend).await;
    let a = db.open().await;
    // SQLite has one process per file: its own workers are the ones to wake.
    let b = match backend {
        Backend::Sqlite => a.clone(),
        Backend::Postgres => db.open().await,
    };
    let wake = b.wake();
    let woken = wake.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    let t0 = Instant::now();
    a.enqueue(&job("docker.io/library/w:1")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), woken)
        .await
        .expect("the other replica's workers are woken");
    eprintln!(
        "{backend:?}: woken {:?} after the enqueue began",
        t0.elapsed()
    );
    assert!(b.claim(Duration::from_secs(30)).await.unwrap().is_some());
}

async fn group_commit_enqueues_many_durably(backend: Backend) {
    const N: usize = 2000;
    let db = Database::new(backend).await;
    let s = db.open().await;
    let enqueuer = mirror_mirror::store::Enqueuer::start(s.clone());
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|w| {
            let enqueuer = enqueuer.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in (w..N).step_by(64) {
                    let new = job(&format!("docker.io/library/e{i}:1"));
                    let mut r = enqueuer
                        .enqueue(NewRequest {
                            source: new.source.clone(),
                            requested_by: new.requested_by.clone(),
                            jobs: vec![("default".into(), new)],
                        })
                        .await
                        .unwrap();
                    assert!(r.id.is_some());
                    let (_, q) = r.jobs.pop().unwrap();
                    let q = q.unwrap();
                    assert_eq!(q.dedupe, Dedupe::New);
                    ids.push(q.job.id);
                }
                ids
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let took = t0.elapsed();
    eprintln!(
        "{backend:?}: {N} durable enqueues through the Enqueuer (64 concurrent callers) in {took:?}: {:.0}/s",
        N as f64 / took.as_secs_f64()
    );
    assert_eq!(ids.len(), N);
    // Durable: another connection (a fresh store) sees every job.
    s.close().await;
    let again = db.open().await;
    assert_eq!(
        again.stats().await.unwrap().by_state,
        vec![(JobState::Queued, N as i64)]
    );
}

#[tokio::test]
async fn a_bad_database_url_names_mirror_database_and_what_to_do() {
    for (url, says) in [
        ("postgres://u@127.0.0.1:1/db", "check the URL"),
        ("postgres://u@127.0.0.1:notaport/db", "postgres://USER"),
    ] {
        let err = Store::open(url).await.unwrap_err().to_string();
        eprintln!("{url}: {err}");
        assert!(err.starts_with("MIRROR_DATABASE "), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
    // The server is up, the database is not there.
    let url = pg::shared().admin_url().replace("/postgres", "/no_such_db");
    let err = Store::open(&url).await.unwrap_err().to_string();
    assert!(
        err.starts_with("MIRROR_DATABASE ") && err.contains("no_such_db"),
        "{err}"
    );
    assert!(err.contains("does not exist"), "{err}");
    // SQLite: a path that cannot be created.
    let err = Store::open("/proc/no/such/dir/x.db")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("MIRROR_DATABASE "), "{err}");
    assert!(err.contains("give a writable file path"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    // A password never appears in the message.
    let err = Store::open("postgres://u:hunter2@127.0.0.1:1/db")
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.contains("hunter2"), "{err}");
}

async fn one_batch_dedupes_within_itself_as_if_one_by_one(backend: Backend) {
    let db = Database::new(backend).await;
    let s = db.open().await;
    let a = job("docker.io/library/a:1");
    let mut pinned = a.clone();
    pinned.policy = Some(Policy::Pin);
    let mut intruder = job("docker.io/library/b:1");
    intruder.target_repo = a.target_repo.clone();
    let out = s
        .enqueue_many(&[
            a.clone(),
            a.clone(),
            pinned,
            intruder,
            job("docker.io/library/c:1"),
        ])
        .await
        .unwrap();
    let words: Vec<&str> = out
        .iter()
        .map(|r| match r {
            Ok(q) => q.dedupe.as_str(),
            Err(EnqueueError::Owned { .. }) => "owned",
            Err(e) => panic!("{e}"),
        })
        .collect();
    assert_eq!(words, ["new", "joined", "merged", "owned", "new"]);
    let id = out[0].as_ref().unwrap().job.id;
    assert!(out[..3].iter().all(|r| r.as_ref().unwrap().job.id == id));
    let j = s.get(id).await.unwrap().unwrap();
    assert_eq!((j.state, j.policy), (JobState::Queued, Some(Policy::Pin)));
    assert_eq!(
        s.stats().await.unwrap().by_state,
        vec![(JobState::Queued, 2)]
    );
    // A running job and a request for it in the next batch: queued after it, once.
    let l = s.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(l.job.id, id);
    assert!(s.set_source_digest(&l, "sha256:aa").await.unwrap());
    let out = s.enqueue_many(&[a.clone(), a]).await.unwrap();
    assert_eq!(out[0].as_ref().unwrap().dedupe, Dedupe::QueuedAfter(id));
    assert_eq!(out[1].as_ref().unwrap().dedupe, Dedupe::Joined);
    assert_eq!(
        out[0].as_ref().unwrap().job.id,
        out[1].as_ref().unwrap().job.id
    );
}

async fn a_round_runs_once_per_interval_across_replicas(backend: Backend) {
    let db = Database::new(backend).await;
    // SQLite: one process per file, so the replicas are clones of one store.
    let first = db.open().await;
    let mut replicas = vec![first.clone()];
    for _ in 0..2 {
        replicas.push(match backend {
            Backend::Sqlite => first.clone(),
            Backend::Postgres => db.open().await,
        });
    }
    let interval = Duration::from_secs(1);
    let mut slots = Vec::new();
    for _ in 0..3 {
        // Start just after a boundary so the whole race falls within one slot.
        let wait = first.next_round_in(interval).await.unwrap();
        tokio::time::sleep(wait + Duration::from_millis(20)).await;
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let s = replicas[i % 3].clone();
                tokio::spawn(async move {
                    s.claim_round(RoundKind::Drift, interval, &format!("replica-{}", i % 3))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut won = Vec::new();
        for t in tasks {
            won.extend(t.await.unwrap());
        }
        assert_eq!(won.len(), 1, "one round per interval in all: {won:?}");
        let slot = won[0];
        replicas[2]
            .finish_round(slot, &json!({"checked": slot.slot}))
            .await
            .unwrap();
        let last = replicas[1]
            .last_round(RoundKind::Drift)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (last.slot, last.result),
            (slot.slot, Some(json!({"checked": slot.slot})))
        );
        assert!(last.finished_at.is_some());
        slots.push(slot.slot);
    }
    assert!(slots.windows(2).all(|w| w[1] > w[0]), "{slots:?}");
    // A replica started later (or a restart) sees the last round and what it found.
    let later = db.open().await;
    let last = later.last_round(RoundKind::Drift).await.unwrap().unwrap();
    assert_eq!(last.slot, *slots.last().unwrap());
    // Kinds are independent.
    assert!(
        first
            .claim_round(RoundKind::Sync, interval, "replica-0")
            .await
            .unwrap()
            .is_some()
    );
}

async fn racing_workers_write_a_tag_one_at_a_time_in_request_order(backend: Backend) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let db = Database::new(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    // Ten requests for one target tag (each pinned to another digest: none joins another),
    // arriving on two replicas at once.
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let mut j = job(&format!("docker.io/library/f:1@sha256:{i:064}"));
                j.target_repo = "127.0.0.1:1/mirror/docker.io/library/f".into();
                s.enqueue(&j).await.unwrap().job.id
            })
        })
        .collect();
    let mut requested = Vec::new();
    for t in tasks {
        requested.push(t.await.unwrap());
    }
    requested.sort();
    // Six workers on two replicas race for them; each job is written alone on the tag.
    let running = Arc::new(AtomicUsize::new(0));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let s = if w % 2 == 0 { a.clone() } else { b.clone() };
            let (running, order) = (running.clone(), order.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while order.lock().unwrap().len() < 10 {
                    assert!(Instant::now() < deadline, "the tag's jobs did not all run");
                    let Some(l) = s.claim(Duration::from_secs(30)).await.unwrap() else {
                        tokio::task::yield_now().await;
                        continue;
                    };
                    assert_eq!(
                        running.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two writers on one tag"
                    );
                    order.lock().unwrap().push(l.job.id);
                    tokio::task::yield_now().await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    let r = record(l.job.id, &l.job.target_repo);
                    assert!(
                        s.succeed_with_record(&l, &r, ProgressRow::default(), None, None)
                            .await
                            .unwrap()
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        *order.lock().unwrap(),
        requested,
        "claimed in request order"
    );
}

async fn claims_and_completions_keep_up(backend: Backend) {
    const N: usize = 400;
    let db = Database::new(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    let jobs: Vec<NewJob> = (0..N)
        .map(|i| job(&format!("docker.io/library/c{i}:1")))
        .collect();
    for chunk in jobs.chunks(100) {
        assert!(
            a.enqueue_many(chunk)
                .await
                .unwrap()
                .iter()
                .all(|r| r.is_ok())
        );
    }
    let t0 = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let s = if w % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let mut done = 0;
                while let Some(l) = s.claim(Duration::from_secs(30)).await.unwrap() {
                    let r = record(l.job.id, &l.job.target_repo);
                    assert!(
                        s.succeed_with_record(&l, &r, ProgressRow::default(), None, None)
                            .await
                            .unwrap()
                    );
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut done = 0;
    for w in workers {
        done += w.await.unwrap();
    }
    let took = t0.elapsed();
    eprintln!(
        "{backend:?}: {N} jobs claimed and succeeded (with their record) by 8 workers on 2 replicas in {took:?}: {:.0} jobs/s",
        N as f64 / took.as_secs_f64()
    );
    assert_eq!(done, N);
    assert_eq!(
        a.stats().await.unwrap().by_state,
        vec![(JobState::Succeeded, N as i64)]
    );
    assert_eq!(
        a.latest(None, 1000).await.unwrap().len(),
        N,
        "one record each"
    );
}

/// On PostgreSQL, wake-ups survive the LISTEN connection being cut (a failover, a proxy
/// timeout): the listener reconnects and re-subscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_wake_ups_survive_a_cut_listen_connection() {
    use sqlx::Connection as _;
    let db = Database::new(Backend::Postgres).await;
    let (a, b) = (db.open().await, db.open().await);
    let mut admin = sqlx::PgConnection::connect(&db.location).await.unwrap();
    let cut: Vec<bool> = sqlx::query_scalar(
        "select pg_terminate_backend(pid) from pg_stat_activity
         where datname = current_database() and query like 'LISTEN%'",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(
        cut.len() >= 2 && cut.iter().all(|c| *c),
        "both replicas' LISTEN cut: {cut:?}"
    );
    // Until the listener is back, a NOTIFY can be lost (the workers poll for that); enqueue
    // until one wakes B, which must happen once it re-subscribed.
    let wake = b.wake();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    loop {
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        a.enqueue(&job(&format!("docker.io/library/l{i}:1")))
            .await
            .unwrap();
        i += 1;
        if tokio::time::timeout(Duration::from_millis(500), woken)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B is never woken again after the cut"
        );
    }
    // The wake that ended the loop may be the one a dropped connection sends (before it
    // listens again): wait until B hears again, then it stays subscribed and the next enqueue
    // wakes it at once.
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.versions().ledger().is_none() {
        assert!(Instant::now() < deadline, "B never listens again");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let woken = wake.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    a.enqueue(&job("docker.io/library/after:1")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), woken)
        .await
        .expect("woken after the listener came back");
}

async fn a_blob_written_by_one_replica_is_found_by_another(backend: Backend) {
    let db = Database::new(backend).await;
    let a = db.open().await;
    let b = match backend {
        Backend::Sqlite => a.clone(),
        Backend::Postgres => db.open().await,
    };
    let (reg, base) = ("ghcr.io", "sha256:base".to_string());
    assert!(b.blob_repos(reg, &base, 5).await.unwrap().is_empty());
    a.record_blobs(
        reg,
        "acme/mirror/one",
        &[base.clone(), "sha256:top1".into()],
    )
    .await
    .unwrap();
    assert_eq!(
        b.blob_repos(reg, &base, 5).await.unwrap(),
        ["acme/mirror/one"]
    );
    // Per registry: the same digest elsewhere is another blob to move.
    assert!(b.blob_repos("quay.io", &base, 5).await.unwrap().is_empty());
    // Recorded again (idempotent) and in a second repository.
    a.record_blobs(reg, "acme/mirror/one", std::slice::from_ref(&base))
        .await
        .unwrap();
    b.record_blobs(reg, "acme/mirror/two", std::slice::from_ref(&base))
        .await
        .unwrap();
    let mut repos = a.blob_repos(reg, &base, 5).await.unwrap();
    repos.sort();
    assert_eq!(repos, ["acme/mirror/one", "acme/mirror/two"]);
    assert_eq!(a.blob_repos(reg, &base, 1).await.unwrap().len(), 1);
    // A mount from "one" failed (garbage collected there): only "two" is left to try.
    b.forget_blob(reg, "acme/mirror/one", &base).await.unwrap();
    assert_eq!(
        a.blob_repos(reg, &base, 5).await.unwrap(),
        ["acme/mirror/two"]
    );
    assert_eq!(
        a.blob_repos(reg, "sha256:top1", 5).await.unwrap(),
        ["acme/mirror/one"]
    );
}

/// Replicas starting at once on an empty PostgreSQL database: the migrations run once (sqlx
/// holds an advisory lock while it migrates), every replica starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_replicas_starting_at_once_migrate_once() {
    use sqlx::Connection as _;
    let db = Database::new(Backend::Postgres).await;
    let opens: Vec<_> = (0..3)
        .map(|_| {
            let location = db.location.clone();
            tokio::spawn(async move { Store::open(&location).await })
        })
        .collect();
    let mut stores = Vec::new();
    for o in opens {
        stores.push(o.await.unwrap().expect("every replica starts"));
    }
    let mut conn = sqlx::PgConnection::connect(&db.location).await.unwrap();
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("select version, success from _sqlx_migrations order by version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count();
    assert_eq!(applied.len(), files, "each migration once: {applied:?}");
    assert!(applied.iter().all(|(_, ok)| *ok));
    for s in &stores {
        assert_eq!(s.ready().await.unwrap(), WriterState::Idle);
    }
    // They work on one queue.
    stores[0]
        .enqueue(&job("docker.io/library/m:1"))
        .await
        .unwrap();
    assert!(
        stores[2]
            .claim(Duration::from_secs(30))
            .await
            .unwrap()
            .is_some()
    );
}

async fn a_request_for_a_running_pinned_job_waits_its_turn_on_the_tag(backend: Backend) {
    let db = Database::new(backend).await;
    let s = db.open().await;
    let first = s.enqueue(&job("docker.io/library/t:1")).await.unwrap();
    let lease = s.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert!(s.set_source_digest(&lease, "sha256:aa").await.unwrap());
    // The running job already copies the digest the tag had: a new request for the tag is a new
    // job, queued after it.
    let second = s.enqueue(&job("docker.io/library/t:1")).await.unwrap();
    assert_eq!(second.dedupe, Dedupe::QueuedAfter(first.job.id));
    // A digest-only job of another repository is not held up, but the second job waits.
    let mut other = job("docker.io/library/u@sha256:bb");
    other.target_tag = None;
    let other = s.enqueue(&other).await.unwrap();
    let next = s.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(next.job.id, other.job.id);
    assert!(
        s.claim(Duration::from_secs(30)).await.unwrap().is_none(),
        "one writer per target tag"
    );
    assert!(s.next_due().await.unwrap().is_none(), "nothing to wake for");
    assert!(
        s.succeed_with_record(
            &lease,
            &record(lease.job.id, "m/t"),
            ProgressRow::default(),
            None,
            None
        )
        .await
        .unwrap()
    );
    let turn = s.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(turn.job.id, second.job.id);
}

async fn notices_are_stored_with_what_they_announce_and_sent_by_one_replica(backend: Backend) {
    let db = Database::new(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    let notice = |n: i64| NewNotice {
        event: NoticeEvent::Job,
        body: json!({ "n": n }).to_string(),
    };
    // A lost lease writes neither the result nor its notice.
    a.enqueue(&job("docker.io/library/n:1")).await.unwrap();
    let lease = a.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    let mut stale = lease.clone();
    stale.token = "not-the-token".into();
    assert!(!a.fail(&stale, "x", Some(&notice(0))).await.unwrap());
    assert!(
        a.succeed_with_record(
            &lease,
            &record(lease.job.id, "m/n"),
            ProgressRow::default(),
            None,
            Some(&notice(1))
        )
        .await
        .unwrap()
    );
    a.enqueue(&job("docker.io/library/o:1")).await.unwrap();
    let lease = a.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert!(a.fail(&lease, "gone", Some(&notice(2))).await.unwrap());
    let pending = b
        .notices(Some(NoticeState::Pending), 10, None)
        .await
        .unwrap();
    assert_eq!(
        pending.iter().map(|n| n.body.as_str()).collect::<Vec<_>>(),
        [r#"{"n":2}"#, r#"{"n":1}"#],
        "newest first, only what was written"
    );
    // Two senders at once: each notice goes to one of them.
    let (x, y) = tokio::join!(
        a.claim_notices(10, Duration::from_secs(60)),
        b.claim_notices(10, Duration::from_secs(60))
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    let mut taken: Vec<i64> = x.iter().chain(&y).map(|n| n.id).collect();
    taken.sort();
    taken.dedup();
    assert_eq!(taken.len(), 2, "{x:?} {y:?}");
    assert_eq!(x.len() + y.len(), 2, "no notice taken twice");
    assert!(
        a.claim_notices(10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    let (first, second) = (pending[1].id, pending[0].id);
    b.notice_delivered(first).await.unwrap();
    // A failed attempt comes back after its backoff; given back at shutdown, at once.
    b.notice_failed(second, "HTTP 500", Some(Duration::ZERO))
        .await
        .unwrap();
    let again = a.claim_notices(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        again.iter().map(|n| (n.id, n.attempts)).collect::<Vec<_>>(),
        [(second, 1)]
    );
    a.release_notice(second).await.unwrap();
    assert_eq!(
        a.claim_notices(10, Duration::from_secs(60))
            .await
            .unwrap()
            .len(),
        1
    );
    a.notice_failed(second, "HTTP 500", None).await.unwrap();
    let mut counts = b.notice_counts().await.unwrap();
    counts.sort();
    assert_eq!(
        counts,
        [(NoticeState::Delivered, 1), (NoticeState::Failed, 1)]
    );
    assert!(
        b.next_notice_in().await.unwrap().is_none(),
        "nothing pending"
    );
    let failed = b
        .notices(Some(NoticeState::Failed), 10, None)
        .await
        .unwrap();
    assert_eq!(
        (failed[0].attempts, failed[0].last_error.as_deref()),
        (2, Some("HTTP 500"))
    );
}

async fn referrers_state_is_kept_with_the_job(backend: Backend) {
    let db = Database::new(backend).await;
    let s = db.open().await;
    s.enqueue(&job("docker.io/library/r:1")).await.unwrap();
    let lease = s.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    let failed = json!([{ "subject": "sha256:aa", "reference": "r:sha256-aa.sig", "error": "403", "transient": false }]);
    let referrers = JobReferrers {
        state: ReferrersState::Failed,
        failed: failed.clone(),
    };
    assert!(
        s.succeed_with_record(
            &lease,
            &record(lease.job.id, "m/r"),
            ProgressRow::default(),
            Some(&referrers),
            None
        )
        .await
        .unwrap()
    );
    let j = s.get(lease.job.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.referrers_state, j.referrers_failed),
        (
            JobState::Succeeded,
            Some(ReferrersState::Failed),
            Some(failed)
        )
    );
}

fn platforms(names: &[&str]) -> Option<Platforms> {
    Platforms::new(names.iter().map(|s| s.to_string()))
}

/// A job for every platform and one for a subset write different manifests under the tag:
/// neither joins the other, in either order, alone or in one batch; the same set named in
/// another order is the same request; and the tag ends as the newest request asked.
async fn a_platform_subset_is_its_own_request(backend: Backend) {
    let db = Database::new(backend).await;
    let s = db.open().await;
    let all = job("docker.io/library/p:1");
    let mut amd = all.clone();
    amd.platforms = platforms(&["linux/amd64"]);
    let mut two = all.clone();
    two.platforms = platforms(&["linux/arm64", "linux/amd64"]);
    let mut two_again = all.clone();
    two_again.platforms = platforms(&["linux/amd64", "linux/arm64", "linux/amd64"]);

    let a = s.enqueue(&all).await.unwrap();
    assert_eq!(a.dedupe, Dedupe::New);
    assert_eq!(a.job.platforms, None);
    // A subset never joins the job for every platform: queued after it.
    let b = s.enqueue(&amd).await.unwrap();
    assert_eq!(b.dedupe, Dedupe::QueuedAfter(a.job.id));
    assert_eq!(b.job.platforms, platforms(&["linux/amd64"]));
    // Nor the job for every platform the subset queued after it.
    let c = s.enqueue(&all).await.unwrap();
    assert_eq!(c.dedupe, Dedupe::QueuedAfter(b.job.id));
    // The newest live job asks for every platform: a request for the same joins it.
    assert_eq!(s.enqueue(&all).await.unwrap().job.id, c.job.id);
    // Two platforms, in either order and with a repeat, are one request.
    let d = s.enqueue(&two).await.unwrap();
    assert_eq!(d.dedupe, Dedupe::QueuedAfter(c.job.id));
    assert_eq!(d.job.platforms, platforms(&["linux/amd64", "linux/arm64"]));
    let e = s.enqueue(&two_again).await.unwrap();
    assert_eq!((e.dedupe, e.job.id), (Dedupe::Joined, d.job.id));
    // Stored as asked: a claim reads the set back.
    let first = s.claim(Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!((first.job.id, first.job.platforms), (a.job.id, None));

    // In one batch, as if one by one.
    let db = Database::new(backend).await;
    let s = db.open().await;
    let out = s
        .enqueue_many(&[all.clone(), amd.clone(), amd.clone(), all.clone()])
        .await
        .unwrap();
    let out: Vec<_> = out.into_iter().map(Result::unwrap).collect();
    assert_eq!(out[0].dedupe, Dedupe::New);
    assert_eq!(out[1].dedupe, Dedupe::QueuedAfter(out[0].job.id));
    assert_eq!(
        (out[2].dedupe.clone(), out[2].job.id),
        (Dedupe::Joined, out[1].job.id)
    );
    assert_eq!(out[3].dedupe, Dedupe::QueuedAfter(out[1].job.id));
    assert_eq!(out[3].job.platforms, None);
    assert_eq!(
        s.get(out[1].job.id).await.unwrap().unwrap().platforms,
        platforms(&["linux/amd64"])
    );
}

/// A subset's record keeps what it copied, and is found by each child's digest (the one the
/// tag names and the others), by the source index and by the rebuilt index.
async fn a_subset_record_is_found_by_its_children(backend: Backend) {
    let db = Database::new(backend).await;
    let s = db.open().await;
    let mut j = job("docker.io/library/x:1");
    j.platforms = platforms(&["linux/amd64", "linux/arm64"]);
    s.enqueue(&j).await.unwrap();
    let l = claim_within(&s, Duration::from_secs(30)).await;
    let mut want = record(l.job.id, "m/x");
    want.mirror_digest = "sha256:rebuilt".into();
    // Children only in the subset (not in the manifests) are still found.
    want.manifests = vec![json!({"digest": "sha256:rebuilt", "media_type": "index", "size": 10})];
    let subset = Subset {
        platforms: vec!["linux/amd64".into(), "linux/arm64/v8".into()],
        children: vec![
            SubsetChild {
                platform: "linux/amd64".into(),
                digest: "sha256:amd".into(),
                attestations: vec!["sha256:att".into()],
            },
            SubsetChild {
                platform: "linux/arm64/v8".into(),
                digest: "sha256:arm".into(),
                attestations: vec![],
            },
        ],
    };
    want.subset = Some(subset.clone());
    assert!(
        s.succeed_with_record(&l, &want, ProgressRow::default(), None, None)
            .await
            .unwrap()
    );
    for digest in ["sha256:amd", "sha256:arm", "sha256:aa", "sha256:rebuilt"] {
        let found = s.by_digest(digest).await.unwrap();
        assert_eq!(found.len(), 1, "{digest}");
        assert_eq!(found[0].subset.as_ref(), Some(&subset), "{digest}");
        assert!(found[0].subset.as_ref().unwrap().index_rebuilt());
        assert_eq!(found[0].mirror_digest, "sha256:rebuilt");
        assert_eq!(found[0].source_digest, "sha256:aa");
    }
    let tag = s.by_repo_tag("m/x", "m1").await.unwrap();
    assert_eq!(tag[0].subset.as_ref(), Some(&subset));
    assert_eq!(s.watched().await.unwrap()[0].subset.as_ref(), Some(&subset));
    // A whole image's record has none.
    s.enqueue(&job("docker.io/library/y:1")).await.unwrap();
    let l = claim_within(&s, Duration::from_secs(30)).await;
    let mut whole = record(l.job.id, "m/y");
    whole.source_repo = "docker.io/library/y".into();
    whole.source_digest = "sha256:bb".into();
    whole.mirror_digest = "sha256:bb".into();
    whole.manifests = vec![];
    assert!(
        s.succeed_with_record(&l, &whole, ProgressRow::default(), None, None)
            .await
            .unwrap()
    );
    assert_eq!(s.by_digest("sha256:bb").await.unwrap()[0].subset, None);
}

async fn a_request_to_several_targets_is_one_job_each_and_settles_one_digest(backend: Backend) {
    let db = Database::new(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    let to = |target: &str, repo: &str| {
        let mut j = job("docker.io/library/multi:1");
        j.target_repo = repo.to_string();
        (target.to_string(), j)
    };
    // Another source owns the third target's name: that target refuses, the others go on.
    let mut squatter = job("docker.io/library/other:1");
    squatter.target_repo = "h:3/m/multi".into();
    a.enqueue(&squatter).await.unwrap();
    let request = NewRequest {
        source: "docker.io/library/multi:1".into(),
        requested_by: json!({"kind": "token", "name": "t"}),
        jobs: vec![
            to("ghcr", "h:1/m/multi"),
            to("home", "h:2/m/multi"),
            to("third", "h:3/m/multi"),
        ],
    };
    let mut out = a
        .enqueue_requests(std::slice::from_ref(&request))
        .await
        .unwrap();
    let r = out.pop().unwrap();
    let id = r.id.expect("stored");
    assert_eq!(
        r.jobs
            .iter()
            .map(|(t, q)| (t.as_str(), q.is_ok()))
            .collect::<Vec<_>>(),
        [("ghcr", true), ("home", true), ("third", false)]
    );
    assert!(matches!(&r.jobs[2].1, Err(EnqueueError::Owned { .. })));
    let stored = b.request(id).await.unwrap().unwrap();
    assert_eq!(
        stored
            .jobs
            .iter()
            .map(|(t, j)| (t.as_str(), j.target_repo.as_str()))
            .collect::<Vec<_>>(),
        [("ghcr", "h:1/m/multi"), ("home", "h:2/m/multi")]
    );
    assert_eq!(
        (stored.state(), stored.source_digest.as_deref()),
        ("queued", None)
    );
    // The same request again joins both jobs: a second request, the same jobs.
    let again = b.enqueue_requests(&[request]).await.unwrap().pop().unwrap();
    assert_ne!(again.id, Some(id));
    assert!(
        again.jobs[..2]
            .iter()
            .all(|(_, q)| q.as_ref().unwrap().dedupe == Dedupe::Joined)
    );
    // The first job to resolve settles the digest; the second adopts it even if the tag moved.
    let ghcr = stored.jobs[0].1.id;
    let home = stored.jobs[1].1.id;
    assert_eq!(a.request_digest(home).await.unwrap(), None);
    assert_eq!(
        a.settle_request_digest(ghcr, "sha256:first").await.unwrap(),
        "sha256:first"
    );
    assert_eq!(
        b.settle_request_digest(home, "sha256:moved").await.unwrap(),
        "sha256:first"
    );
    assert_eq!(
        b.request_digest(home).await.unwrap().as_deref(),
        Some("sha256:first")
    );
    assert_eq!(
        a.settle_request_digest(squatter_id(&a).await, "sha256:own")
            .await
            .unwrap(),
        "sha256:own",
        "a job of no request keeps what it resolved"
    );
    // Finished apart: one target failed for good, the other succeeded → partial.
    while let Some(l) = a.claim(Duration::from_secs(30)).await.unwrap() {
        let running = b.request(id).await.unwrap().unwrap();
        if l.job.id == home {
            assert_eq!(running.state(), "running");
            assert!(a.fail(&l, "registry down", None).await.unwrap());
        } else {
            let r = record(l.job.id, &l.job.target_repo);
            let p = ProgressRow::default();
            assert!(a.succeed_with_record(&l, &r, p, None, None).await.unwrap());
        }
    }
    assert_eq!(b.request(id).await.unwrap().unwrap().state(), "partial");
}

/// The id of the job that owns `h:3/m/multi` for another source.
async fn squatter_id(s: &Store) -> i64 {
    s.list(None, 100, None)
        .await
        .unwrap()
        .into_iter()
        .find(|j| j.source == "docker.io/library/other:1")
        .unwrap()
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_blob_in_flight_is_claimed_by_one_replica_until_released_or_expired() {
    let db = Database::new(Backend::Postgres).await;
    let (a, b) = (db.open().await, db.open().await);
    let lease = Duration::from_secs(30);
    assert_eq!(
        a.claim_blob("h:1", "sha256:b", "m/one", "ta", lease)
            .await
            .unwrap(),
        None,
        "nobody held it: A's"
    );
    assert_eq!(
        b.claim_blob("h:1", "sha256:b", "m/two", "tb", lease)
            .await
            .unwrap()
            .as_deref(),
        Some("m/one"),
        "B waits for A's move into m/one"
    );
    assert!(
        a.renew_blob_claim("h:1", "sha256:b", "ta", lease)
            .await
            .unwrap()
    );
    assert!(
        !b.renew_blob_claim("h:1", "sha256:b", "tb", lease)
            .await
            .unwrap()
    );
    // Another blob, or another registry, is free.
    assert_eq!(
        b.claim_blob("h:2", "sha256:b", "m/two", "tb", lease)
            .await
            .unwrap(),
        None
    );
    a.release_blob_claim("h:1", "sha256:b", "ta").await.unwrap();
    assert_eq!(
        b.claim_blob("h:1", "sha256:b", "m/two", "tb", lease)
            .await
            .unwrap(),
        None
    );
    // A holder that stopped renewing loses it when its lease runs out.
    b.renew_blob_claim("h:1", "sha256:b", "tb", Duration::from_millis(1))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match a
            .claim_blob("h:1", "sha256:b", "m/one", "ta2", lease)
            .await
            .unwrap()
        {
            None => break,
            Some(_) => assert!(
                Instant::now() < deadline,
                "the expired claim was not taken over"
            ),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !b.renew_blob_claim("h:1", "sha256:b", "tb", lease)
            .await
            .unwrap()
    );
}

async fn a_request_to_several_targets_is_announced_once_when_its_last_job_ends(backend: Backend) {
    let db = Database::new(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    let job_notice = NewNotice {
        event: NoticeEvent::Job,
        body: json!({ "event": "job" }).to_string(),
    };
    // Each round: a request to two targets, one job claimed on each replica, both ending at
    // once (one succeeds, one fails for good): one request notice, no job notice.
    for round in 0..30 {
        let source = format!("docker.io/library/end{round}:1");
        let to = |target: &str, repo: &str| {
            let mut j = job(&source);
            j.target_repo = format!("{repo}/end{round}");
            (target.to_string(), j)
        };
        let request = NewRequest {
            source: source.clone(),
            requested_by: json!({"kind": "token", "name": "t"}),
            jobs: vec![to("ghcr", "h:1/m"), to("home", "h:2/m")],
        };
        let id = a
            .enqueue_requests(std::slice::from_ref(&request))
            .await
            .unwrap()
            .pop()
            .unwrap()
            .id
            .unwrap();
        let first = claim_within(&a, Duration::from_secs(30)).await;
        let second = claim_within(&b, Duration::from_secs(30)).await;
        let (ok, failed) = if first.job.target_repo.starts_with("h:1") {
            (first, second)
        } else {
            (second, first)
        };
        let (a2, b2, n1, n2) = (a.clone(), b.clone(), job_notice.clone(), job_notice.clone());
        let succeed = tokio::spawn(async move {
            let r = record(ok.job.id, &ok.job.target_repo);
            a2.succeed_with_record(&ok, &r, ProgressRow::default(), None, Some(&n1))
                .await
                .unwrap()
        });
        let fail =
            tokio::spawn(async move { b2.fail(&failed, "HTTP 503", Some(&n2)).await.unwrap() });
        assert!(succeed.await.unwrap() && fail.await.unwrap());
        let notices = b.notices(None, 100, None).await.unwrap();
        let ours: Vec<serde_json::Value> = notices
            .iter()
            .map(|n| serde_json::from_str(&n.body).unwrap())
            .filter(|v: &serde_json::Value| v["request_id"] == id)
            .collect();
        assert_eq!(
            ours.len(),
            1,
            "round {round}: one notice for the request: {ours:?}"
        );
        assert!(
            notices.iter().all(|n| n.event != NoticeEvent::Job),
            "round {round}: no job notice: {notices:?}"
        );
        let body = &ours[0];
        assert_eq!(body["state"], "partial", "{body}");
        assert_eq!(body["targets"][0]["state"], "succeeded", "{body}");
        assert_eq!(
            body["targets"][0]["pull"]["by_digest"],
            json!(format!("h:1/m/end{round}@sha256:aa")),
            "{body}"
        );
        assert_eq!(body["targets"][1]["state"], "failed", "{body}");
        assert_eq!(body["targets"][1]["error"], "HTTP 503", "{body}");
    }
    // A job of no request (or of a request to one target) still announces itself.
    a.enqueue(&job("docker.io/library/alone:1")).await.unwrap();
    let lease = claim_within(&a, Duration::from_secs(30)).await;
    assert!(a.fail(&lease, "gone", Some(&job_notice)).await.unwrap());
    let notices = a.notices(None, 100, None).await.unwrap();
    assert_eq!(
        notices
            .iter()
            .filter(|n| n.event == NoticeEvent::Job)
            .count(),
        1
    );
}

async fn a_job_the_rescue_fails_announces_its_end_and_ends_its_request(backend: Backend) {
    let db = Database::new(backend).await;
    let store = db.open().await.with_notices(true);
    let one_attempt = |source: &str, repo: &str| {
        let mut j = job(source);
        j.target_repo = repo.to_string();
        j.max_attempts = 1;
        j
    };
    // A job of no request whose worker dies with no attempts left.
    store
        .enqueue(&one_attempt("docker.io/library/lone:1", "h:1/m/lone"))
        .await
        .unwrap();
    let lone = claim_within(&store, Duration::from_secs(1)).await;
    // A request to two targets: one succeeds, the other's worker dies.
    let request = NewRequest {
        source: "docker.io/library/two:1".into(),
        requested_by: json!({"kind": "token", "name": "t"}),
        jobs: vec![
            (
                "ghcr".into(),
                one_attempt("docker.io/library/two:1", "h:1/m/two"),
            ),
            (
                "home".into(),
                one_attempt("docker.io/library/two:1", "h:2/m/two"),
            ),
        ],
    };
    let id = store
        .enqueue_requests(std::slice::from_ref(&request))
        .await
        .unwrap()
        .pop()
        .unwrap()
        .id
        .unwrap();
    let ghcr = claim_within(&store, Duration::from_secs(30)).await;
    let home = claim_within(&store, Duration::from_secs(1)).await;
    assert_eq!(ghcr.job.target_repo, "h:1/m/two");
    let ended = mirror_mirror::store::Job {
        state: JobState::Succeeded,
        ..ghcr.job.clone()
    };
    assert!(
        store
            .succeed_with_record(
                &ghcr,
                &record(ghcr.job.id, "h:1/m/two"),
                ProgressRow::default(),
                None,
                Some(&ended.end_notice(None)),
            )
            .await
            .unwrap()
    );
    assert!(
        store.notices(None, 10, None).await.unwrap().is_empty(),
        "the request is not over"
    );
    // Both leases run out; the next claim's rescue fails both jobs for good.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.get(home.job.id).await.unwrap().unwrap().state != JobState::Failed {
        assert!(
            store
                .claim(Duration::from_secs(30))
                .await
                .unwrap()
                .is_none()
        );
        assert!(Instant::now() < deadline, "the rescue failed the job");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let notices = store.notices(None, 10, None).await.unwrap();
    let bodies: Vec<(NoticeEvent, serde_json::Value)> = notices
        .iter()
        .map(|n| (n.event, serde_json::from_str(&n.body).unwrap()))
        .collect();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    let job_notice = bodies
        .iter()
        .find(|(e, _)| *e == NoticeEvent::Job)
        .map(|(_, b)| b)
        .expect("the lone job's notice");
    assert_eq!(job_notice["job_id"], lone.job.id, "{job_notice}");
    assert_eq!(job_notice["state"], "failed", "{job_notice}");
    assert!(
        job_notice["error"]
            .as_str()
            .is_some_and(|e| e.contains("no attempts are left")),
        "{job_notice}"
    );
    let request_notice = bodies
        .iter()
        .find(|(e, _)| *e == NoticeEvent::Request)
        .map(|(_, b)| b)
        .expect("the request's notice");
    assert_eq!(request_notice["request_id"], id, "{request_notice}");
    assert_eq!(request_notice["state"], "partial", "{request_notice}");
    assert_eq!(
        request_notice["targets"][1]["state"], "failed",
        "{request_notice}"
    );
}

/// A batch of requests (group commit) answers with each job as the database holds it, whatever
/// the answer: new, joined, widened (an earlier batch's job or one of this batch's), queued after
/// a running job, refused; and each request is stored with its jobs in order.
async fn a_batch_answers_each_request_with_the_jobs_as_stored(backend: Backend) {
    let db = Database::new(backend).await;
    let s = db.open().await;
    let request = |source: &str, jobs: Vec<(&str, NewJob)>| NewRequest {
        source: source.to_string(),
        requested_by: json!({"kind": "token", "name": "batch"}),
        jobs: jobs.into_iter().map(|(t, j)| (t.to_string(), j)).collect(),
    };
    // Before the batch: a running job to queue after, a queued one to widen, an owner to refuse.
    let busy = job("docker.io/library/busy:1");
    let running = s.enqueue(&busy).await.unwrap().job;
    let lease = claim_within(&s, Duration::from_secs(60)).await;
    assert_eq!(lease.job.id, running.id);
    assert!(s.set_source_digest(&lease, "sha256:old").await.unwrap());
    let mut narrow = job("docker.io/library/wide:1");
    narrow.referrers = false;
    let earlier = s.enqueue(&narrow).await.unwrap().job;
    let mut squatter = job("docker.io/library/squat:1");
    squatter.target_repo = "127.0.0.1:1/mirror/taken".into();
    s.enqueue(&squatter).await.unwrap();

    let fresh = job("docker.io/library/fresh:1");
    let mut fresh_narrow = fresh.clone();
    fresh_narrow.repair = true;
    let mut taken = job("docker.io/library/other:1");
    taken.target_repo = squatter.target_repo.clone();
    let batch = vec![
        request("docker.io/library/fresh:1", vec![("a", fresh.clone())]),
        request("docker.io/library/fresh:1", vec![("a", fresh)]),
        request("docker.io/library/fresh:1", vec![("a", fresh_narrow)]),
        request(
            "docker.io/library/wide:1",
            vec![("a", job("docker.io/library/wide:1"))],
        ),
        request(
            "docker.io/library/busy:1",
            vec![("a", {
                let mut b = busy.clone();
                b.repair = true;
                b
            })],
        ),
        request("docker.io/library/other:1", vec![("a", taken.clone())]),
        request(
            "docker.io/library/other:1",
            vec![("a", taken), ("b", job("docker.io/library/other:1"))],
        ),
    ];
    let out = s.enqueue_requests(&batch).await.unwrap();
    let words: Vec<Vec<String>> = out
        .iter()
        .map(|r| {
            r.jobs
                .iter()
                .map(|(_, q)| match q {
                    Ok(q) => q.dedupe.as_str().to_string(),
                    Err(EnqueueError::Owned { .. }) => "owned".into(),
                    Err(e) => panic!("{e}"),
                })
                .collect()
        })
        .collect();
    assert_eq!(
        words,
        [
            vec!["new"],
            vec!["joined"],
            vec!["merged"],
            vec!["merged"],
            vec!["queued_after"],
            vec!["owned"],
            vec!["owned", "new"],
        ]
    );
    assert_eq!(
        out[5].id, None,
        "a request every target refused is not stored"
    );
    // The last answer naming a job is the job as stored; an earlier one may show it before a
    // later request of the batch widened it (SQLite answers as of each request).
    let answered: Vec<&mirror_mirror::store::Enqueued> = out
        .iter()
        .flat_map(|r| r.jobs.iter().filter_map(|(_, q)| q.as_ref().ok()))
        .collect();
    for (i, q) in answered.iter().enumerate() {
        let stored = s.get(q.job.id).await.unwrap().unwrap();
        if answered[i + 1..]
            .iter()
            .all(|later| later.job.id != q.job.id)
        {
            assert_eq!(
                q.job, stored,
                "answered {:?} for job {}",
                q.dedupe, q.job.id
            );
        } else {
            assert_eq!(
                (
                    &q.job.source,
                    &q.job.target_repo,
                    q.job.created_at,
                    q.job.state
                ),
                (
                    &stored.source,
                    &stored.target_repo,
                    stored.created_at,
                    stored.state
                )
            );
        }
    }
    for r in &out {
        let Some(id) = r.id else { continue };
        let stored = s.request(id).await.unwrap().unwrap();
        assert_eq!(
            stored
                .jobs
                .iter()
                .map(|(t, j)| (t.clone(), j.id))
                .collect::<Vec<_>>(),
            r.jobs
                .iter()
                .filter_map(|(t, q)| q.as_ref().ok().map(|q| (t.clone(), q.job.id)))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            stored.requested_by,
            json!({"kind": "token", "name": "batch"})
        );
    }
    // The widened jobs are the stored ones, with the options of both requests.
    let wide = &out[3].jobs[0].1.as_ref().unwrap().job;
    assert_eq!((wide.id, wide.referrers), (earlier.id, true));
    let merged = &out[2].jobs[0].1.as_ref().unwrap().job;
    assert!(merged.repair, "{merged:?}");
    let after = &out[4].jobs[0].1.as_ref().unwrap();
    assert_eq!(after.dedupe, Dedupe::QueuedAfter(running.id));
}
