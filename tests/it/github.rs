//! GitHub triggers: signed `repository_dispatch` webhooks, redeliveries, the repository allow-list,
//! signed completion notices, and the Actions relay workflow.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::image::{Style, platform};
use crate::support::service::Service;
use crate::support::{Pusher, Registry};

pub(crate) fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub(crate) fn dispatch(images: Value, repo: &str) -> Vec<u8> {
    json!({
        "action": "mirror",
        "branch": "main",
        "client_payload": images,
        "repository": { "full_name": repo },
        "sender": { "login": "octocat" },
        "installation": { "id": 4242 }
    })
    .to_string()
    .into_bytes()
}

async fn deliver(
    svc: &Service,
    event: &str,
    delivery: &str,
    body: &[u8],
    signature: Option<String>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .post(format!("{}/webhooks/github", svc.url))
        .header("x-github-event", event)
        .header("x-github-delivery", delivery)
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(s) = signature {
        r = r.header("x-hub-signature-256", s);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A receiver for completion notices that keeps the ones whose signature checks out.
pub async fn receiver(secret: &'static str) -> (String, Arc<Mutex<Vec<Value>>>) {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/notice",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let keep = keep.clone();
            async move {
                let sig = headers
                    .get("x-mirror-signature-256")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if sig != sign(secret, &body) {
                    return axum::http::StatusCode::UNAUTHORIZED;
                }
                keep.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let addr = crate::support::serve(app, "127.0.0.1").await;
    (format!("http://{addr}/notice"), got)
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_dispatches_queue_mirrors_once_and_notify() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let a = p.image("gh/app", 1, &[5000], false, Style::Compact).await;
    let idx = p
        .index(
            "gh/app",
            Some("2.0"),
            &[(a, platform("linux", "amd64"))],
            false,
            Style::CrlfOdd,
        )
        .await;
    let (notify_url, notices) = receiver("notice-secret").await;
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[
            ("MIRROR_GITHUB_WEBHOOK_SECRETS", "new-secret,old-secret"),
            ("MIRROR_GITHUB_REPOSITORIES", "acme/*"),
            ("MIRROR_NOTIFY_URL", &notify_url),
            ("MIRROR_NOTIFY_SECRET", "notice-secret"),
        ],
    )
    .await;
    let image = format!("{}/gh/app:2.0", up.host());
    let body = dispatch(json!({ "image": image }), "acme/tools");

    // Unsigned or wrongly signed: 401, nothing stored.
    assert_eq!(
        deliver(&svc, "repository_dispatch", "d-0", &body, None)
            .await
            .0,
        401
    );
    assert_eq!(
        deliver(
            &svc,
            "repository_dispatch",
            "d-0",
            &body,
            Some(sign("guess", &body))
        )
        .await
        .0,
        401
    );
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    assert_eq!(
        deliver(
            &svc,
            "repository_dispatch",
            "d-0",
            &tampered,
            Some(sign("new-secret", &body))
        )
        .await
        .0,
        401
    );
    assert_eq!(svc.get("/jobs").await.1["jobs"], json!([]));

    // ping, and events or types we do not handle.
    let ping = br#"{"zen":"Keep it logically awesome."}"#;
    assert_eq!(
        deliver(&svc, "ping", "d-p", ping, Some(sign("new-secret", ping)))
            .await
            .0,
        200
    );
    assert_eq!(
        deliver(&svc, "push", "d-x", ping, Some(sign("new-secret", ping)))
            .await
            .0,
        204
    );
    let other = String::from_utf8(body.clone())
        .unwrap()
        .replace("\"action\":\"mirror\"", "\"action\":\"deploy\"")
        .into_bytes();
    assert_eq!(
        deliver(
            &svc,
            "repository_dispatch",
            "d-y",
            &other,
            Some(sign("new-secret", &other))
        )
        .await
        .0,
        204
    );

    // A repository outside MIRROR_GITHUB_REPOSITORIES: 403, nothing queued.
    let foreign = dispatch(json!({ "image": image }), "mallory/x");
    assert_eq!(
        deliver(
            &svc,
            "repository_dispatch",
            "d-m",
            &foreign,
            Some(sign("new-secret", &foreign))
        )
        .await
        .0,
        403
    );
    assert_eq!(svc.get("/jobs").await.1["jobs"], json!([]));

    // Signed with the old secret (rotation): accepted.
    let (status, first) = deliver(
        &svc,
        "repository_dispatch",
        "d-1",
        &body,
        Some(sign("old-secret", &body)),
    )
    .await;
    assert_eq!(status, 202, "{first}");
    let id = first["jobs"][0]["id"].as_i64().unwrap();
    // A redelivery answers as the first time and adds no job.
    let (status, again) = deliver(
        &svc,
        "repository_dispatch",
        "d-1",
        &body,
        Some(sign("new-secret", &body)),
    )
    .await;
    assert_eq!((status, &again), (202, &first));
    let job = svc.wait_job(id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        svc.get("/jobs").await.1["jobs"].as_array().unwrap().len(),
        1
    );

    // The ledger says who asked.
    let (_, img) = svc.get(&format!("/images/{}/gh/app:2.0", up.host())).await;
    assert_eq!(img["digest"], json!(idx.digest));
    assert_eq!(
        img["requested_by"],
        json!({"kind": "github", "repository": "acme/tools", "sender": "octocat", "installation": 4242, "delivery": "d-1"})
    );

    // The completion notice arrived, signed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while notices.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no notice arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = notices.lock().unwrap()[0].clone();
    assert_eq!(n["job_id"], json!(id));
    assert_eq!(n["state"], "succeeded");
    assert_eq!(n["source_digest"], json!(idx.digest));
    assert!(
        n["pull"]["by_digest"]
            .as_str()
            .unwrap()
            .ends_with(&idx.digest)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_payloads_are_refused_with_the_reason() {
    let down = Registry::anonymous().await;
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        "127.0.0.1:1",
        &[("MIRROR_GITHUB_WEBHOOK_SECRETS", "s3cret")],
    )
    .await;
    let cases = [
        (json!({}), 422, "\"image\""),
        (json!({"image": "gcr.io/Bad/Name"}), 422, "uppercase"),
        (
            json!({"images": ["gcr.io/a/b:1", 7]}),
            422,
            "list of strings",
        ),
        (json!({"images": []}), 422, "1 to 100"),
        (
            json!({"images": ["gcr.io/a/b:1", "quay.io/x/y:1"]}),
            403,
            "MIRROR_ALLOWED_SOURCES",
        ),
        (
            json!({"image": "gcr.io/a/b", "images": ["gcr.io/a/c"]}),
            422,
            "exactly one",
        ),
    ];
    for (i, (payload, want, msg)) in cases.into_iter().enumerate() {
        let body = dispatch(payload.clone(), "acme/x");
        let (status, v) = deliver(
            &svc,
            "repository_dispatch",
            &format!("b-{i}"),
            &body,
            Some(sign("s3cret", &body)),
        )
        .await;
        assert_eq!(status, want, "{payload}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains(msg),
            "{payload}: {v}"
        );
    }
    let broken = b"{\"action\": \"mirror\",".to_vec();
    assert_eq!(
        deliver(
            &svc,
            "repository_dispatch",
            "b-j",
            &broken,
            Some(sign("s3cret", &broken))
        )
        .await
        .0,
        400
    );
    let huge = vec![b' '; 1024 * 1024 + 1];
    assert_eq!(
        deliver(
            &svc,
            "repository_dispatch",
            "b-h",
            &huge,
            Some(sign("s3cret", &huge))
        )
        .await
        .0,
        413
    );
    // Two images in one delivery: two jobs.
    let body = dispatch(
        json!({"images": ["127.0.0.1:1/a/b:1", "127.0.0.1:1/a/c@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]}),
        "acme/x",
    );
    let (status, v) = deliver(
        &svc,
        "repository_dispatch",
        "b-2",
        &body,
        Some(sign("s3cret", &body)),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["jobs"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["jobs"][1]["target"],
        json!(format!("{}/mirror/127.0.0.1_1/a/c", down.host())),
        "by digest, no tag"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_secret_the_endpoint_is_off() {
    let down = Registry::anonymous().await;
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        "gcr.io",
        &[],
    )
    .await;
    let body = dispatch(json!({"image": "gcr.io/a/b:1"}), "acme/x");
    let (status, v) = deliver(
        &svc,
        "repository_dispatch",
        "n-1",
        &body,
        Some(sign("x", &body)),
    )
    .await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MIRROR_GITHUB_WEBHOOK_SECRETS")
    );
    assert!(
        svc.log()
            .contains("MIRROR_GITHUB_WEBHOOK_SECRETS is not set"),
        "said at start-up"
    );
}

#[test]
fn the_actions_relay_workflow_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/github/mirror.yml");
    let text = std::fs::read_to_string(path).unwrap();
    let wf: serde_norway::Value = serde_norway::from_str(&text).expect("valid YAML");
    let on = &wf["on"];
    assert_eq!(
        on["repository_dispatch"]["types"][0].as_str(),
        Some("mirror")
    );
    let steps = wf["jobs"]["relay"]["steps"].as_sequence().expect("steps");
    let script = steps[0]["run"].as_str().unwrap();
    assert!(
        script.contains("$MIRROR_URL/mirror")
            && script.contains("Authorization: Bearer $MIRROR_TOKEN")
    );
    assert_eq!(
        wf["jobs"]["relay"]["runs-on"].as_str(),
        Some("ubuntu-latest")
    );
}
