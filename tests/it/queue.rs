//! The durable queue on a real SQLite file: dedupe under concurrency, racing claims, stale leases.

use std::collections::HashSet;
use std::time::Duration;

use mirror_mirror::db::Db;
use mirror_mirror::ledger::{self, NewRecord};
use mirror_mirror::queue::{self, NewJob, ProgressRow};

async fn db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("q.db").to_str().unwrap())
        .await
        .unwrap();
    (dir, db)
}

fn job(source: &str) -> NewJob {
    NewJob {
        source: source.to_string(),
        target_repo: format!("127.0.0.1:1/mirror/{source}"),
        target_tag: Some("1".into()),
        requested_by: r#"{"kind":"token","name":"t"}"#.into(),
        max_attempts: 3,
        referrers: true,
        policy: None,
        repair: false,
    }
}

fn record(job_id: i64) -> NewRecord {
    NewRecord {
        job_id,
        source_repo: "docker.io/library/x".into(),
        source_ref: "docker.io/library/x:1".into(),
        tag: Some("1".into()),
        source_digest: "sha256:aa".into(),
        mirror_repo: "m/x".into(),
        mirror_digest: "sha256:aa".into(),
        media_type: "m".into(),
        manifests: "[]".into(),
        size_bytes: 1,
        requested_by: "{}".into(),
        verified_at: 1,
        mirror_tag: Some("1".into()),
        policy: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_identical_concurrent_requests_make_one_job() {
    let (_dir, db) = db().await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { queue::enqueue(&db, &job("a")).await.unwrap() })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut created = 0;
    for t in tasks {
        let q = t.await.unwrap();
        ids.insert(q.job.id);
        created += q.created() as usize;
    }
    assert_eq!(ids.len(), 1, "all 50 requests return the same job");
    assert_eq!(created, 1);
    // Once it finished, the same request makes a new job.
    let lease = queue::claim(&db, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert!(
        queue::succeed(
            &db,
            &lease,
            &record(lease.job.id),
            ProgressRow::default(),
            None,
            None
        )
        .await
        .unwrap()
    );
    let again = queue::enqueue(&db, &job("a")).await.unwrap();
    assert!(again.created());
    assert_ne!(again.job.id, lease.job.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_workers_claim_each_job_once() {
    let (_dir, db) = db().await;
    for i in 0..20 {
        queue::enqueue(&db, &job(&format!("j{i}"))).await.unwrap();
    }
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some(l) = queue::claim(&db, Duration::from_secs(30)).await.unwrap() {
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
    assert_eq!(all.len(), 20, "every job claimed");
    assert_eq!(unique.len(), 20, "no job claimed twice: {all:?}");
}

#[tokio::test]
async fn a_stale_lease_writes_nothing() {
    let (_dir, db) = db().await;
    queue::enqueue(&db, &job("s")).await.unwrap();
    // Worker A claims with a lease that expires at once (it "hangs").
    let a = queue::claim(&db, Duration::ZERO).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Worker B finds the expired lease, takes the job over.
    let b = queue::claim(&db, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.job.id, b.job.id);
    assert_ne!(a.token, b.token);
    assert_eq!(b.job.attempts, 2);
    // A wakes up: every write it tries is refused.
    assert!(
        !queue::heartbeat(&db, &a, Duration::from_secs(30), ProgressRow::default())
            .await
            .unwrap()
    );
    assert!(
        !queue::set_source_digest(&db, &a, "sha256:bb")
            .await
            .unwrap()
    );
    assert!(
        !queue::succeed(
            &db,
            &a,
            &record(a.job.id),
            ProgressRow::default(),
            None,
            None
        )
        .await
        .unwrap()
    );
    assert!(!queue::fail(&db, &a, "x", None).await.unwrap());
    assert!(
        !queue::retry_later(&db, &a, "x", Duration::ZERO)
            .await
            .unwrap()
    );
    assert!(
        ledger::by_repo(&db, "m/x").await.unwrap().is_empty(),
        "A wrote no ledger record"
    );
    // B's writes land.
    assert!(
        queue::succeed(
            &db,
            &b,
            &record(b.job.id),
            ProgressRow::default(),
            None,
            None
        )
        .await
        .unwrap()
    );
    let j = queue::get(&db, b.job.id).await.unwrap().unwrap();
    assert_eq!(j.state, "succeeded");
    assert_eq!(ledger::by_repo(&db, "m/x").await.unwrap().len(), 1);
}

#[tokio::test]
async fn retries_wait_for_their_time_and_attempts_run_out() {
    let (_dir, db) = db().await;
    queue::enqueue(&db, &job("r")).await.unwrap();
    let l = queue::claim(&db, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert!(
        queue::retry_later(&db, &l, "503", Duration::from_secs(3600))
            .await
            .unwrap()
    );
    assert!(
        queue::claim(&db, Duration::from_secs(30))
            .await
            .unwrap()
            .is_none(),
        "not due yet"
    );
    let j = queue::get(&db, l.job.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state.as_str(), j.last_error.as_deref()),
        ("queued", Some("503"))
    );
    // A lease that expires with no attempts left fails the job with a reason.
    queue::enqueue(&db, &job("dead")).await.unwrap();
    let mut last = None;
    for _ in 0..3 {
        let l = queue::claim(&db, Duration::ZERO).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
        last = Some(l.job.id);
    }
    assert!(
        queue::claim(&db, Duration::from_secs(1))
            .await
            .unwrap()
            .is_none()
    );
    let j = queue::get(&db, last.unwrap()).await.unwrap().unwrap();
    assert_eq!(j.state, "failed");
    assert!(j.last_error.unwrap().contains("no attempts are left"));
}

#[tokio::test]
async fn release_at_shutdown_gives_the_attempt_back() {
    let (_dir, db) = db().await;
    queue::enqueue(&db, &job("rel")).await.unwrap();
    let l = queue::claim(&db, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert!(queue::release(&db, &l).await.unwrap());
    let l2 = queue::claim(&db, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l2.job.attempts, 1);
}

#[tokio::test]
async fn a_deferred_job_waits_for_its_time_and_keeps_its_attempts() {
    let (_dir, db) = db().await;
    queue::enqueue(&db, &job("def")).await.unwrap();
    // Deferred as often as a rate limit says, a job never runs out of attempts (3 here).
    for _ in 0..5 {
        let l = queue::claim(&db, Duration::from_secs(30))
            .await
            .unwrap()
            .expect("due");
        assert_eq!(l.job.attempts, 1);
        assert!(queue::defer(&db, &l, "rate-limited", 0).await.unwrap());
    }
    let l = queue::claim(&db, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let later = mirror_mirror::db::now_ms() + 3_600_000;
    assert!(
        queue::defer(&db, &l, "rate-limited until later", later)
            .await
            .unwrap()
    );
    assert!(
        !queue::defer(&db, &l, "again", later).await.unwrap(),
        "the lease is gone"
    );
    assert!(
        queue::claim(&db, Duration::from_secs(30))
            .await
            .unwrap()
            .is_none(),
        "not due yet"
    );
    let j = queue::get(&db, l.job.id).await.unwrap().unwrap();
    assert_eq!(
        (
            j.state.as_str(),
            j.attempts,
            j.run_at,
            j.last_error.as_deref()
        ),
        ("queued", 0, later, Some("rate-limited until later"))
    );
}

#[tokio::test]
async fn a_request_for_a_running_pinned_job_waits_its_turn_on_the_tag() {
    let (_dir, db) = db().await;
    let first = queue::enqueue(&db, &job("t")).await.unwrap();
    let lease = queue::claim(&db, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert!(
        queue::set_source_digest(&db, &lease, "sha256:aa")
            .await
            .unwrap()
    );
    // The running job already copies the digest the tag had: a new request for the tag is a new
    // job, queued after it.
    let second = queue::enqueue(&db, &job("t")).await.unwrap();
    assert_eq!(second.dedupe, queue::Dedupe::QueuedAfter(first.job.id));
    // A digest-only job of another tag is not held up, but the second job waits for the first.
    let mut other = job("u");
    other.target_tag = None;
    let other = queue::enqueue(&db, &other).await.unwrap();
    let next = queue::claim(&db, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.job.id, other.job.id);
    assert!(
        queue::claim(&db, Duration::from_secs(30))
            .await
            .unwrap()
            .is_none(),
        "one writer per target tag"
    );
    assert!(
        queue::next_due(&db).await.unwrap().is_none(),
        "nothing to wake for"
    );
    assert!(
        queue::succeed(
            &db,
            &lease,
            &record(lease.job.id),
            ProgressRow::default(),
            None,
            None
        )
        .await
        .unwrap()
    );
    let turn = queue::claim(&db, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(turn.job.id, second.job.id);
}

#[tokio::test]
async fn a_mirror_repository_has_one_owner() {
    let (_dir, db) = db().await;
    let mine = job("docker.io/library/a:1");
    queue::enqueue(&db, &mine).await.unwrap();
    let mut theirs = job("docker.io/library/b:1");
    theirs.target_repo = mine.target_repo.clone();
    let err = queue::enqueue(&db, &theirs).await.unwrap_err();
    assert!(
        err.to_string().contains(
            "belongs to docker.io/library/a; docker.io/library/b cannot be written there"
        ),
        "{err}"
    );
    assert_eq!(
        queue::owner(&db, &mine.target_repo)
            .await
            .unwrap()
            .as_deref(),
        Some("docker.io/library/a")
    );
}
