//! The integrity of the mirror namespace through the real service: one owner per mirror
//! repository, one writer per target tag, dedupe that keeps what a request asked for, look-ups by
//! the mirror's own tag, pinned requests that stay pinned, and the flat layout on a registry that
//! takes only `namespace/repo` (nginx front, podman pull).

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::image::{Style, TestImage};
use crate::support::nginx::{Nginx, TWO_LEVEL_NAMES};
use crate::support::podman;
use crate::support::service::Service;
use crate::support::{Pusher, Registry, bin, sha256, skopeo};

const WAIT: Duration = Duration::from_secs(90);

/// Pushes a one-layer image to `repo` and tags it `tag`.
async fn tagged(up: &Registry, repo: &str, tag: &str, seed: u64, layer: usize) -> TestImage {
    let p = Pusher::new(up);
    let img = p.image(repo, seed, &[layer], false, Style::Compact).await;
    p.manifest(repo, tag, &img.media_type, &img.bytes).await;
    img
}

/// Posts `body` and waits for its job to succeed; returns the job.
async fn mirrored(svc: &Service, body: Value) -> Value {
    let (status, job) = svc.mirror(&body).await;
    assert_eq!(status, 202, "{body}: {job}");
    let job = svc.wait_job(job["id"].as_i64().unwrap(), WAIT).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    job
}

fn digest_of(reference: &str) -> String {
    sha256(&skopeo::inspect_raw(reference, None))
}

struct Setup {
    up: Registry,
    _down: Registry,
    _dir: tempfile::TempDir,
    svc: Service,
    prefix: String,
    /// How the source registry is written under the prefix (`127.0.0.1_PORT`).
    mapped_up: String,
}

async fn setup(env: &[(&str, &str)]) -> Setup {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("{}/mirror", down.host());
    let svc = Service::start(&dir.path().join("m.db"), &prefix, &up.host(), env).await;
    let mapped_up = up.host().replace(':', "_");
    Setup {
        up,
        _down: down,
        _dir: dir,
        svc,
        prefix,
        mapped_up,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_override_cannot_take_another_sources_mirror() {
    let s = setup(&[]).await;
    let up = s.up.host();
    let wide = tagged(&s.up, "bench/wide", "v1", 1, 2000).await;
    tagged(&s.up, "field/busybox", "1", 2, 3000).await;
    mirrored(&s.svc, json!({ "image": format!("{up}/bench/wide:v1") })).await;
    let wide_mirror = format!("{}/{}/bench/wide", s.prefix, s.mapped_up);

    // The measured defect: busybox written over wide's mirror tag.
    let (status, body) = s
        .svc
        .mirror(&json!({ "image": format!("{up}/field/busybox:1"), "target": format!("{wide_mirror}:v1") }))
        .await;
    assert_eq!(status, 409, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("{up}/bench/wide")) && msg.contains("another target"),
        "{msg}"
    );
    assert_eq!(body["error"]["code"], "conflict");
    assert_eq!(
        digest_of(&format!("{wide_mirror}:v1")),
        wide.digest,
        "the mirror tag still serves its own source"
    );

    // A name of the default mapping is reserved for its source before anyone used it.
    let reserved = format!("{}/{}/other/never", s.prefix, s.mapped_up);
    let (status, body) = s
        .svc
        .mirror(
            &json!({ "image": format!("{up}/field/busybox:1"), "target": format!("{reserved}:1") }),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("{up}/other/never")),
        "{body}"
    );

    // A name of the operator's choosing belongs to the first source mirrored into it.
    let custom = format!("{}/tools/bb", s.prefix);
    mirrored(
        &s.svc,
        json!({ "image": format!("{up}/field/busybox:1"), "target": format!("{custom}:1") }),
    )
    .await;
    let (status, body) = s
        .svc
        .mirror(&json!({ "image": format!("{up}/bench/wide:v1"), "target": format!("{custom}:2") }))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("belongs to {up}/field/busybox")),
        "{body}"
    );
    // Its owner may add tags.
    mirrored(
        &s.svc,
        json!({ "image": format!("{up}/field/busybox:1"), "target": format!("{custom}:2") }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_writer_per_target_tag_and_the_newest_request_wins() {
    let s = setup(&[]).await;
    let up = s.up.host();
    // The older request copies a large image, the newer one a small one: run side by side, the
    // newer finished first and the older then rewrote the tag.
    let old = tagged(&s.up, "app/x", "t", 3, 48 << 20).await;
    let new = tagged(&s.up, "app/x", "t", 4, 1000).await;
    let (status, first) = s
        .svc
        .mirror(&json!({ "image": format!("{up}/app/x:t@{}", old.digest) }))
        .await;
    assert_eq!(status, 202, "{first}");
    let (status, second) = s
        .svc
        .mirror(&json!({ "image": format!("{up}/app/x:t") }))
        .await;
    assert_eq!(status, 202, "{second}");
    assert_ne!(first["id"], second["id"]);
    let first = s.svc.wait_job(first["id"].as_i64().unwrap(), WAIT).await;
    let second = s.svc.wait_job(second["id"].as_i64().unwrap(), WAIT).await;
    assert_eq!(first["state"], "succeeded", "{first}");
    assert_eq!(second["state"], "succeeded", "{second}");
    assert!(
        second["started_at"].as_str().unwrap() >= first["finished_at"].as_str().unwrap(),
        "the newer job waited for the older one: {first} {second}"
    );
    let mirror = format!("{}/{}/app/x", s.prefix, s.mapped_up);
    assert_eq!(
        digest_of(&format!("{mirror}:t")),
        new.digest,
        "the tag ends at the newest request's digest"
    );
    let (status, tag) = s.svc.get(&format!("/images/{mirror}:t")).await;
    assert_eq!(status, 200, "{tag}");
    assert_eq!(
        tag["digest"],
        json!(new.digest),
        "the newest ledger record matches the tag"
    );
    assert_eq!(tag["history"].as_array().unwrap().len(), 2, "{tag}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dedupe_keeps_what_each_request_asked_for() {
    // An upstream that accepts connections and never answers keeps the first job running,
    // before it has resolved a digest.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = hang.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let down = Registry::anonymous().await;
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up,
        &[],
    )
    .await;
    let image = format!("{up}/x/y:1");
    let (_, first) = svc
        .mirror(&json!({ "image": image, "referrers": false }))
        .await;
    assert_eq!(first["dedupe"], "new", "{first}");
    let id = first["id"].as_i64().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while svc.get(&format!("/jobs/{id}")).await.1["state"] != "running" {
        assert!(std::time::Instant::now() < deadline, "job {id} never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The running job skips referrers: a request that wants them is queued after it, not
    // silently joined.
    let (status, second) = svc.mirror(&json!({ "image": image })).await;
    assert_eq!(status, 202, "{second}");
    assert_eq!(second["dedupe"], "queued_after", "{second}");
    assert_eq!(second["queued_after"], json!(id), "{second}");
    assert_eq!(second["referrers"], true, "{second}");
    let queued = second["id"].clone();
    assert_ne!(queued, json!(id));

    // A request with another policy joins the queued job and its policy is kept.
    let (_, third) = svc
        .mirror(&json!({ "image": image, "policy": "pin" }))
        .await;
    assert_eq!(
        (third["id"].clone(), third["dedupe"].clone()),
        (queued.clone(), json!("merged")),
        "{third}"
    );
    assert_eq!(third["policy"], "pin", "{third}");
    assert_eq!(third["referrers"], true, "{third}");
    // The same request again changes nothing.
    let (_, fourth) = svc
        .mirror(&json!({ "image": image, "policy": "pin", "referrers": false }))
        .await;
    assert_eq!(
        (fourth["id"].clone(), fourth["dedupe"].clone()),
        (queued.clone(), json!("joined")),
        "{fourth}"
    );
    let (_, stored) = svc.get(&format!("/jobs/{queued}")).await;
    assert_eq!(
        (stored["policy"].clone(), stored["referrers"].clone()),
        (json!("pin"), json!(true)),
        "{stored}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renamed_target_tag_is_found_by_the_mirror_name() {
    let s = setup(&[]).await;
    let up = s.up.host();
    let img = tagged(&s.up, "a/b", "1", 5, 1500).await;
    mirrored(&s.svc, json!({ "image": format!("{up}/a/b:1") })).await;
    let mirror = format!("{}/{}/a/b", s.prefix, s.mapped_up);
    mirrored(
        &s.svc,
        json!({ "image": format!("{up}/a/b:1"), "target": format!("{mirror}:stable") }),
    )
    .await;

    let (status, stable) = s.svc.get(&format!("/images/{mirror}:stable")).await;
    assert_eq!(status, 200, "{stable}");
    assert_eq!(stable["digest"], json!(img.digest));
    assert_eq!(stable["mirror_tag"], "stable");
    let by_tag = stable["pull"]["by_tag"].as_str().unwrap();
    assert_eq!(by_tag, format!("{mirror}:stable@{}", img.digest));
    assert_eq!(
        digest_of(&format!("{mirror}:stable")),
        img.digest,
        "the pull line's tag serves it"
    );

    // Two target tags from one source tag are two entries.
    let (_, repo) = s.svc.get(&format!("/images/{mirror}")).await;
    let mut tags: Vec<&str> = repo["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["mirror_tag"].as_str().unwrap())
        .collect();
    tags.sort();
    assert_eq!(tags, ["1", "stable"], "{repo}");
    let (_, source) = s.svc.get(&format!("/images/{up}/a/b:1")).await;
    assert_eq!(source["mirrors"].as_array().unwrap().len(), 2, "{source}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_digest_pinned_request_stays_pinned_and_drift_keeps_the_default() {
    let s = setup(&[]).await;
    let up = s.up.host();
    let old = tagged(&s.up, "p/q", "1", 6, 1000).await;
    tagged(&s.up, "p/r", "1", 7, 1000).await;
    let job = mirrored(
        &s.svc,
        json!({ "image": format!("{up}/p/q:1@{}", old.digest) }),
    )
    .await;
    assert_eq!(job["policy"], "pin", "{job}");
    mirrored(&s.svc, json!({ "image": format!("{up}/p/r:1") })).await;

    // Both tags move upstream; a drift round follows the one asked without a policy only.
    tagged(&s.up, "p/q", "1", 8, 1000).await;
    let moved = tagged(&s.up, "p/r", "1", 9, 1000).await;
    let round = s.svc.drift_round().await;
    assert_eq!(round["upstream_moved"], 2, "{round}");
    assert_eq!(
        round["jobs_queued"], 1,
        "only the followed tag gets a job: {round}"
    );
    let q = format!("{}/{}/p/q", s.prefix, s.mapped_up);
    let r = format!("{}/{}/p/r", s.prefix, s.mapped_up);
    // Wait for the followed tag's job, then check both.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, tag) = s.svc.get(&format!("/images/{r}:1")).await;
        if tag["digest"] == json!(moved.digest) {
            // The followed tag keeps "no policy of its own" (the service default applies),
            // not the default stamped onto it by the drift job.
            assert_eq!(tag["policy"], Value::Null, "{tag}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "r:1 never followed: {tag}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, pinned) = s.svc.get(&format!("/images/{q}:1")).await;
    assert_eq!(pinned["digest"], json!(old.digest), "{pinned}");
    assert_eq!(pinned["policy"], "pin", "{pinned}");
    assert_eq!(
        pinned["drift"][0]["kind"], "upstream_moved",
        "the move is recorded, not followed: {pinned}"
    );
    assert_eq!(digest_of(&format!("{q}:1")), old.digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_flat_layout_fits_a_registry_that_takes_only_two_levels() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let front = Nginx::front(&down.host(), TWO_LEVEL_NAMES);
    let store = podman::Store::new();
    let digest = store.build_and_push(
        &format!("{}/field/hello:1", up.host()),
        "amd64",
        &[("hello.txt", "hello from the mirror")],
    );
    let mapped_up = up.host().replace(':', "_");

    // The front refuses the nested name, as Docker Hub does; the one-shot copy takes the flat one.
    let copy = |layout: &str| {
        std::process::Command::new(bin())
            .args([
                "copy",
                &format!("{}/field/hello:1", up.host()),
                &format!("{}/tools", front.host()),
                "--layout",
                layout,
            ])
            .output()
            .unwrap()
    };
    let out = copy("nested");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("/v2/tools/{mapped_up}/field/hello/"))
            && stderr.contains("HTTP 400")
            && stderr.contains("MIRROR_TARGET_LAYOUT=flat, copy --layout flat"),
        "{stderr}"
    );
    let out = copy("flat");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flat = format!("{}/tools/{mapped_up}__field__hello", front.host());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{flat}@{digest}")
    );
    assert_eq!(digest_of(&format!("{flat}:1")), digest, "the tag is kept");

    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/acme", front.host()),
        &up.host(),
        &[("MIRROR_TARGET_LAYOUT", "flat")],
    )
    .await;
    let job = mirrored(
        &svc,
        json!({ "image": format!("{}/field/hello:1", up.host()) }),
    )
    .await;
    let mirror = format!("{}/acme/{mapped_up}__field__hello", front.host());
    assert_eq!(job["pull"], json!(format!("{mirror}@{digest}")), "{job}");
    // A user's machine: a store of its own, not the builder's.
    assert_eq!(
        podman::Store::new().pull(&format!("{mirror}@{digest}")),
        digest,
        "podman pulls the flat mirror by the official digest"
    );
    for name in [
        format!("{}/field/hello:1", up.host()),
        format!("{mirror}:1"),
    ] {
        let (status, tag) = svc.get(&format!("/images/{name}")).await;
        assert_eq!(status, 200, "{name}: {tag}");
        assert_eq!(tag["digest"], json!(digest), "{name}: {tag}");
        assert_eq!(
            tag["pull"]["by_tag"],
            json!(format!("{mirror}:1@{digest}")),
            "{tag}"
        );
    }
    assert!(
        front
            .access_log()
            .contains(&format!("/v2/acme/{mapped_up}__field__hello/manifests/")),
        "the copy went through the front:\n{}",
        front.log()
    );
}
