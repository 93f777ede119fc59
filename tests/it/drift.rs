//! Drift watch end to end: tags moved upstream between two checks (followed or pinned), sources
//! gone, and manifests deleted on the target (repaired), against real registries and the real binary.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::image::{Style, TestImage, platform};
use crate::support::service::Service;
use crate::support::{Pusher, Registry, sha256, skopeo};

const REPO: &str = "team/app";

/// The mirror repository of `up`'s [`REPO`] on the target, without the registry.
fn mirror_path(up: &Registry) -> String {
    format!("mirror/{}/{REPO}", up.host().replace(':', "_"))
}

async fn start(
    dir: &tempfile::TempDir,
    up: &Registry,
    down: &Registry,
    env: &[(&str, &str)],
) -> Service {
    let mut env = env.to_vec();
    // Rounds run only when a test asks, so each check happens exactly where the test says.
    env.push(("MIRROR_DRIFT_INTERVAL", "0"));
    Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &env,
    )
    .await
}

/// Pushes a one-layer image and tags it `tag`.
async fn tagged_image(up: &Registry, seed: u64, tag: &str) -> TestImage {
    let p = Pusher::new(up);
    let img = p
        .image(REPO, seed, &[2_000 + seed as usize], false, Style::Compact)
        .await;
    p.manifest(REPO, tag, &img.media_type, &img.bytes).await;
    img
}

async fn mirror(svc: &Service, body: Value) -> Value {
    let (status, job) = svc.mirror(&body).await;
    assert_eq!(status, 202, "{job}");
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    job
}

/// `POST /drift/check`: one round, now (in the background; waits for it).
async fn round(svc: &Service) -> Value {
    svc.drift_round().await
}

fn counts(round: &Value) -> [i64; 6] {
    [
        "checked",
        "in_sync",
        "upstream_moved",
        "upstream_gone",
        "missing",
        "jobs_queued",
    ]
    .map(|k| round[k].as_i64().unwrap_or(-1))
}

async fn target_digest(down: &Registry, up: &Registry, reference: &str) -> Option<String> {
    Pusher::new(down)
        .get_manifest(&mirror_path(up), reference)
        .await
        .map(|(bytes, _, _)| sha256(&bytes))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tag_moved_upstream_between_two_checks_is_followed() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let (notify_url, notices) = crate::github::receiver("drift-secret").await;
    let svc = start(
        &dir,
        &up,
        &down,
        &[
            ("MIRROR_NOTIFY_URL", &notify_url),
            ("MIRROR_NOTIFY_SECRET", "drift-secret"),
        ],
    )
    .await;
    let a = tagged_image(&up, 1, "1.0").await;
    mirror(
        &svc,
        json!({ "image": format!("{}/{REPO}:1.0", up.host()) }),
    )
    .await;

    // First check: nothing moved.
    assert_eq!(counts(&round(&svc).await), [1, 1, 0, 0, 0, 0]);

    // Upstream moves the tag; the second check sees it and follows.
    let b = tagged_image(&up, 2, "1.0").await;
    assert_ne!(a.digest, b.digest);
    assert_eq!(counts(&round(&svc).await), [1, 0, 1, 0, 0, 1]);
    let (_, all) = svc.get("/drift?all=true").await;
    let rows = all["drift"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{all}");
    let d = &rows[0];
    assert_eq!(d["kind"], "upstream_moved");
    assert_eq!(d["recorded_digest"], json!(a.digest));
    assert_eq!(d["observed_digest"], json!(b.digest));
    assert_eq!(d["policy"], "follow");
    let job = svc
        .wait_job(d["job_id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["source_digest"], json!(b.digest));
    assert_eq!(job["requested_by"]["kind"], "drift", "{job}");
    assert_eq!(job["requested_by"]["drift_id"], d["id"]);

    // The mirror's tag now serves the new digest, checked by an independent client too.
    assert_eq!(
        target_digest(&down, &up, "1.0").await,
        Some(b.digest.clone())
    );
    let by_tag = format!("{}/{}:1.0", down.host(), mirror_path(&up));
    assert_eq!(sha256(&skopeo::inspect_raw(&by_tag, None)), b.digest);

    // The drift is resolved by the job, the ledger keeps both digests, and the next check is clean.
    let (_, open) = svc.get("/drift").await;
    assert_eq!(open["drift"], json!([]), "{open}");
    let (_, all) = svc.get("/drift?all=true").await;
    assert!(all["drift"][0]["resolved_at"].is_string(), "{all}");
    let (_, image) = svc.get(&format!("/images/{}/{REPO}:1.0", up.host())).await;
    assert_eq!(image["digest"], json!(b.digest));
    assert_eq!(image["drift"], json!([]));
    let history: Vec<&Value> = image["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["digest"])
        .collect();
    assert_eq!(history, vec![&json!(b.digest), &json!(a.digest)]);
    assert_eq!(counts(&round(&svc).await), [1, 1, 0, 0, 0, 0]);

    // Notices: the drift when first seen, and the job that followed it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = notices.lock().unwrap().clone();
        let drift = got.iter().find(|n| n["event"] == "drift");
        let followed = got
            .iter()
            .find(|n| n["event"] == "job" && n["requested_by"]["kind"] == "drift");
        if let (Some(drift), Some(followed)) = (drift, followed) {
            assert_eq!(drift["kind"], "upstream_moved");
            assert_eq!(drift["observed_digest"], json!(b.digest));
            assert_eq!(followed["source_digest"], json!(b.digest));
            assert_eq!(
                got.iter().filter(|n| n["event"] == "drift").count(),
                1,
                "{got:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "notices: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_tag_keeps_its_digest_and_shows_the_drift() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, &up, &down, &[]).await;
    let a = tagged_image(&up, 3, "2.0").await;
    let job = mirror(
        &svc,
        json!({ "image": format!("{}/{REPO}:2.0", up.host()), "policy": "pin" }),
    )
    .await;
    assert_eq!(job["policy"], "pin");
    let b = tagged_image(&up, 4, "2.0").await;

    assert_eq!(counts(&round(&svc).await), [1, 0, 1, 0, 0, 0]);
    assert_eq!(
        target_digest(&down, &up, "2.0").await,
        Some(a.digest.clone()),
        "pinned: the mirror keeps its digest"
    );
    let (_, image) = svc.get(&format!("/images/{}/{REPO}", up.host())).await;
    let tag = &image["tags"][0];
    assert_eq!(tag["digest"], json!(a.digest), "{image}");
    assert_eq!(tag["policy"], "pin");
    let drift = tag["drift"].as_array().unwrap();
    assert_eq!(drift.len(), 1, "{image}");
    assert_eq!(drift[0]["kind"], "upstream_moved");
    assert_eq!(drift[0]["observed_digest"], json!(b.digest));
    assert_eq!(drift[0]["job_id"], Value::Null);
    let first_id = drift[0]["id"].clone();
    let (_, page) = svc.get_text("/").await;
    assert!(
        page.contains("<h2>Drift</h2>")
            && page.contains(&format!("upstream moved to <code>{}</code>", b.digest)),
        "the status page shows the drift: {page}"
    );
    let (_, metrics) = svc.get_text("/metrics").await;
    assert!(
        metrics.contains("mirror_drift_open{kind=\"upstream_moved\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mirror_drift_found_total{kind=\"upstream_moved\"} 1"),
        "{metrics}"
    );

    // Seen again: the same row, still open, not a second one.
    assert_eq!(counts(&round(&svc).await), [1, 0, 1, 0, 0, 0]);
    let (_, open) = svc.get("/drift").await;
    assert_eq!(open["drift"].as_array().unwrap().len(), 1, "{open}");
    assert_eq!(open["drift"][0]["id"], first_id);
    assert!(open["last_round"]["checked"] == 1, "{open}");

    // Upstream deletes the image: the tag is gone there; the mirror keeps serving what it has.
    let p = Pusher::new(&up);
    p.delete_manifest(REPO, &b.digest).await;
    assert_eq!(counts(&round(&svc).await), [1, 0, 0, 1, 0, 0]);
    let (_, open) = svc.get("/drift").await;
    let kinds: Vec<&Value> = open["drift"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["kind"])
        .collect();
    assert_eq!(
        kinds,
        vec!["upstream_gone"],
        "the move is no longer seen, so it is resolved: {open}"
    );
    assert_eq!(
        target_digest(&down, &up, "2.0").await,
        Some(a.digest.clone())
    );
}

async fn two_platforms(up: &Registry, tag: &str) -> (TestImage, Vec<String>) {
    let p = Pusher::new(up);
    let x = p.image(REPO, 11, &[3_000], false, Style::Compact).await;
    let y = p.image(REPO, 12, &[4_000], false, Style::Compact).await;
    let children = vec![x.digest.clone(), y.digest.clone()];
    let idx = p
        .index(
            REPO,
            Some(tag),
            &[
                (x, platform("linux", "amd64")),
                (y, platform("linux", "arm64")),
            ],
            false,
            Style::CrlfOdd,
        )
        .await;
    (idx, children)
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_deleted_on_the_target_are_repaired() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, &up, &down, &[]).await;
    let (idx, children) = two_platforms(&up, "3.0").await;
    mirror(
        &svc,
        json!({ "image": format!("{}/{REPO}:3.0", up.host()) }),
    )
    .await;
    assert_eq!(counts(&round(&svc).await), [1, 1, 0, 0, 0, 0]);

    // Retention deletes one platform's manifest on the target.
    let target = Pusher::new(&down);
    target
        .delete_manifest(&mirror_path(&up), &children[1])
        .await;
    assert_eq!(counts(&round(&svc).await), [1, 0, 0, 0, 1, 1]);
    let (_, open) = svc.get("/drift").await;
    let d = &open["drift"][0];
    assert_eq!(d["kind"], "missing", "{open}");
    assert_eq!(d["missing"], json!([children[1]]));
    let job = svc
        .wait_job(d["job_id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["repair"], true);
    assert_eq!(job["source_digest"], json!(idx.digest));
    assert_eq!(
        target_digest(&down, &up, &children[1]).await,
        Some(children[1].clone())
    );
    // Complete and digest-exact, by an independent client.
    let by_digest = format!("{}/{}@{}", down.host(), mirror_path(&up), idx.digest);
    let oci = dir.path().join("oci");
    skopeo::copy_all_to_oci(&by_digest, &oci, None);
    assert_eq!(counts(&round(&svc).await), [1, 1, 0, 0, 0, 0]);
    let (_, open) = svc.get("/drift").await;
    assert_eq!(open["drift"], json!([]), "{open}");

    // The whole index goes (and the tag with it): the tag and the top manifest come back.
    target.delete_manifest(&mirror_path(&up), &idx.digest).await;
    assert_eq!(target_digest(&down, &up, "3.0").await, None);
    assert_eq!(counts(&round(&svc).await), [1, 0, 0, 0, 1, 1]);
    // Newest first, resolved ones too: the repair job may be done (and the row resolved) already.
    let (_, open) = svc.get("/drift?all=true").await;
    assert_eq!(
        open["drift"][0]["missing"],
        json!(["tag", idx.digest]),
        "{open}"
    );
    let job = svc
        .wait_job(
            open["drift"][0]["job_id"].as_i64().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        target_digest(&down, &up, "3.0").await,
        Some(idx.digest.clone())
    );
    assert_eq!(counts(&round(&svc).await), [1, 1, 0, 0, 0, 0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_schedule_finds_a_moved_tag_on_its_own() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[("MIRROR_DRIFT_INTERVAL", "1")],
    )
    .await;
    tagged_image(&up, 21, "4.0").await;
    mirror(
        &svc,
        json!({ "image": format!("{}/{REPO}:4.0", up.host()) }),
    )
    .await;
    let b = tagged_image(&up, 22, "4.0").await;
    // No one asks: the next scheduled round sees the move and follows it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if target_digest(&down, &up, "4.0").await.as_deref() == Some(b.digest.as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no scheduled round followed the move:\n{}",
            svc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, drift) = svc.get("/drift?all=true").await;
    assert_eq!(drift["interval_seconds"], 1);
    assert_eq!(drift["drift"][0]["kind"], "upstream_moved", "{drift}");
    assert!(
        drift["last_round"]["checked"].as_i64().unwrap() >= 1,
        "{drift}"
    );
}
