//! Platform subsets through the service: `"platforms"` in `POST /mirror` (and the dispatch
//! payload) copies only those children of a six-platform index, each under its official digest;
//! the ledger and `/images` say it is a subset, `/digests/{child}` finds it, drift watch checks
//! the children (not the index that was never pushed) and repairs them as a subset.

use std::time::Duration;

use serde_json::{Value, json};

use crate::platforms::{blobs_of, child, six_platforms};
use crate::support::image::TestImage;
use crate::support::podman::Store;
use crate::support::service::Service;
use crate::support::{Pusher, Registry, sha256, skopeo};

/// The mirror repository the default mapping gives `up`'s `six/app`, without the registry.
fn mirror_path(up: &Registry) -> String {
    format!("mirror/{}/six/app", up.host().replace(':', "_"))
}

async fn start(dir: &tempfile::TempDir, up: &Registry, down: &Registry) -> Service {
    Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        // Drift rounds run only when a test asks.
        &[("MIRROR_DRIFT_INTERVAL", "0")],
    )
    .await
}

#[track_caller]
fn accepted(status: u16, job: &Value) -> i64 {
    assert_eq!(status, 202, "{job}");
    job["id"].as_i64().unwrap()
}

async fn succeeded(svc: &Service, id: i64) -> Value {
    let job = svc.wait_job(id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{}", svc.log());
    job
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

#[tokio::test(flavor = "multi_thread")]
async fn one_platform_of_six_is_mirrored_recorded_and_watched_as_a_subset() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    // The linux/amd64 child is a real image built by buildah, so podman can pull and unpack it.
    let builder = Store::new();
    let real = builder.build_and_push(
        &format!("{}/six/app:amd64-build", up.host()),
        "amd64",
        &[("hello.txt", "hello from amd64\n")],
    );
    let (real_bytes, real_type, _) = p.get_manifest("six/app", &real).await.unwrap();
    let amd64 = TestImage {
        digest: real.clone(),
        blobs: blobs_of(&real_bytes),
        bytes: real_bytes,
        media_type: real_type,
    };
    let (idx, others, atts) = six_platforms(&p, "six/app", "1.0", amd64.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, &up, &down).await;

    let source = format!("{}/six/app:1.0", up.host());
    let (status, job) = svc
        .mirror(&json!({ "image": source, "platforms": ["linux/amd64"] }))
        .await;
    let id = accepted(status, &job);
    assert_eq!(job["platforms"], json!(["linux/amd64"]), "{job}");
    let job = succeeded(&svc, id).await;
    // The job does not claim the index was written.
    assert_eq!(job["mirror_digest"], Value::Null, "{job}");

    // On the target: the child under its official digest (the tag names it), its blobs and its
    // attestation; not the index, not the other five platforms or their blobs.
    let path = mirror_path(&up);
    let dst = format!("{}/{path}", down.host());
    let q = Pusher::new(&down);
    let (tagged, _, dcd) = q.get_manifest(&path, "1.0").await.unwrap();
    assert_eq!(
        (dcd.as_str(), sha256(&tagged)),
        (real.as_str(), real.clone())
    );
    assert_eq!(tagged, amd64.bytes, "byte-exact");
    assert!(
        String::from_utf8_lossy(&idx.bytes).contains(&real),
        "listed in the official index"
    );
    for b in &amd64.blobs {
        assert!(q.blob_exists(&path, b).await, "blob {b} of linux/amd64");
    }
    assert!(q.get_manifest(&path, &atts[0].digest).await.is_some());
    assert!(q.get_manifest(&path, &atts[1].digest).await.is_none());
    assert!(q.get_manifest(&path, &idx.digest).await.is_none());
    for o in &others {
        assert!(q.get_manifest(&path, &o.digest).await.is_none());
        for b in &o.blobs {
            assert!(
                !q.blob_exists(&path, b).await,
                "blob {b} of another platform"
            );
        }
    }
    // podman (a store of its own) pulls it by the child's official digest.
    assert_eq!(Store::new().pull(&format!("{dst}@{real}")), real);

    // The ledger says what was copied: a subset of the source index, the child, the pull lines.
    let (status, img) = svc.get(&format!("/images/{source}")).await;
    assert_eq!(status, 200, "{img}");
    assert_eq!(img["subset"], true, "{img}");
    assert_eq!(img["digest"], idx.digest.as_str());
    assert_eq!(img["source_index_digest"], idx.digest.as_str());
    assert_eq!(img["mirror_digest"], real.as_str());
    assert_eq!(img["mirror_digest_official"], true);
    assert_eq!(img["index_rebuilt"], false);
    assert_eq!(img["pull"]["by_digest"], format!("{dst}@{real}"));
    assert_eq!(img["pull"]["by_tag"], format!("{dst}:1.0@{real}"));
    assert_eq!(
        img["children"],
        json!([{
            "platform": "linux/amd64", "digest": real, "attestations": [atts[0].digest],
            "pull": format!("{dst}@{real}"),
        }])
    );
    assert_eq!(
        img["platforms"],
        json!([{"platform": "linux/amd64", "digest": real}])
    );
    // By the mirror's name too.
    let (_, by_mirror) = svc.get(&format!("/images/{dst}")).await;
    assert_eq!(by_mirror["tags"][0]["subset"], true, "{by_mirror}");
    // The child's digest finds the record; so does the source index's, saying it is not there.
    let (status, found) = svc.get(&format!("/digests/{real}")).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["records"][0]["as"], "image");
    assert_eq!(found["records"][0]["subset"], true);
    let (_, by_index) = svc.get(&format!("/digests/{}", idx.digest)).await;
    assert!(
        by_index["records"][0]["as"]
            .as_str()
            .unwrap()
            .starts_with("source index"),
        "{by_index}"
    );
    // The status pages say so.
    let (_, page) = svc.get_text("/").await;
    assert!(page.contains("subset: linux/amd64"), "{page}");
    let (_, page) = svc
        .get_text(&format!("/ui/images/{}/six/app", up.host()))
        .await;
    assert!(
        page.contains("the tag names that child, under its official digest"),
        "{page}"
    );

    // Drift watch: the tag names the child, the child is there, upstream still names the index.
    assert_eq!(counts(&svc.drift_round().await), [1, 1, 0, 0, 0, 0]);

    // Retention deletes the child on the target: missing, and the repair copies the subset
    // again (the tag names the child, not the whole index).
    q.delete_manifest(&path, &real).await;
    assert_eq!(counts(&svc.drift_round().await), [1, 0, 0, 0, 1, 1]);
    let (_, drift) = svc.get("/drift").await;
    let row = &drift["drift"][0];
    assert_eq!(row["kind"], "missing", "{drift}");
    assert!(
        row["missing"].as_array().unwrap().contains(&json!(real)),
        "{drift}"
    );
    let repair = succeeded(&svc, row["job_id"].as_i64().unwrap()).await;
    assert_eq!(repair["platforms"], json!(["linux/amd64"]), "{repair}");
    let (_, _, dcd) = q.get_manifest(&path, "1.0").await.unwrap();
    assert_eq!(dcd, real, "the repair wrote the child back under the tag");
    assert!(q.get_manifest(&path, &idx.digest).await.is_none());
    assert_eq!(counts(&svc.drift_round().await), [1, 1, 0, 0, 0, 0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_platforms_tag_a_rebuilt_index_the_api_calls_unofficial() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let amd64 = child(&p, "six/app", 1, "amd64", None).await;
    let (idx, others, atts) = six_platforms(&p, "six/app", "1.0", amd64.clone()).await;
    let arm64 = &others[0];
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, &up, &down).await;
    let source = format!("{}/six/app:1.0", up.host());
    let (status, job) = svc
        .mirror(&json!({ "image": source, "platforms": ["linux/arm64", "linux/amd64"] }))
        .await;
    let id = accepted(status, &job);
    assert_eq!(
        job["platforms"],
        json!(["linux/amd64", "linux/arm64"]),
        "{job}"
    );
    succeeded(&svc, id).await;

    let path = mirror_path(&up);
    let dst = format!("{}/{path}", down.host());
    let q = Pusher::new(&down);
    let (bytes, _, rebuilt) = q.get_manifest(&path, "1.0").await.unwrap();
    assert_eq!(sha256(&bytes), rebuilt);
    assert_ne!(rebuilt, idx.digest);
    for c in [&amd64, arm64] {
        let raw = skopeo::inspect_raw(&format!("{dst}@{}", c.digest), None);
        assert_eq!(
            sha256(&raw),
            c.digest,
            "each child under its official digest"
        );
    }
    for o in &others[1..] {
        assert!(q.get_manifest(&path, &o.digest).await.is_none());
    }

    let (_, img) = svc.get(&format!("/images/{source}")).await;
    assert_eq!(img["subset"], true, "{img}");
    assert_eq!(img["index_rebuilt"], true);
    assert_eq!(img["mirror_digest"], rebuilt.as_str());
    assert_eq!(img["mirror_digest_official"], false);
    assert_eq!(img["source_index_digest"], idx.digest.as_str());
    assert!(
        img["note"]
            .as_str()
            .unwrap()
            .contains("NOT an official digest"),
        "{img}"
    );
    assert_eq!(img["pull"]["by_tag"], format!("{dst}:1.0@{rebuilt}"));
    let children: Vec<(&str, &str)> = img["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["platform"].as_str().unwrap(),
                c["digest"].as_str().unwrap(),
            )
        })
        .collect();
    // In the job's (sorted) order of the platforms asked.
    assert_eq!(
        children,
        [
            ("linux/amd64", amd64.digest.as_str()),
            ("linux/arm64/v8", arm64.digest.as_str())
        ]
    );
    assert_eq!(img["children"][0]["attestations"], json!([atts[0].digest]));
    assert_eq!(
        img["children"][1]["pull"],
        format!("{dst}@{}", arm64.digest)
    );
    let (status, found) = svc.get(&format!("/digests/{}", arm64.digest)).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["records"][0]["as"], "platform manifest");
    assert_eq!(found["records"][0]["index_rebuilt"], true);
    // Drift watch compares the tag with the rebuilt index, upstream with the official one.
    assert_eq!(counts(&svc.drift_round().await), [1, 1, 0, 0, 0, 0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_platforms_are_refused_and_a_missing_one_fails_the_job() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let amd64 = child(&p, "six/app", 1, "amd64", None).await;
    six_platforms(&p, "six/app", "1.0", amd64).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, &up, &down).await;
    let source = format!("{}/six/app:1.0", up.host());
    for (platforms, want) in [
        (
            json!(["linux/amd64", "amd64"]),
            "platforms[1]: \"amd64\" is not a platform: write os/arch or os/arch/variant",
        ),
        (
            json!(["linux/amd64/v1/x"]),
            "platforms[0]: \"linux/amd64/v1/x\"",
        ),
        (json!([]), "platforms is empty"),
    ] {
        let (status, v) = svc
            .mirror(&json!({ "image": source, "platforms": platforms }))
            .await;
        assert_eq!(status, 400, "{platforms}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(want), "{platforms}: {v}");
    }
    let (status, v) = svc
        .mirror(&json!({ "image": source, "platforms": "linux/amd64" }))
        .await;
    assert_eq!(status, 422, "not a list: {v}");
    let (_, jobs) = svc.get("/jobs").await;
    assert_eq!(jobs["jobs"], json!([]), "nothing queued: {jobs}");

    // A dry run plans only the child and its attestation.
    let (status, plan) = svc
        .mirror(&json!({ "image": source, "platforms": ["linux/amd64"], "dry_run": true }))
        .await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(
        (plan["subset"].clone(), plan["manifests_pushed"].clone()),
        (json!(true), json!(2))
    );

    // A platform the index lacks: the job fails for good, saying which it has.
    let (status, job) = svc
        .mirror(&json!({ "image": source, "platforms": ["windows/amd64"] }))
        .await;
    let job = svc
        .wait_job(accepted(status, &job), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["last_error"].as_str().unwrap();
    assert!(
        error.contains("has no platform windows/amd64; it has linux/amd64, linux/arm64/v8"),
        "{error}"
    );
    assert!(
        Pusher::new(&down)
            .get_manifest(&mirror_path(&up), "1.0")
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dispatch_payload_names_platforms_for_its_images() {
    use crate::github::{deliver, dispatch, sign};
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let amd64 = child(&p, "six/app", 1, "amd64", None).await;
    six_platforms(&p, "six/app", "1.0", amd64.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[("MIRROR_GITHUB_WEBHOOK_SECRETS", "s3cret")],
    )
    .await;
    let body = dispatch(
        json!({ "image": format!("{}/six/app:1.0", up.host()), "platforms": ["linux/amd64"] }),
        "acme/x",
    );
    let (status, v) = deliver(
        &svc,
        "repository_dispatch",
        "p-1",
        &body,
        Some(sign("s3cret", &body)),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["jobs"][0]["platforms"], json!(["linux/amd64"]), "{v}");
    succeeded(&svc, v["jobs"][0]["id"].as_i64().unwrap()).await;
    let (_, _, dcd) = Pusher::new(&down)
        .get_manifest(&mirror_path(&up), "1.0")
        .await
        .unwrap();
    assert_eq!(dcd, amd64.digest, "the tag names the child");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_list_entry_names_platforms() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let amd64 = child(&p, "six/app", 1, "amd64", None).await;
    let (idx, _, _) = six_platforms(&p, "six/app", "1.0", amd64.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirrors.yaml");
    std::fs::write(
        &file,
        format!(
            "images:\n  - source: {}/six/app:1.0\n    platforms: [linux/amd64]\n",
            up.host()
        ),
    )
    .unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[
            ("MIRROR_SYNC_FILE", file.to_str().unwrap()),
            ("MIRROR_SYNC_INTERVAL", "0"),
            ("MIRROR_DRIFT_INTERVAL", "0"),
        ],
    )
    .await;
    // The sync at start queues one job, for the subset.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let id = loop {
        let (_, jobs) = svc.get("/jobs").await;
        if let Some(j) = jobs["jobs"].as_array().and_then(|a| a.first()) {
            assert_eq!(j["platforms"], json!(["linux/amd64"]), "{j}");
            break j["id"].as_i64().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no job from the mirror list"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    succeeded(&svc, id).await;
    let (_, img) = svc.get(&format!("/images/{}/six/app:1.0", up.host())).await;
    assert_eq!(img["subset"], true, "{img}");
    assert_eq!(img["source_index_digest"], idx.digest.as_str());
    assert_eq!(img["mirror_digest"], amd64.digest.as_str());
    assert_eq!(img["requested_by"]["line"], 2, "{img}");
    // Synced again as it is: up to date, nothing queued.
    let report = svc.sync_round().await;
    assert_eq!(
        (report["queued"].clone(), report["up_to_date"].clone()),
        (json!(0), json!(1)),
        "{report}"
    );

    // The entry drops `platforms`: the mirror was not made as it now asks, so the whole index is
    // copied and the tag names the official index.
    std::fs::write(
        &file,
        format!("images:\n  - source: {}/six/app:1.0\n", up.host()),
    )
    .unwrap();
    let report = svc.sync_round().await;
    assert_eq!(report["queued"], 1, "{report}");
    let (_, jobs) = svc.get("/jobs").await;
    let newest = &jobs["jobs"][0];
    assert_eq!(newest["platforms"], Value::Null, "{newest}");
    succeeded(&svc, newest["id"].as_i64().unwrap()).await;
    let (_, _, dcd) = Pusher::new(&down)
        .get_manifest(&mirror_path(&up), "1.0")
        .await
        .unwrap();
    assert_eq!(dcd, idx.digest, "the whole index now");
    let (_, img) = svc.get(&format!("/images/{}/six/app:1.0", up.host())).await;
    assert_eq!(img["subset"], false, "{img}");
    assert_eq!(svc.sync_round().await["queued"], 0);
}
