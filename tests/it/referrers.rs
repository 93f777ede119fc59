//! Referrers are their own step in the service: a referrer that fails (or a referrers API that
//! refuses access) leaves the verified image mirrored with the failure recorded in the job and the
//! ledger; drift watch copies referrers that appeared upstream after the image was mirrored, and
//! tries failed ones again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::image::{Style, TestImage};
use crate::support::service::Service;
use crate::support::{Pusher, Registry, sha256};

const REPO: &str = "signed/app";

/// What the front in front of the source does wrong.
#[derive(Default)]
struct Faults {
    /// Answer 403 to the OCI referrers API.
    deny_referrers_api: bool,
    /// Answer 503 to every request whose path contains this.
    unavailable: Option<String>,
}

/// A front that forwards every request, bytes unchanged, to the real registry `up`, except those
/// `faults` names.
async fn front(up: &Registry, faults: Arc<Mutex<Faults>>) -> String {
    let upstream = up.url();
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (upstream, http, faults) = (upstream.clone(), http.clone(), faults.clone());
        async move {
            let path = req.uri().path().to_string();
            let refuse = {
                let f = faults.lock().unwrap();
                if f.deny_referrers_api && path.contains("/referrers/") {
                    Some(403)
                } else if f
                    .unavailable
                    .as_ref()
                    .is_some_and(|u| path.contains(u.as_str()))
                {
                    Some(503)
                } else {
                    None
                }
            };
            if let Some(status) = refuse {
                return axum::response::Response::builder()
                    .status(status)
                    .body(axum::body::Body::from(
                        r#"{"errors":[{"code":"DENIED","message":"injected"}]}"#,
                    ))
                    .unwrap();
            }
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or(path);
            let mut out = http.request(req.method().clone(), format!("{upstream}{pq}"));
            for (k, v) in req.headers() {
                if k != "host" {
                    out = out.header(k, v);
                }
            }
            let body = axum::body::to_bytes(req.into_body(), 64 << 20)
                .await
                .unwrap();
            let resp = out.body(body).send().await.unwrap();
            let mut answer = axum::response::Response::builder().status(resp.status().as_u16());
            for (k, v) in resp.headers() {
                answer = answer.header(k, v);
            }
            answer
                .body(axum::body::Body::from(resp.bytes().await.unwrap()))
                .unwrap()
        }
    });
    crate::support::serve(app, "127.0.0.1").await
}

/// Pushes `REPO:v1` upstream.
async fn image(up: &Registry) -> TestImage {
    let p = Pusher::new(up);
    let img = p.image(REPO, 301, &[3000], false, Style::Compact).await;
    p.manifest(REPO, "v1", &img.media_type, &img.bytes).await;
    img
}

/// Pushes a cosign-style signature of `img` under `sha256-<hex>.sig`; returns (tag, digest).
async fn sign(up: &Registry, img: &TestImage, seed: &str) -> (String, String) {
    let p = Pusher::new(up);
    let hex = img.digest.trim_start_matches("sha256:");
    let sig = p
        .image_with(
            REPO,
            format!(r#"{{"cosign":"{seed}"}}"#).as_bytes(),
            &[format!("signature {seed}").into_bytes()],
            false,
            Style::Compact,
        )
        .await;
    let tag = format!("sha256-{hex}.sig");
    p.manifest(REPO, &tag, &sig.media_type, &sig.bytes).await;
    (tag, sig.digest)
}

async fn start(dir: &tempfile::TempDir, source: &str, down: &Registry) -> Service {
    Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        source,
        &[("MIRROR_DRIFT_INTERVAL", "0"), ("MIRROR_RETRIES", "1")],
    )
    .await
}

async fn mirror(svc: &Service, source: &str) -> Value {
    let (status, job) = svc
        .mirror(&json!({ "image": format!("{source}/{REPO}:v1") }))
        .await;
    assert_eq!(status, 202, "{job}");
    svc.wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await
}

/// The digest the target serves for `reference` in the mirror of `source`, if any.
async fn on_target(down: &Registry, source: &str, reference: &str) -> Option<String> {
    let repo = format!("mirror/{}/{REPO}", source.replace(':', "_"));
    Pusher::new(down)
        .get_manifest(&repo, reference)
        .await
        .map(|(bytes, _, _)| sha256(&bytes))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signature_added_after_the_mirror_reaches_it_in_the_next_drift_round() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, &up.host(), &down).await;
    let img = image(&up).await;
    let job = mirror(&svc, &up.host()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["referrers_state"], "copied", "{job}");
    let round = svc.drift_round().await;
    assert_eq!(
        (&round["referrers_missing"], &round["jobs_queued"]),
        (&json!(0), &json!(0)),
        "{round}"
    );

    // Signed upstream after the copy: the next round finds it and a job copies it.
    let (tag, sig) = sign(&up, &img, "later").await;
    assert_eq!(on_target(&down, &up.host(), &tag).await, None);
    let round = svc.drift_round().await;
    assert_eq!(round["referrers_missing"], 1, "{round}");
    assert_eq!(round["in_sync"], 1, "the image itself is in sync: {round}");
    let (_, jobs) = svc.get("/jobs?limit=1").await;
    let job = &jobs["jobs"][0];
    assert_eq!(job["requested_by"]["reason"], "referrers", "{job}");
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["referrers_state"], "copied", "{job}");
    assert_eq!(on_target(&down, &up.host(), &tag).await, Some(sig.clone()));
    let (_, shown) = svc.get(&format!("/images/{}/{REPO}:v1", up.host())).await;
    assert!(
        shown["referrers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["digest"] == json!(sig) && r["state"] == "copied"),
        "{shown}"
    );
    // Nothing new upstream: the next round queues nothing.
    let round = svc.drift_round().await;
    assert_eq!(round["referrers_missing"], 0, "{round}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_referrer_leaves_the_image_mirrored_and_is_copied_once_it_works() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let img = image(&up).await;
    let (tag, sig) = sign(&up, &img, "first").await;
    let faults = Arc::new(Mutex::new(Faults {
        deny_referrers_api: true,
        unavailable: Some(format!("/manifests/{tag}")),
    }));
    let source = front(&up, faults.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, &source, &down).await;

    // The referrers API refuses access and the signature cannot be read: the image is mirrored
    // and verified all the same, and the job says what failed and why.
    let job = mirror(&svc, &source).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    assert_eq!(
        on_target(&down, &source, "v1").await,
        Some(img.digest.clone())
    );
    assert_eq!(job["referrers_state"], "failed", "{job}");
    let failed = job["referrers_failed"].as_array().unwrap();
    assert!(
        failed.iter().any(
            |f| f["reference"].as_str().unwrap().starts_with("referrers of")
                && f["error"].as_str().unwrap().contains("403")
        ),
        "{job}"
    );
    assert!(
        failed.iter().any(|f| f["error"]
            .as_str()
            .unwrap()
            .contains(&format!("{tag} answered HTTP 503"))
            && f["transient"] == json!(true)),
        "{job}"
    );
    let (_, shown) = svc.get(&format!("/images/{source}/{REPO}:v1")).await;
    assert!(
        shown["referrers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["state"] == "failed"),
        "the ledger shows the failure: {shown}"
    );
    assert_eq!(on_target(&down, &source, &tag).await, None);

    // The source heals: the next drift round tries again and the signature arrives.
    *faults.lock().unwrap() = Faults::default();
    let round = svc.drift_round().await;
    assert_eq!(round["referrers_missing"], 1, "{round}");
    let (_, jobs) = svc.get("/jobs?limit=1").await;
    let job = svc
        .wait_job(
            jobs["jobs"][0]["id"].as_i64().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["referrers_state"], "copied", "{job}");
    assert_eq!(on_target(&down, &source, &tag).await, Some(sig));
}
