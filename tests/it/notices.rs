//! The notice outbox against a real service process and a real HTTP receiver in-process: notices
//! wait in the database while the receiver is down, survive a restart, are delivered with the
//! event named in `X-Mirror-Event`, and those that never get through are shown as failed.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::support::free_port;
use crate::support::image::Style;
use crate::support::service::Service;
use crate::support::{Pusher, Registry};

const SECRET: &str = "outbox-secret";

/// One notice as the receiver got it: `X-Mirror-Event`, whether the signature checked out, body.
#[derive(Debug, Clone)]
struct Got {
    event: String,
    signed: bool,
    body: Value,
}

/// An HTTP receiver answering `status` to every notice and keeping what it got.
#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    /// Starts listening on `port` of 127.0.0.1.
    async fn start(port: u16, status: u16) -> Receiver {
        let r = Receiver {
            got: Arc::default(),
            status: Arc::new(AtomicU16::new(status)),
        };
        let keep = r.clone();
        let app = axum::Router::new().route(
            "/notice",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let keep = keep.clone();
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    let signed = header("x-mirror-signature-256")
                        == mirror_mirror::notify::sign(SECRET, &body);
                    keep.got.lock().unwrap().push(Got {
                        event: header("x-mirror-event"),
                        signed,
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                    });
                    StatusCode::from_u16(keep.status.load(Ordering::SeqCst)).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        r
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

/// Polls `GET path` until `cond` holds on its body (bounded); returns the body.
async fn wait_get(svc: &Service, path: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = svc.get(path).await;
        if status == 200 && cond(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within 30 s: GET {path} → {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start(
    dir: &std::path::Path,
    up: &Registry,
    down: &Registry,
    port: u16,
    extra: &[(&str, &str)],
) -> Service {
    let url = format!("http://127.0.0.1:{port}/notice");
    let mut env = vec![
        ("MIRROR_NOTIFY_URL", url.as_str()),
        ("MIRROR_NOTIFY_SECRET", SECRET),
        ("MIRROR_DRIFT_INTERVAL", "0"),
    ];
    env.extend_from_slice(extra);
    Service::start(
        &dir.join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &env,
    )
    .await
}

async fn mirrored(svc: &Service, up: &Registry) -> (i64, String) {
    let p = Pusher::new(up);
    let img = p.image("note/app", 7, &[4000], true, Style::Compact).await;
    p.manifest("note/app", "latest", &img.media_type, &img.bytes)
        .await;
    let (status, job) = svc
        .mirror(&json!({ "image": format!("{}/note/app:latest", up.host()) }))
        .await;
    assert_eq!(status, 202, "{job}");
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    (job["id"].as_i64().unwrap(), img.digest)
}

#[tokio::test(flavor = "multi_thread")]
async fn notices_wait_in_the_outbox_across_a_restart_until_the_receiver_is_up() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The receiver is down: the job's notice is stored, tried, and waits.
    let mut svc = start(dir.path(), &up, &down, port, &[]).await;
    let (job_id, digest) = mirrored(&svc, &up).await;
    let pending = wait_get(
        &svc,
        "/notices?state=pending",
        "a failed attempt recorded",
        |b| b["notices"][0]["attempts"].as_i64().unwrap_or(0) >= 1,
    )
    .await;
    let n = &pending["notices"][0];
    assert_eq!(n["event"], "job", "{n}");
    assert_eq!(n["body"]["job_id"], json!(job_id), "{n}");
    assert!(
        n["last_error"].as_str().unwrap().contains("sending failed"),
        "{n}"
    );
    // A crash with the notice undelivered; the receiver comes up; the service starts again.
    svc.kill();
    let receiver = Receiver::start(port, 204).await;
    let svc = start(dir.path(), &up, &down, port, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.got().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stored notice was not sent after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = &receiver.got()[0];
    assert_eq!(got.event, "job");
    assert!(got.signed, "signature checks out: {got:?}");
    assert_eq!(got.body["job_id"], json!(job_id));
    assert_eq!(got.body["source_digest"], json!(digest));
    let delivered = wait_get(
        &svc,
        "/notices?state=delivered",
        "the notice marked delivered",
        |b| b["notices"].as_array().is_some_and(|n| n.len() == 1),
    )
    .await;
    assert!(
        delivered["notices"][0]["delivered_at"].is_string(),
        "{delivered}"
    );

    // Drift notices say so in the header: the mirrored manifest is deleted on the target.
    let repo = format!("mirror/{}/note/app", up.host().replace(':', "_"));
    Pusher::new(&down).delete_manifest(&repo, &digest).await;
    let round = svc.drift_round().await;
    assert_eq!(round["missing"], 1, "{round}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !receiver.got().iter().any(|g| g.event == "drift") {
        assert!(
            Instant::now() < deadline,
            "no drift notice: {:?}",
            receiver.got()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drift = receiver
        .got()
        .into_iter()
        .find(|g| g.event == "drift")
        .unwrap();
    assert!(drift.signed);
    assert_eq!(drift.body["event"], "drift");
    assert_eq!(drift.body["kind"], "missing");
}

#[tokio::test(flavor = "multi_thread")]
async fn notices_the_receiver_keeps_refusing_are_shown_as_failed() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let receiver = Receiver::start(port, 500).await;
    let svc = start(
        dir.path(),
        &up,
        &down,
        port,
        &[("MIRROR_NOTIFY_MAX_ATTEMPTS", "2")],
    )
    .await;
    mirrored(&svc, &up).await;
    let failed = wait_get(
        &svc,
        "/notices?state=failed",
        "the notice marked failed",
        |b| b["notices"].as_array().is_some_and(|n| n.len() == 1),
    )
    .await;
    let n = &failed["notices"][0];
    assert_eq!(n["attempts"], 2, "{n}");
    assert_eq!(n["last_error"], "the receiver answered HTTP 500", "{n}");
    assert_eq!(receiver.got().len(), 2, "tried twice, then given up");
    let (_, metrics) = svc.get_text("/metrics").await;
    let gauge = |state: &str| -> f64 {
        let prefix = format!("mirror_notices{{state=\"{state}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix}in {metrics}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(gauge("failed"), 1.0, "{metrics}");
    assert_eq!(gauge("pending"), 0.0, "{metrics}");
    let (status, bad) = svc.get("/notices?state=lost").await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pending, delivered, failed"),
        "{bad}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_to_several_targets_sends_one_notice_with_every_target_outcome() {
    use crate::support::front::{Action, Front};
    let (up, a, b) = (
        Registry::anonymous().await,
        Registry::anonymous().await,
        Registry::anonymous().await,
    );
    // The second target answers 503 to everything: with one attempt its job fails for good.
    let front = Front::start(&b.host(), |_| Action::Answer(503, "UNAVAILABLE")).await;
    let p = Pusher::new(&up);
    let img = p
        .image("note/multi", 8, &[4000], true, Style::Compact)
        .await;
    p.manifest("note/multi", "v1", &img.media_type, &img.bytes)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let receiver = Receiver::start(port, 204).await;
    let targets = format!("ghcr={}/mirror,home={}/mirror", a.host(), front.host());
    let svc = start(
        dir.path(),
        &up,
        &a,
        port,
        &[
            ("MIRROR_TARGET", ""),
            ("MIRROR_TARGETS", &targets),
            ("MIRROR_MAX_ATTEMPTS", "1"),
        ],
    )
    .await;
    let (status, body) = svc
        .mirror(&json!({ "image": format!("{}/note/multi:v1", up.host()) }))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["request_id"].as_i64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.got().is_empty() {
        assert!(Instant::now() < deadline, "a notice within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, request) = svc.get(&format!("/requests/{id}")).await;
    assert_eq!(request["state"], "partial", "{request}");
    // Both jobs' results were written before the notice: any other notice is in the outbox now.
    let (_, outbox) = svc.get("/notices").await;
    assert_eq!(
        outbox["notices"].as_array().map(Vec::len),
        Some(1),
        "one notice for the request, none per job: {outbox}"
    );
    let got = receiver.got();
    assert_eq!(got.len(), 1, "{got:?}");
    let n = &got[0];
    assert!(n.signed, "{n:?}");
    assert_eq!(n.event, "request", "{n:?}");
    let body = &n.body;
    assert_eq!(body["event"], "request", "{body}");
    assert_eq!(body["request_id"], id, "{body}");
    assert_eq!(body["state"], "partial", "{body}");
    assert_eq!(body["source_digest"], json!(img.digest), "{body}");
    let (ghcr, home) = (&body["targets"][0], &body["targets"][1]);
    let mapped_up = up.host().replace(':', "_");
    let mirror = format!("{}/mirror/{mapped_up}/note/multi", a.host());
    assert_eq!(
        (ghcr["target_name"].as_str(), ghcr["state"].as_str()),
        (Some("ghcr"), Some("succeeded")),
        "{body}"
    );
    assert_eq!(
        ghcr["pull"]["by_digest"],
        json!(format!("{mirror}@{}", img.digest)),
        "{body}"
    );
    assert_eq!(
        ghcr["pull"]["by_tag"],
        json!(format!("{mirror}:v1@{}", img.digest)),
        "{body}"
    );
    assert!(ghcr["error"].is_null(), "{body}");
    assert_eq!(
        (home["target_name"].as_str(), home["state"].as_str()),
        (Some("home"), Some("failed")),
        "{body}"
    );
    assert!(home["pull"].is_null(), "{body}");
    assert!(
        home["error"].as_str().is_some_and(|e| e.contains("503")),
        "the failed target says why: {body}"
    );
}
