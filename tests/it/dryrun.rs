//! Dry runs: `copy --dry-run` and `POST /mirror` with `"dry_run": true` say what a copy would do
//! (manifests to push; blobs to upload, mount or skip; bytes), read the source, ask the target
//! only with `HEAD`, and write nothing (the target's access log and skopeo say so).

use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::image::{Style, TestImage, bytes, platform};
use crate::support::service::Service;
use crate::support::{Pusher, Registry, bin, skopeo};

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

#[track_caller]
fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

/// A 2-platform index at `repo:tag` whose platforms share a base layer: 5 distinct blobs.
async fn shared_base(up: &Registry, repo: &str, tag: &str) -> (TestImage, Vec<(String, usize)>) {
    let p = Pusher::new(up);
    let base = bytes(1, 150_000);
    let mut children = Vec::new();
    let mut blobs = Vec::new();
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let own = bytes(10 + i as u64, 30_000 + i * 1000);
        let img = p
            .image_with(
                repo,
                config.as_bytes(),
                &[base.clone(), own.clone()],
                false,
                Style::CrlfOdd,
            )
            .await;
        blobs.push((img.blobs[0].clone(), config.len()));
        if i == 0 {
            blobs.push((img.blobs[1].clone(), base.len()));
        }
        blobs.push((img.blobs[2].clone(), own.len()));
        children.push((img, platform("linux", arch)));
    }
    let idx = p
        .index(repo, Some(tag), &children, false, Style::CrlfOdd)
        .await;
    (idx, blobs)
}

/// The target's requests since `from` (a log length): (method, path) of every `/v2/…` request.
fn requests(reg: &Registry, from: usize) -> Vec<(String, String)> {
    let log = reg.log();
    let re = regex::Regex::new(r#""(GET|HEAD|PUT|POST|PATCH|DELETE) (/v2/[^ ]*) HTTP"#).unwrap();
    re.captures_iter(&log[from..])
        .map(|c| (c[1].to_string(), c[2].to_string()))
        .collect()
}

#[track_caller]
fn assert_head_only(reqs: &[(String, String)]) {
    assert!(!reqs.is_empty(), "the target was asked something");
    let other: Vec<_> = reqs
        .iter()
        .filter(|(m, p)| m != "HEAD" && p != "/v2/")
        .collect();
    assert!(other.is_empty(), "only HEADs on the target: {other:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_dry_run_heads_the_target_writes_nothing_and_predicts_the_copy() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let (idx, blobs) = shared_base(&up, "team/app", "1.0").await;
    let src = format!("{}/team/app:1.0", up.host());
    let dst = format!("{}/mirror/app", down.host());
    // The target already has the shared base layer.
    let (base, base_len) = blobs[1].clone();
    Pusher::new(&down)
        .blob("mirror/app", &bytes(1, 150_000))
        .await;
    let all: usize = blobs.iter().map(|(_, n)| n).sum();

    let mark = down.log().len();
    let plan = json_of(&run(&["copy", &src, &dst, "--dry-run", "--json"]));
    assert_head_only(&requests(&down, mark));
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["up_to_date"], false);
    assert_eq!(plan["source_digest"], json!(idx.digest));
    assert_eq!(plan["manifests_pushed"], 3, "the index and two platforms");
    assert_eq!(
        plan["blobs_skipped"], 1,
        "the base layer is there: {plan:#}"
    );
    assert_eq!(plan["blobs_uploaded"], 4);
    assert_eq!(plan["blobs_mounted"], 0);
    assert_eq!(plan["bytes_total"], json!(all));
    assert_eq!(plan["bytes_moved"], json!(all - base_len));
    assert_eq!(plan["platforms"], json!(["linux/amd64", "linux/arm64"]));
    // Nothing written: no manifest, no tag, and skopeo finds nothing.
    let p = Pusher::new(&down);
    assert!(p.get_manifest("mirror/app", "1.0").await.is_none());
    assert!(p.get_manifest("mirror/app", &idx.digest).await.is_none());
    assert!(!p.blob_exists("mirror/app", &blobs[0].0).await);
    assert!(p.blob_exists("mirror/app", &base).await);
    let inspect = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{dst}:1.0"))
        .output()
        .unwrap();
    assert!(!inspect.status.success(), "skopeo finds no tag");

    // The one-line form for people.
    let out = run(&["copy", &src, &dst, "--dry-run"]);
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(
        line.starts_with("dry run: ")
            && line.contains("3 manifest(s) to push")
            && line.contains("blobs 4 to upload / 0 to mount / 1 already there")
            && line.trim_end().ends_with("nothing written"),
        "{line}"
    );

    // The real copy does what the dry run said.
    let copied = json_of(&run(&["copy", &src, &dst, "--json"]));
    for k in [
        "manifests_pushed",
        "blobs_uploaded",
        "blobs_skipped",
        "bytes_moved",
    ] {
        assert_eq!(copied[k], plan[k], "{k}");
    }
    let raw = skopeo::inspect_raw(&format!("{dst}@{}", idx.digest), None);
    assert_eq!(crate::support::sha256(&raw), idx.digest);

    // Up to date now: a dry run says so, still with HEADs only.
    let mark = down.log().len();
    let again = json_of(&run(&["copy", &src, &dst, "--dry-run", "--json"]));
    assert_head_only(&requests(&down, mark));
    assert_eq!(again["up_to_date"], true);
    assert_eq!(again["bytes_moved"], 0);
    let out = run(&["copy", &src, &dst, "--dry-run"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to copy"));

    // Within one registry, from the mirror to another repository: every blob would be mounted.
    let mark = down.log().len();
    let within = json_of(&run(&[
        "copy",
        &format!("{dst}:1.0"),
        &format!("{}/other/app", down.host()),
        "--dry-run",
        "--json",
    ]));
    let reqs: Vec<_> = requests(&down, mark)
        .into_iter()
        .filter(|(_, p)| p.starts_with("/v2/other/"))
        .collect();
    assert_head_only(&reqs);
    assert_eq!(within["blobs_mounted"], 5, "{within:#}");
    assert_eq!(within["bytes_moved"], 0);
    assert!(
        Pusher::new(&down)
            .get_manifest("other/app", "1.0")
            .await
            .is_none()
    );

    // A source that does not exist: the dry run fails as the copy would.
    let out = run(&[
        "copy",
        &format!("{}/team/absent:1", up.host()),
        &dst,
        "--dry-run",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[tokio::test(flavor = "multi_thread")]
async fn post_mirror_dry_run_answers_the_plan_and_queues_nothing() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[],
    )
    .await;
    let (idx, blobs) = shared_base(&up, "team/app", "1.0").await;
    let all: usize = blobs.iter().map(|(_, n)| n).sum();
    let image = format!("{}/team/app:1.0", up.host());

    let mark = down.log().len();
    let (status, plan) = svc
        .mirror(&json!({ "image": image, "dry_run": true }))
        .await;
    assert_eq!(status, 200, "{plan}");
    assert_head_only(&requests(&down, mark));
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["source_digest"], json!(idx.digest));
    assert_eq!(plan["manifests_pushed"], 3);
    assert_eq!(plan["blobs_uploaded"], 5);
    assert_eq!(plan["bytes_moved"], json!(all));
    let mirror_repo = format!(
        "{}/mirror/{}/team/app",
        down.host(),
        up.host().replace(':', "_")
    );
    assert_eq!(plan["target"], json!(format!("{mirror_repo}:1.0")));
    // Nothing queued, nothing written.
    let (_, jobs) = svc.get("/jobs").await;
    assert_eq!(jobs["jobs"], json!([]), "{jobs}");
    let path = mirror_repo.split_once('/').unwrap().1;
    assert!(
        Pusher::new(&down)
            .get_manifest(path, &idx.digest)
            .await
            .is_none()
    );

    // The same checks as a real request: a source outside the allow-list is refused.
    let (status, err) = svc
        .mirror(&json!({ "image": "quay.io/x/y:1", "dry_run": true }))
        .await;
    assert_eq!(status, 403, "{err}");
    // A source that does not exist: 422 saying so.
    let (status, err) = svc
        .mirror(&json!({ "image": format!("{}/team/absent:1", up.host()), "dry_run": true }))
        .await;
    assert_eq!(status, 422, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{err}"
    );

    // After the real copy, the dry run finds it up to date.
    let (status, job) = svc.mirror(&json!({ "image": image })).await;
    assert_eq!(status, 202);
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (status, plan) = svc
        .mirror(&json!({ "image": image, "dry_run": true }))
        .await;
    assert_eq!(status, 200);
    assert_eq!(plan["up_to_date"], true, "{plan}");
    assert_eq!(plan["blobs_uploaded"], 0);
}
