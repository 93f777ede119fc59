//! One request, several registries (issue 15): `MIRROR_TARGETS` names targets, a request becomes
//! one job per target under a request id, every target gets the same official digest, and a
//! target that is down does not hold up the others.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::front::{Action, Front};
use crate::support::image::{Style, platform};
use crate::support::nginx::{Nginx, TWO_LEVEL_NAMES};
use crate::support::service::Service;
use crate::support::{Pusher, Registry, sha256, skopeo};

/// A 2-platform index at `repo:v1` upstream; its digest.
async fn two_platforms(up: &Registry, repo: &str, seed: u64) -> String {
    let p = Pusher::new(up);
    let a = p
        .image(repo, seed, &[20_000, 40_000], false, Style::Compact)
        .await;
    let b = p
        .image(repo, seed + 1, &[30_000], false, Style::Compact)
        .await;
    p.index(
        repo,
        Some("v1"),
        &[
            (a, platform("linux", "amd64")),
            (b, platform("linux", "arm64")),
        ],
        false,
        Style::Compact,
    )
    .await
    .digest
}

/// Polls `GET /requests/{id}` until `done` holds for it (bounded).
async fn wait_request(
    svc: &Service,
    id: i64,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let (status, r) = svc.get(&format!("/requests/{id}")).await;
        assert_eq!(status, 200, "{r}");
        if done(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "request {id} not there in {limit:?}: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A service with targets `ghcr` (`a`), `home` (`b`) and `lab` (`c` behind a front that answers
/// the first PUT of blob `large` with `action`, setting `hit`); the front, the service and its
/// directory (kept while the service runs).
async fn three_targets_one_faulty(
    up: &Registry,
    a: &Registry,
    b: &Registry,
    c: &Registry,
    large: &str,
    hit: &Arc<AtomicBool>,
    action: impl Fn() -> Action + Send + Sync + 'static,
) -> (Front, Service, tempfile::TempDir) {
    let (once, needle) = (hit.clone(), format!("digest={}", large.replace(':', "%3A")));
    let front = Front::start(&c.host(), move |seen| {
        if seen.method == "PUT" && seen.path.contains(&needle) && !once.swap(true, Ordering::SeqCst)
        {
            action()
        } else {
            Action::Pass
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let targets = format!(
        "ghcr={}/mirror,home={}/mirror,lab={}/mirror",
        a.host(),
        b.host(),
        front.host()
    );
    let svc = Service::start(
        &dir.path().join("m.db"),
        "unused",
        &up.host(),
        &[("MIRROR_TARGET", ""), ("MIRROR_TARGETS", &targets)],
    )
    .await;
    (front, svc, dir)
}

fn digest_of(reference: &str) -> String {
    sha256(&skopeo::inspect_raw(reference, None))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_lands_on_every_target_with_the_official_digest() {
    let up = Registry::anonymous().await;
    let (a, b) = (Registry::anonymous().await, Registry::anonymous().await);
    // The second target takes only two-level names, as Docker Hub or ACR do: flat layout there.
    let front = Nginx::front(&b.host(), TWO_LEVEL_NAMES);
    let digest = two_platforms(&up, "field/app", 500).await;
    let dir = tempfile::tempdir().unwrap();
    let registries = dir.path().join("registries.yaml");
    std::fs::write(&registries, format!("{}:\n  layout: flat\n", front.host())).unwrap();
    let targets = format!("ghcr={}/mirror,home={}/acme", a.host(), front.host());
    let svc = Service::start(
        &dir.path().join("m.db"),
        "unused",
        &up.host(),
        &[
            ("MIRROR_TARGET", ""),
            ("MIRROR_TARGETS", &targets),
            ("MIRROR_REGISTRIES_FILE", registries.to_str().unwrap()),
        ],
    )
    .await;
    let source = format!("{}/field/app:v1", up.host());
    let (status, body) = svc.mirror(&json!({ "image": source })).await;
    assert_eq!(status, 202, "{body}");
    let id = body["request_id"].as_i64().expect("a request id");
    let jobs = body["jobs"].as_array().unwrap();
    assert_eq!(
        jobs.iter()
            .map(|j| j["target_name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["ghcr", "home"],
        "{body}"
    );
    assert_ne!(jobs[0]["id"], jobs[1]["id"], "one job per target: {body}");
    let done = wait_request(&svc, id, Duration::from_secs(60), |r| {
        r["state"] == "succeeded"
    })
    .await;
    assert_eq!(done["source_digest"], json!(digest), "{done}");
    let mapped_up = up.host().replace(':', "_");
    let nested = format!("{}/mirror/{mapped_up}/field/app", a.host());
    let flat = format!("{}/acme/{mapped_up}__field__app", front.host());
    for (mirror, job) in [&nested, &flat]
        .iter()
        .zip(done["targets"].as_array().unwrap())
    {
        assert_eq!(job["pull"], json!(format!("{mirror}@{digest}")), "{done}");
        assert_eq!(
            digest_of(&format!("{mirror}:v1")),
            digest,
            "skopeo reads {mirror} by tag"
        );
    }
    // The ledger lists the tag's mirror on each target.
    let (status, image) = svc.get(&format!("/images/{source}")).await;
    assert_eq!(status, 200, "{image}");
    let mut mirrors: Vec<&str> = image["mirrors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mirror"].as_str().unwrap())
        .collect();
    mirrors.sort();
    let mut want = vec![nested.as_str(), flat.as_str()];
    want.sort();
    assert_eq!(mirrors, want, "{image}");

    // Naming targets: one of them, or an unknown one.
    let (status, one) = svc
        .mirror(&json!({ "image": source, "targets": ["home"] }))
        .await;
    assert_eq!(status, 202, "{one}");
    assert_eq!(
        one["target_name"], "home",
        "one target: the job itself: {one}"
    );
    let (status, err) = svc
        .mirror(&json!({ "image": source, "targets": ["cn"] }))
        .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(
        err["error"]["message"], "target \"cn\" is not configured; known targets: ghcr, home",
        "{err}"
    );
    let (status, err) = svc
        .mirror(&json!({ "image": source, "targets": ["home"], "target": format!("{nested}:x") }))
        .await;
    assert_eq!(status, 400, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_that_is_down_does_not_hold_up_the_other() {
    let up = Registry::anonymous().await;
    let (a, b) = (Registry::anonymous().await, Registry::anonymous().await);
    // The second target's registry is down behind its load balancer until `down` is cleared.
    let down = Arc::new(AtomicBool::new(true));
    let gate = down.clone();
    let front = Front::start(&b.host(), move |_| {
        if gate.load(Ordering::SeqCst) {
            Action::Answer(503, "UNAVAILABLE")
        } else {
            Action::Pass
        }
    })
    .await;
    let digest = two_platforms(&up, "field/tool", 600).await;
    let dir = tempfile::tempdir().unwrap();
    let targets = format!("ghcr={}/mirror,home={}/mirror", a.host(), front.host());
    let svc = Service::start(
        &dir.path().join("m.db"),
        "unused",
        &up.host(),
        &[("MIRROR_TARGET", ""), ("MIRROR_TARGETS", &targets)],
    )
    .await;
    let (status, body) = svc
        .mirror(&json!({ "image": format!("{}/field/tool:v1", up.host()) }))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["request_id"].as_i64().unwrap();
    // The first target is done while the second waits to try again: partial.
    let partial = wait_request(&svc, id, Duration::from_secs(30), |r| {
        r["state"] == "partial"
    })
    .await;
    let (ghcr, home) = (&partial["targets"][0], &partial["targets"][1]);
    assert_eq!(
        (ghcr["target_name"].as_str(), ghcr["state"].as_str()),
        (Some("ghcr"), Some("succeeded")),
        "{partial}"
    );
    assert_eq!(home["state"], "queued", "{partial}");
    assert!(
        home["last_error"].as_str().unwrap().contains("503"),
        "the second target's failure is kept: {partial}"
    );
    // Back up: the retry completes it, with the digest the request settled on.
    down.store(false, Ordering::SeqCst);
    let done = wait_request(&svc, id, Duration::from_secs(60), |r| {
        r["state"] == "succeeded"
    })
    .await;
    assert_eq!(done["source_digest"], json!(digest), "{done}");
    let mapped_up = up.host().replace(':', "_");
    for host in [a.host(), b.host()] {
        assert_eq!(
            digest_of(&format!("{host}/mirror/{mapped_up}/field/tool:v1")),
            digest,
            "skopeo reads the mirror on {host}"
        );
    }
}

/// A 2-platform index at `repo:v1` upstream whose layers are a small one and one of `big` bytes
/// per platform: its digest, and every manifest and blob digest of it.
async fn two_platforms_with(
    up: &Registry,
    repo: &str,
    seed: u64,
    big: usize,
) -> (String, Vec<String>, Vec<String>) {
    let p = Pusher::new(up);
    let a = p
        .image(repo, seed, &[20_000, big], false, Style::Compact)
        .await;
    let b = p
        .image(repo, seed + 1, &[30_000, big + 1], false, Style::Compact)
        .await;
    let index = p
        .index(
            repo,
            Some("v1"),
            &[
                (a.clone(), platform("linux", "amd64")),
                (b.clone(), platform("linux", "arm64")),
            ],
            false,
            Style::Compact,
        )
        .await;
    let manifests = vec![index.digest.clone(), a.digest, b.digest];
    let blobs = a.blobs.into_iter().chain(b.blobs).collect();
    (index.digest, manifests, blobs)
}

/// How many times the source's access log (from line `from` on) shows `method path`.
fn served(up: &Registry, from: usize, method: &str, path: &str) -> usize {
    let needle = format!("\"{method} {path} ");
    up.log()
        .lines()
        .skip(from)
        .filter(|l| l.contains(&needle))
        .count()
}

/// Mirrors `source` through `svc` and waits for every target of the request to succeed.
async fn mirror_all(svc: &Service, source: &str, targets: usize) -> Value {
    let (status, body) = svc.mirror(&json!({ "image": source })).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        body["jobs"].as_array().map(Vec::len),
        Some(targets),
        "{body}"
    );
    let id = body["request_id"].as_i64().expect("a request id");
    wait_request(svc, id, Duration::from_secs(90), |r| {
        r["state"] == "succeeded"
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn each_source_blob_is_read_once_for_every_target() {
    let up = Registry::anonymous().await;
    let (a, b, c) = (
        Registry::anonymous().await,
        Registry::anonymous().await,
        Registry::anonymous().await,
    );
    // Layers past 1 MiB go through the shared stream; the small ones and the configs are read
    // whole once and handed to each target.
    let (digest, manifests, blobs) = two_platforms_with(&up, "field/fan", 700, 3 << 20).await;
    let dir = tempfile::tempdir().unwrap();
    let targets = format!(
        "ghcr={}/mirror,home={}/mirror,lab={}/mirror",
        a.host(),
        b.host(),
        c.host()
    );
    let svc = Service::start(
        &dir.path().join("m.db"),
        "unused",
        &up.host(),
        &[("MIRROR_TARGET", ""), ("MIRROR_TARGETS", &targets)],
    )
    .await;
    let from = up.log().lines().count();
    let done = mirror_all(&svc, &format!("{}/field/fan:v1", up.host()), 3).await;
    assert_eq!(done["source_digest"], json!(digest), "{done}");
    let mapped_up = up.host().replace(':', "_");
    for host in [a.host(), b.host(), c.host()] {
        assert_eq!(
            digest_of(&format!("{host}/mirror/{mapped_up}/field/fan:v1")),
            digest,
            "skopeo reads the mirror on {host}"
        );
    }
    let log = || up.log().lines().skip(from).collect::<Vec<_>>().join("\n");
    for blob in &blobs {
        assert_eq!(
            served(&up, from, "GET", &format!("/v2/field/fan/blobs/{blob}")),
            1,
            "blob {blob} read once for 3 targets; the source's log:\n{}",
            log()
        );
    }
    for m in &manifests {
        assert_eq!(
            served(&up, from, "GET", &format!("/v2/field/fan/manifests/{m}")),
            1,
            "manifest {m} fetched once for 3 targets; the source's log:\n{}",
            log()
        );
    }
    assert_eq!(
        served(&up, from, "HEAD", "/v2/field/fan/manifests/v1"),
        1,
        "the tag resolved once for 3 targets; the source's log:\n{}",
        log()
    );
    // What refers to the image is looked up once too: the referrers API and the fallback tag
    // of every manifest.
    for m in &manifests {
        let fallback = m.replace(':', "-");
        assert_eq!(
            served(&up, from, "GET", &format!("/v2/field/fan/referrers/{m}")),
            1,
            "referrers of {m} looked up once; the source's log:\n{}",
            log()
        );
        assert_eq!(
            served(
                &up,
                from,
                "HEAD",
                &format!("/v2/field/fan/manifests/{fallback}")
            ),
            1,
            "{fallback} looked up once; the source's log:\n{}",
            log()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_failing_mid_blob_reads_the_source_on_its_own() {
    let up = Registry::anonymous().await;
    let (a, b, c) = (
        Registry::anonymous().await,
        Registry::anonymous().await,
        Registry::anonymous().await,
    );
    let big = 6 << 20;
    let (digest, _, blobs) = two_platforms_with(&up, "field/cut", 800, big).await;
    // The amd64 image's large layer (blobs: config, small, large; then arm64's).
    let large = blobs[2].clone();
    // The third target takes 1 MiB of that layer's first upload, then fails it.
    let failed = Arc::new(AtomicBool::new(false));
    let (front, svc, _dir) = three_targets_one_faulty(&up, &a, &b, &c, &large, &failed, || {
        Action::FailAfter(1 << 20, 500)
    })
    .await;
    let from = up.log().lines().count();
    let done = mirror_all(&svc, &format!("{}/field/cut:v1", up.host()), 3).await;
    assert!(failed.load(Ordering::SeqCst), "the upload was failed once");
    let mapped_up = up.host().replace(':', "_");
    for host in [a.host(), b.host(), c.host()] {
        assert_eq!(
            digest_of(&format!("{host}/mirror/{mapped_up}/field/cut:v1")),
            digest,
            "skopeo reads the mirror on {host}"
        );
    }
    for job in done["targets"].as_array().unwrap() {
        assert_eq!(
            job["attempts"], 1,
            "no target needed another attempt: {done}"
        );
    }
    let log = || up.log().lines().skip(from).collect::<Vec<_>>().join("\n");
    // The shared read, and the failed target's own read after it dropped out.
    assert_eq!(
        served(&up, from, "GET", &format!("/v2/field/cut/blobs/{large}")),
        2,
        "the source's log:\n{}",
        log()
    );
    for blob in blobs.iter().filter(|b| **b != large) {
        assert_eq!(
            served(&up, from, "GET", &format!("/v2/field/cut/blobs/{blob}")),
            1,
            "blob {blob}; the source's log:\n{}",
            log()
        );
    }
    let puts: Vec<u16> = front
        .log()
        .iter()
        .filter(|l| l.method == "PUT" && l.path.contains("/blobs/uploads/"))
        .map(|l| l.status)
        .collect();
    assert!(
        puts.contains(&500) && puts.iter().filter(|s| **s == 201).count() >= 3,
        "the third target's failed upload, then its own: {puts:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_that_stalls_mid_blob_does_not_hold_up_the_others() {
    let up = Registry::anonymous().await;
    let (a, b, c) = (
        Registry::anonymous().await,
        Registry::anonymous().await,
        Registry::anonymous().await,
    );
    let (digest, _, blobs) = two_platforms_with(&up, "field/slow", 900, 20 << 20).await;
    let large = blobs[2].clone();
    // The third target stops taking that layer's first upload after 1 MiB, for far longer than
    // the whole request takes when nobody waits for it.
    let stall = Duration::from_secs(60);
    let stalled = Arc::new(AtomicBool::new(false));
    let (_front, svc, _dir) =
        three_targets_one_faulty(&up, &a, &b, &c, &large, &stalled, move || {
            Action::StallAfter(1 << 20, stall)
        })
        .await;
    let from = up.log().lines().count();
    let (status, body) = svc
        .mirror(&json!({ "image": format!("{}/field/slow:v1", up.host()) }))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["request_id"].as_i64().unwrap();
    // The other targets are done well within the stall: nobody waits for the stalled one.
    let deadline = Instant::now() + stall / 2;
    loop {
        let (status, r) = svc.get(&format!("/requests/{id}")).await;
        assert_eq!(status, 200, "{r}");
        if r["targets"][0]["state"] == "succeeded" && r["targets"][1]["state"] == "succeeded" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the targets that do not stall are not done in {:?}: {r}\nthe service's log:\n{}",
            stall / 2,
            svc.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The stalled one completes too: dropped from the shared read, it reads the source on its
    // own at once; when it had joined late and was reading on its own already (seen under CI
    // load), nothing else waits for it and it goes on when the stall ends.
    let deadline = Instant::now() + stall + Duration::from_secs(30);
    let done = loop {
        let (status, r) = svc.get(&format!("/requests/{id}")).await;
        assert_eq!(status, 200, "{r}");
        if r["state"] == "succeeded" {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "request {id} not done after the stall: {r}\nthe service's log:\n{}",
            svc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(stalled.load(Ordering::SeqCst), "the upload was stalled");
    let mapped_up = up.host().replace(':', "_");
    for host in [a.host(), b.host(), c.host()] {
        assert_eq!(
            digest_of(&format!("{host}/mirror/{mapped_up}/field/slow:v1")),
            digest,
            "skopeo reads the mirror on {host}"
        );
    }
    assert_eq!(done["source_digest"], json!(digest), "{done}");
    assert_eq!(
        served(&up, from, "GET", &format!("/v2/field/slow/blobs/{large}")),
        2,
        "the shared read and the stalled target's own; the source's log:\n{}",
        up.log().lines().skip(from).collect::<Vec<_>>().join("\n")
    );
}
