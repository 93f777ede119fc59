//! Workers and readiness against a real service process: a lease that cannot be renewed stops the
//! copy, job metrics count only results that were written, `/readyz` does not wait on a busy writer.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection as _;

use crate::faults::{Fault, Faulty, Route, Stall, seed, wait_for};
use crate::support::image::Style;
use crate::support::service::Service;
use crate::support::{Pusher, Registry};

/// A write lock on a service's database taken from outside, as a stuck writer would hold it:
/// SQLite's lock (`BEGIN IMMEDIATE`), or on PostgreSQL an `EXCLUSIVE` lock of the job table (reads
/// go on, every write of a job waits).
pub(crate) enum HeldWriter {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl HeldWriter {
    /// Sets the lease token of job `id`, inside the held transaction (another worker took it).
    pub(crate) async fn take_over(&mut self, id: i64) {
        match self {
            HeldWriter::Sqlite(c) => {
                sqlx::query("update job set lease_token = 'taken-over' where id = ?1")
                    .bind(id)
                    .execute(c)
                    .await
                    .unwrap();
            }
            HeldWriter::Postgres(c) => {
                sqlx::query("update job set lease_token = 'taken-over' where id = $1")
                    .bind(id)
                    .execute(c)
                    .await
                    .unwrap();
            }
        };
    }

    /// Ends the held transaction with `COMMIT` or `ROLLBACK`.
    pub(crate) async fn end(&mut self, how: &str) {
        let how = sqlx::AssertSqlSafe(how.to_string());
        match self {
            HeldWriter::Sqlite(c) => {
                sqlx::query(how).execute(c).await.unwrap();
            }
            HeldWriter::Postgres(c) => {
                sqlx::query(how).execute(c).await.unwrap();
            }
        }
    }
}

/// Takes the write lock on the service's database `db` from outside (see [`HeldWriter`]).
pub(crate) async fn hold_writer(db: &Path) -> HeldWriter {
    let location = crate::support::service::database_for(db).await;
    if location.starts_with("postgres://") {
        let mut c = sqlx::PgConnection::connect(&location).await.unwrap();
        sqlx::query("BEGIN").execute(&mut c).await.unwrap();
        sqlx::query("LOCK TABLE job IN EXCLUSIVE MODE")
            .execute(&mut c)
            .await
            .unwrap();
        return HeldWriter::Postgres(c);
    }
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{location}"))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut c)
        .await
        .unwrap();
    HeldWriter::Sqlite(c)
}

/// The value of the unlabelled sample `name` in the service's `/metrics`.
pub(crate) async fn metric(svc: &Service, name: &str) -> f64 {
    let (status, text) = svc.get_text("/metrics").await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} is not in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A service with one worker, a 3 s lease and one attempt per job, mirroring from a faulty
/// source whose first blob stalls halfway; the job is running when this returns.
async fn stalled_job(dir: &Path) -> (Service, Registry, Arc<Stall>, i64, String) {
    let f = Faulty::default();
    seed(&f);
    let stall = Arc::new(Stall::default());
    f.then(Route::Blob, &[Fault::Stall(stall.clone())]);
    let up = f.start().await;
    let down = Registry::anonymous().await;
    let svc = Service::start(
        &dir.join("m.db"),
        &format!("{}/mirror", down.host()),
        &up,
        &[
            ("MIRROR_LEASE", "3"),
            ("MIRROR_WORKERS", "1"),
            ("MIRROR_MAX_ATTEMPTS", "1"),
        ],
    )
    .await;
    let (status, job) = svc
        .mirror(&json!({ "image": format!("{up}/app:v1") }))
        .await;
    assert_eq!(status, 202, "{job}");
    wait_for(
        "the copy to reach the stalled blob",
        Duration::from_secs(30),
        || stall.reached(),
    )
    .await;
    let repo = format!("mirror/{}/app", up.replace(':', "_"));
    (svc, down, stall, job["id"].as_i64().unwrap(), repo)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_cannot_renew_its_lease_stops_copying_within_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let (svc, down, stall, id, repo) = stalled_job(dir.path()).await;
    // Renewals now hang on the write lock and then fail: the lease cannot be renewed.
    let mut lock = hold_writer(&db).await;
    let locked = Instant::now();
    wait_for(
        "the copy to stop reading the source once its lease ran out",
        Duration::from_secs(5),
        || stall.dropped(),
    )
    .await;
    let stopped = locked.elapsed();
    eprintln!(
        "figure: the copy stopped {stopped:?} after lease renewals began to fail (lease 3 s)"
    );
    assert!(
        stopped <= Duration::from_millis(3_500),
        "the copy stopped {stopped:?} after renewals began to fail; the lease is 3 s"
    );
    // The database works again and the source would send the rest: the abandoned copy writes
    // nothing — the job's expired lease is rescued (no attempts left: failed), the tag never lands.
    lock.end("ROLLBACK").await;
    stall.release();
    let job = svc.wait_job(id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap()
            .contains("stopped and no attempts are left"),
        "{job}"
    );
    assert!(
        Pusher::new(&down).get_manifest(&repo, "v1").await.is_none(),
        "the abandoned copy wrote the tag"
    );
    assert!(
        svc.log()
            .contains("the lease could not be renewed before it ran out"),
        "{}",
        svc.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_lost_its_lease_before_its_result_was_written_is_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let (svc, down, stall, id, repo) = stalled_job(dir.path()).await;
    // Another worker takes the job over while this one's copy ends: its result cannot be written.
    let mut lock = hold_writer(&db).await;
    lock.take_over(id).await;
    stall.release();
    let pusher = Pusher::new(&down);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pusher.get_manifest(&repo, "v1").await.is_none() {
        assert!(Instant::now() < deadline, "the copy did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lock.end("COMMIT").await;
    // The lease runs out and no attempts are left: the job fails, and nothing was counted finished.
    let job: Value = svc.wait_job(id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        svc.log()
            .contains("lease lost before the result was written"),
        "{}",
        svc.log()
    );
    assert_eq!(metric(&svc, "mirror_job_duration_seconds_count").await, 0.0);
    assert_eq!(metric(&svc, "mirror_bytes_copied_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_answers_within_a_second_while_the_writer_is_busy() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let svc = Service::start(&db, &format!("{}/mirror", down.host()), &up.host(), &[]).await;
    let (status, body) = svc.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    // A long write holds the database's write lock: the pod is busy, not broken.
    let mut lock = hold_writer(&db).await;
    let asked = Instant::now();
    let (status, body) = svc.get("/readyz").await;
    let took = asked.elapsed();
    eprintln!("figure: /readyz answered {status} in {took:?} while the writer was held");
    assert!(took < Duration::from_secs(1), "/readyz took {took:?}");
    assert_eq!((status, &body["writer"]), (200, &json!("busy")), "{body}");
    lock.end("ROLLBACK").await;
    let (status, body) = svc.get("/readyz").await;
    assert_eq!((status, &body["writer"]), (200, &json!("idle")), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_reads_the_targets_tag_while_its_source_is_resolved() {
    let f = Faulty::default();
    seed(&f);
    // The source's first manifest answer (the resolve) is held until released.
    let stall = Arc::new(Stall::default());
    f.then(Route::Manifest, &[Fault::Stall(stall.clone())]);
    let up = f.start().await;
    let down = Registry::anonymous().await;
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up,
        &[("MIRROR_WORKERS", "1")],
    )
    .await;
    let (status, job) = svc
        .mirror(&json!({ "image": format!("{up}/app:v1") }))
        .await;
    assert_eq!(status, 202, "{job}");
    let tag_read = format!("/v2/mirror/{}/app/manifests/v1 ", up.replace(':', "_"));
    // One round trip for both: the target's tag is asked for before the resolve is answered.
    wait_for(
        "the target's tag read while the source's resolve is held",
        Duration::from_secs(30),
        || stall.reached() && down.log().contains(&tag_read),
    )
    .await;
    stall.release();
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_that_counts_no_pulls_is_resolved_with_the_get_the_copy_needs() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    for (i, repo) in ["first", "second"].into_iter().enumerate() {
        let img = p
            .image(repo, 300 + i as u64, &[1000], false, Style::Compact)
            .await;
        p.manifest(repo, "v1", &img.media_type, &img.bytes).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[("MIRROR_WORKERS", "1")],
    )
    .await;
    for repo in ["first", "second"] {
        let (status, job) = svc
            .mirror(&json!({ "image": format!("{}/{repo}:v1", up.host()) }))
            .await;
        assert_eq!(status, 202, "{job}");
        let job = svc
            .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
            .await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    let log = up.log();
    let asked = |method: &str, path: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("\"{method} {path}")))
            .count()
    };
    // The first resolve cannot know whether manifest GETs count (a HEAD does not); its GET by
    // digest answered without an allowance, so the second reads the tag whole, once.
    assert_eq!(asked("HEAD", "/v2/first/manifests/v1 "), 1, "{log}");
    assert_eq!(asked("HEAD", "/v2/second/manifests/v1 "), 0, "{log}");
    assert_eq!(asked("GET", "/v2/second/manifests/v1 "), 1, "{log}");
    assert_eq!(asked("GET", "/v2/second/manifests/sha256:"), 0, "{log}");
}

/// A service with one worker and no referrer copies, mirroring from `up` to `front`.
async fn one_worker_behind(
    dir: &tempfile::TempDir,
    front: &crate::support::front::Front,
    up: &Registry,
) -> Service {
    Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", front.host()),
        &up.host(),
        &[("MIRROR_WORKERS", "1"), ("MIRROR_REFERRERS", "false")],
    )
    .await
}

/// Once only a job's last write is left (its top manifest), its worker takes the next job while
/// that write is answered and the image read back, one such tail at a time: with one worker and
/// every tag's manifest `PUT` held, the second job runs up to its own `PUT` beside the first one's,
/// and the third waits until the first is done.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_takes_its_next_job_while_the_last_ones_final_write_is_answered() {
    use crate::support::front::{Action, Front};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let mut images = Vec::new();
    for (i, name) in ["tail/a", "tail/b", "tail/c"].into_iter().enumerate() {
        let img = p
            .image(name, 900 + i as u64, &[4_000], false, Style::Compact)
            .await;
        p.manifest(name, "v1", &img.media_type, &img.bytes).await;
        images.push(img);
    }
    // Each job's last write, its manifest PUT by tag, is held until released.
    let (release, released) = tokio::sync::watch::channel(false);
    let held = Arc::new(AtomicUsize::new(0));
    let front = Front::start(&down.host(), {
        let held = held.clone();
        move |seen| {
            if seen.method == "PUT" && seen.path.ends_with("/manifests/v1") {
                held.fetch_add(1, Ordering::SeqCst);
                Action::HoldUntil(released.clone())
            } else {
                Action::Pass
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let svc = one_worker_behind(&dir, &front, &up).await;
    let mut ids = Vec::new();
    for name in ["tail/a", "tail/b", "tail/c"] {
        let (status, job) = svc
            .mirror(&json!({ "image": format!("{}/{name}:v1", up.host()) }))
            .await;
        assert_eq!(status, 202, "{job}");
        ids.push(job["id"].as_i64().unwrap());
    }
    wait_for(
        "the second job's manifest PUT beside the first one's",
        Duration::from_secs(30),
        || held.load(Ordering::SeqCst) >= 2,
    )
    .await;
    let a = svc.get(&format!("/jobs/{}", ids[0])).await.1;
    let b = svc.get(&format!("/jobs/{}", ids[1])).await.1;
    assert_eq!(
        (&a["state"], &b["state"]),
        (&json!("running"), &json!("running")),
        "both copies wait on their last write: {a} {b}"
    );
    // One tail at a time: the third job is not taken while the first one's write is unanswered.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let c = svc.get(&format!("/jobs/{}", ids[2])).await.1;
    assert_eq!(c["state"], "queued", "{c}");
    assert_eq!(
        held.load(Ordering::SeqCst),
        2,
        "only two read-backs started"
    );
    release.send(true).unwrap();
    for (id, img) in ids.iter().zip(&images) {
        let job = svc.wait_job(*id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(job["source_digest"], json!(img.digest), "{job}");
    }
}

/// A blob over 1 MiB that no copy put anywhere on the target is read from the source beside the
/// target's `HEAD` and upload `POST`, not after their answers; one the ledger knows is in the
/// repository is not read at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_put_nowhere_on_the_target_is_read_while_its_upload_opens() {
    use crate::support::front::{Action, Front};

    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let big = crate::support::image::bytes(31, 3 << 20);
    let config = |seed: u64| format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
    let v1 = p
        .image_with(
            "early/app",
            config(1).as_bytes(),
            std::slice::from_ref(&big),
            false,
            Style::Compact,
        )
        .await;
    p.manifest("early/app", "v1", &v1.media_type, &v1.bytes)
        .await;
    let v2 = p
        .image_with(
            "early/app",
            config(2).as_bytes(),
            &[big.clone(), vec![7; 1000]],
            false,
            Style::Compact,
        )
        .await;
    p.manifest("early/app", "v2", &v2.media_type, &v2.bytes)
        .await;
    // Upload POSTs are held until released (and pass at once after).
    let (release, released) = tokio::sync::watch::channel(false);
    let front = Front::start(&down.host(), move |seen| {
        if seen.method == "POST" && seen.path.contains("/blobs/uploads/") {
            Action::HoldUntil(released.clone())
        } else {
            Action::Pass
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let svc = one_worker_behind(&dir, &front, &up).await;
    let big_get = format!(
        "\"GET /v2/early/app/blobs/{} ",
        crate::support::sha256(&big)
    );
    let (_, job) = svc
        .mirror(&json!({ "image": format!("{}/early/app:v1", up.host()) }))
        .await;
    wait_for(
        "the big layer's source GET while its upload POST is held",
        Duration::from_secs(30),
        || up.log().contains(&big_get),
    )
    .await;
    release.send(true).unwrap();
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    // v2 shares the layer, which the ledger knows is in the repository: the target's HEAD says
    // so, and the source is not read for it again.
    let (_, job) = svc
        .mirror(&json!({ "image": format!("{}/early/app:v2", up.host()) }))
        .await;
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["source_digest"], json!(v2.digest), "{job}");
    assert_eq!(up.log().matches(&big_get).count(), 1, "{}", up.log());
}
