//! `mirror-mirror verify` against real registries: a good mirror (each manifest and blob read
//! once), a missing blob, a moved tag, a wrong source, the ledger of a real service, usage errors.

use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::image::{Style, TestImage, bytes, platform};
use crate::support::service::Service;
use crate::support::{Pusher, Registry, bin};

/// Runs the CLI with an empty Docker config.
fn run(args: &[&str]) -> Output {
    let empty = tempfile::tempdir().unwrap();
    std::process::Command::new(bin())
        .args(args)
        .env("DOCKER_CONFIG", empty.path())
        .env_remove("REGISTRY_AUTH_FILE")
        .env("MIRROR_LOG", "warn")
        .output()
        .expect("running mirror-mirror")
}

/// `verify … --json`: (exit status, report).
#[track_caller]
fn verify_json(args: &[&str]) -> (i32, Value) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = run(&all);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "verify --json printed no JSON (status {}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

/// A 2-platform index whose platforms share a base layer, pushed as `repo:tag`.
async fn shared_base(up: &Registry, repo: &str, tag: &str, seed: u64) -> TestImage {
    let p = Pusher::new(up);
    let base = bytes(seed, 200_000);
    let mut children = Vec::new();
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","seed":{seed},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let own = bytes(seed * 10 + i as u64, 40_000 + i * 1000);
        let img = p
            .image_with(
                repo,
                config.as_bytes(),
                &[base.clone(), own],
                false,
                Style::CrlfOdd,
            )
            .await;
        children.push((img, platform("linux", arch)));
    }
    p.index(repo, Some(tag), &children, false, Style::CrlfOdd)
        .await
}

/// Copies `src` to `dst` with the CLI.
#[track_caller]
fn copy(src: &str, dst: &str) {
    let out = run(&["copy", src, dst]);
    assert!(
        out.status.success(),
        "copy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// GET requests of `path` (a `/v2/…` path) in a registry's access log.
fn gets(log: &str, path: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(&format!("\"GET {path} ")))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn good_mirror_verifies_reading_each_manifest_and_blob_once() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let idx = shared_base(&up, "team/app", "1.0", 3).await;
    let src = format!("{}/team/app:1.0", up.host());
    let mirror = format!("{}/mirror/app:1.0", down.host());
    copy(&src, &mirror);
    let before = down.log();

    let (code, r) = verify_json(&[&mirror, "--digest", &idx.digest, "--source", &src]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["ok"], true);
    assert_eq!(r["manifests"], 3, "the index and its two children");
    let distinct: std::collections::HashSet<&String> = idx.blobs.iter().collect();
    assert_eq!(distinct.len(), 5, "2 configs, 1 shared base, 2 own layers");
    assert_eq!(r["blobs"], 5, "{r:#}");
    assert_eq!(r["platforms"], json!(["linux/amd64", "linux/arm64"]));
    assert_eq!(r["source"]["agrees"], true);
    assert_eq!(r["tag_digest"], json!(idx.digest));
    assert!(
        r["verdict"].as_str().unwrap().starts_with("OK "),
        "{}",
        r["verdict"]
    );

    // Nothing read twice: each blob (the shared base too) and each manifest one GET.
    let log = down.log();
    let log = &log[before.len()..];
    for b in &distinct {
        assert_eq!(
            gets(log, &format!("/v2/mirror/app/blobs/{b}")),
            1,
            "blob {b} GET once"
        );
    }
    assert_eq!(
        gets(log, &format!("/v2/mirror/app/manifests/{}", idx.digest)),
        1
    );
    // The source was asked with one HEAD, no GET.
    assert_eq!(gets(&up.log()[..], "/v2/team/app/manifests/1.0"), 0);

    // The plain verdict line is what CI shows.
    let out = run(&["verify", &mirror, "--digest", &idx.digest]);
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.starts_with(&format!("OK {mirror} serves {}", idx.digest)),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_blob_fails_naming_it() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let idx = shared_base(&up, "team/app", "1.0", 4).await;
    let mirror = format!("{}/mirror/app", down.host());
    copy(&format!("{}/team/app:1.0", up.host()), &mirror);
    // Garbage collection took the arm64 platform's own layer.
    let gone = idx.blobs.last().unwrap().clone();
    Pusher::new(&down).delete_blob("mirror/app", &gone).await;

    let by_digest = format!("{mirror}@{}", idx.digest);
    let (code, r) = verify_json(&[&by_digest]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["ok"], false);
    let problems = r["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{r:#}");
    assert_eq!(problems[0]["kind"], "missing");
    assert_eq!(
        problems[0]["what"],
        json!(format!("blob {gone} (linux/arm64)"))
    );
    let out = run(&["verify", &by_digest]);
    assert_eq!(out.status.code(), Some(1));
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(
        line.starts_with("FAIL ") && line.contains(&gone) && line.contains("missing"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn moved_tag_is_reported_and_the_digest_still_checked() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let idx = shared_base(&up, "team/app", "1.0", 5).await;
    let mirror = format!("{}/mirror/app:1.0", down.host());
    copy(&format!("{}/team/app:1.0", up.host()), &mirror);
    // Someone pushed another image under the mirror's tag.
    let other = Pusher::new(&down)
        .image("mirror/app", 99, &[1000], false, Style::Compact)
        .await;
    Pusher::new(&down)
        .manifest("mirror/app", "1.0", &other.media_type, &other.bytes)
        .await;

    let (code, r) = verify_json(&[&mirror, "--digest", &idx.digest]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["tag_digest"], json!(other.digest));
    let problems = r["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "only the tag is wrong: {r:#}");
    assert_eq!(problems[0]["kind"], "tag_moved");
    let msg = problems[0]["message"].as_str().unwrap();
    assert!(
        msg.contains(&other.digest) && msg.contains(&idx.digest),
        "{msg}"
    );
    assert_eq!(
        r["blobs"], 5,
        "the digest's content is still checked in full"
    );
    assert!(
        r["verdict"].as_str().unwrap().contains("tag 1.0"),
        "{}",
        r["verdict"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_source_fails() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let idx = shared_base(&up, "team/app", "1.0", 6).await;
    let other = shared_base(&up, "team/app", "2.0", 7).await;
    let mirror = format!("{}/mirror/app:1.0", down.host());
    copy(&format!("{}/team/app:1.0", up.host()), &mirror);

    let wrong = format!("{}/team/app:2.0", up.host());
    let (code, r) = verify_json(&[&mirror, "--digest", &idx.digest, "--source", &wrong]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["source"]["digest"], json!(other.digest));
    assert_eq!(r["source"]["agrees"], false);
    assert_eq!(r["problems"][0]["kind"], "source_differs");

    let absent = format!("{}/team/nothing:1.0", up.host());
    let (code, r) = verify_json(&[&mirror, "--digest", &idx.digest, "--source", &absent]);
    assert_eq!(code, 1, "{r:#}");
    assert!(
        r["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{r:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ledger_of_a_real_service_agrees_or_not() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[],
    )
    .await;
    let idx = shared_base(&up, "team/app", "1.0", 8).await;
    let (status, job) = svc
        .mirror(&json!({ "image": format!("{}/team/app:1.0", up.host()) }))
        .await;
    assert_eq!(status, 202, "{job}");
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let mirror_repo = format!(
        "{}/mirror/{}/team/app",
        down.host(),
        up.host().replace(':', "_")
    );
    let src = format!("{}/team/app:1.0", up.host());
    let (code, r) = verify_json(&[
        &format!("{mirror_repo}:1.0"),
        "--digest",
        &idx.digest,
        "--source",
        &src,
        "--ledger",
        &svc.url,
    ]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["ledger"]["agrees"], true);
    assert_eq!(r["ledger"]["mirrors"], json!([mirror_repo]));
    assert!(
        r["verdict"]
            .as_str()
            .unwrap()
            .ends_with("the ledger agrees"),
        "{}",
        r["verdict"]
    );

    // A copy made by hand, outside the service: the registry serves it, the ledger never saw it.
    let other = shared_base(&up, "team/app", "2.0", 9).await;
    let by_hand = format!("{}/elsewhere/app:2.0", down.host());
    copy(&format!("{}/team/app:2.0", up.host()), &by_hand);
    let (code, r) = verify_json(&[&by_hand, "--digest", &other.digest, "--ledger", &svc.url]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["problems"][0]["kind"], "ledger_disagrees", "{r:#}");
    assert_eq!(r["blobs"], 5, "the mirror itself checked out");

    // The digest is in the ledger, but for another mirror than the one asked about.
    let copy_of_1 = format!("{}/elsewhere/app:1.0", down.host());
    copy(&src, &copy_of_1);
    let (code, r) = verify_json(&[&copy_of_1, "--digest", &idx.digest, "--ledger", &svc.url]);
    assert_eq!(code, 1, "{r:#}");
    let msg = r["problems"][0]["message"].as_str().unwrap();
    assert!(msg.contains(&mirror_repo), "{msg}");

    // A ledger that does not answer: nothing is known, exit 3.
    let (code, r) = verify_json(&[
        &copy_of_1,
        "--digest",
        &idx.digest,
        "--ledger",
        "http://127.0.0.1:9/",
    ]);
    assert_eq!(code, 3, "{r:#}");
    assert_eq!(r["problems"][0]["kind"], "unchecked");
    assert!(r["verdict"].as_str().unwrap().starts_with("UNCHECKED "));
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let out = run(&["verify", "localhost:5000/app:1", "--digest", "sha256:abc"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--digest") && err.contains("sha256:"), "{err}");

    let out = run(&["verify", "localhost:5000/app:1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("give the official digest"), "{err}");

    let a = format!("sha256:{}", "a".repeat(64));
    let b = format!("sha256:{}", "b".repeat(64));
    let out = run(&["verify", &format!("localhost:5000/app@{a}"), "--digest", &b]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("give one digest"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_serving_other_bytes_fails_as_a_mismatch() {
    use crate::faults::{Fault, Faulty, Route};
    // A mirror (in-process: a real registry will not serve wrong bytes) whose layer is corrupted.
    let f = Faulty::default();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = bytes(11, 100_000);
    let (c, l) = (f.blob(config), f.blob(&layer));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l, "size": layer.len()}],
    })
    .to_string();
    let d = f.manifest(
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        manifest.as_bytes(),
    );
    let mirror = f.start().await;
    let good = format!("{mirror}/img:v1");
    let (code, r) = verify_json(&[&good, "--digest", &d, "--retries", "1"]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["blob_bytes"], json!(config.len() + layer.len()));

    f.always(Route::Blob, Fault::Corrupt);
    let (code, r) = verify_json(&[&good, "--digest", &d, "--retries", "1"]);
    assert_eq!(code, 1, "{r:#}");
    let kinds: Vec<&Value> = r["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["kind"])
        .collect();
    assert_eq!(kinds, [&json!("mismatch"), &json!("mismatch")], "{r:#}");
    assert!(
        r["verdict"].as_str().unwrap().contains("digest mismatch"),
        "{}",
        r["verdict"]
    );
}
