//! Drift rounds and mirror-list syncs asked for over HTTP run in the background: the `POST`
//! answers `202` at once, `GET` shows the running round, and SIGTERM during a round exits within
//! the grace period.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::faults::{Fault, Faulty, Route, Stall, seed, wait_for};
use crate::support::Registry;
use crate::support::service::Service;

/// `POST path`, which must answer within 5 s even though its round hangs on the source.
async fn ask(svc: &Service, path: &str) -> Value {
    let asked = Instant::now();
    let (status, round) = tokio::time::timeout(Duration::from_secs(5), svc.post(path))
        .await
        .unwrap_or_else(|_| {
            panic!("POST {path} did not answer within 5 s: it waits for its round")
        });
    eprintln!(
        "figure: POST {path} answered {status} in {:?}",
        asked.elapsed()
    );
    assert_eq!(status, 202, "{round}");
    round
}

/// Mirrors `{up}/app:v1` from a faulty source and makes its next manifest request hang.
async fn stalled_source(f: &Faulty) -> Arc<Stall> {
    let stall = Arc::new(Stall::default());
    f.then(Route::Manifest, &[Fault::Stall(stall.clone())]);
    stall
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drift_check_answers_at_once_and_sigterm_stops_its_round() {
    let f = Faulty::default();
    seed(&f);
    let up = f.start().await;
    let down = Registry::anonymous().await;
    let dir = tempfile::tempdir().unwrap();
    let mut svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up,
        &[
            ("MIRROR_DRIFT_INTERVAL", "0"),
            ("MIRROR_SHUTDOWN_GRACE", "5"),
        ],
    )
    .await;
    let (status, job) = svc
        .mirror(&json!({ "image": format!("{up}/app:v1") }))
        .await;
    assert_eq!(status, 202, "{job}");
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");

    // The round's first request upstream hangs: the POST still answers at once.
    let stall = stalled_source(&f).await;
    let round = ask(&svc, "/drift/check").await;
    let id = round["id"].as_u64().expect("a round id");
    assert!(
        ["queued", "running"].contains(&round["state"].as_str().unwrap()),
        "{round}"
    );
    wait_for(
        "the round to reach the source",
        Duration::from_secs(30),
        || stall.reached(),
    )
    .await;
    let (_, drift) = svc.get("/drift").await;
    assert_eq!(drift["running_round"]["id"], json!(id), "{drift}");
    assert_eq!(drift["running_round"]["state"], "running", "{drift}");
    assert_eq!(drift["running_round"]["trigger"], "request", "{drift}");
    // Asked again while it runs: one more round, queued behind it (and asked twice, still one).
    let second = ask(&svc, "/drift/check").await;
    assert_eq!(
        (second["id"].as_u64(), &second["state"]),
        (Some(id + 1), &json!("queued"))
    );
    let third = ask(&svc, "/drift/check").await;
    assert_eq!(third["id"], second["id"]);
    let (_, drift) = svc.get("/drift").await;
    assert_eq!(drift["queued_round"]["id"], second["id"], "{drift}");

    let took = svc.terminate(Duration::from_secs(5));
    eprintln!("figure: SIGTERM during a drift round: exited in {took:?} (grace 5 s)");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sync_answers_at_once_and_sigterm_stops_it() {
    let f = Faulty::default();
    seed(&f);
    let up = f.start().await;
    let down = Registry::anonymous().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirrors.yaml");
    std::fs::write(
        &file,
        format!("images:\n  - source: {up}/app\n    tags: [v1]\n"),
    )
    .unwrap();
    let mut svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up,
        &[
            ("MIRROR_SYNC_FILE", file.to_str().unwrap()),
            ("MIRROR_SYNC_INTERVAL", "0"),
            ("MIRROR_SHUTDOWN_GRACE", "5"),
        ],
    )
    .await;
    // The sync at start queued the tag; once mirrored, a sync HEADs it upstream (follow).
    let job = svc.wait_job(1, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let stall = stalled_source(&f).await;
    let round = ask(&svc, "/sync").await;
    let id = round["id"].as_u64().expect("a sync id");
    assert!(id >= 2, "the sync at start was the first: {round}");
    wait_for(
        "the sync to reach the source",
        Duration::from_secs(30),
        || stall.reached(),
    )
    .await;
    let (_, sync) = svc.get("/sync").await;
    assert_eq!(sync["running_sync"]["id"], json!(id), "{sync}");
    assert_eq!(sync["running_sync"]["state"], "running", "{sync}");
    assert_eq!(sync["last_sync"]["id"], json!(1), "{sync}");

    let took = svc.terminate(Duration::from_secs(5));
    eprintln!("figure: SIGTERM during a sync: exited in {took:?} (grace 5 s)");
}
