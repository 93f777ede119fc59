//! Uploads that fit the registry (a body limit before it, a chunk size set, ECR's and GHCR's
//! answers to chunks) and transfers that continue where a cut left them, against real registries
//! behind nginx or, for faults, the in-process front.

use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::{Method, StatusCode, header};
use serde_json::{Value, json};

use crate::support::front::{Action, Front, relative_location};
use crate::support::image::{OCI_MANIFEST, TestImage};
use crate::support::nginx::Nginx;
use crate::support::{Pusher, Registry, bin, skopeo};

const MIB: u64 = 1 << 20;

/// Runs the CLI with no credentials.
async fn mirror(args: &[&str]) -> Output {
    let empty = tempfile::tempdir().unwrap();
    tokio::process::Command::new(bin())
        .args(args)
        .env("DOCKER_CONFIG", empty.path())
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("MIRROR_CHUNK_SIZE")
        .env("MIRROR_LOG", "info")
        .output()
        .await
        .expect("running mirror-mirror")
}

#[track_caller]
fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "copy failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

/// `copy FROM/REPO@DIGEST TO/REPO:v1 EXTRA… --json`, which must succeed; its JSON result.
async fn copy_image(from: &str, to: &str, repo: &str, digest: &str, extra: &[&str]) -> Value {
    let (src, dst) = (format!("{from}/{repo}@{digest}"), format!("{to}/{repo}:v1"));
    let mut args = vec!["copy", src.as_str(), dst.as_str()];
    args.extend_from_slice(extra);
    args.push("--json");
    ok_json(&mirror(&args).await)
}

/// An image on `reg` with one generated layer of `len` bytes, tagged `v1`.
async fn big_image(reg: &Registry, repo: &str, seed: u64, len: u64) -> (TestImage, String) {
    let p = Pusher::new(reg);
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
    let c = p.blob(repo, config.as_bytes()).await;
    let layer = p.generated_blob(repo, seed, len).await;
    let bytes = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": len}],
    }))
    .unwrap();
    let digest = p.manifest(repo, "v1", OCI_MANIFEST, &bytes).await;
    (
        TestImage {
            digest,
            bytes,
            media_type: OCI_MANIFEST.into(),
            blobs: vec![c, layer.clone()],
        },
        layer,
    )
}

/// (method, status, request target) of each line of an nginx access log (`combined` format).
fn nginx_requests(log: &str) -> Vec<(String, u16, String)> {
    log.lines()
        .filter_map(|l| {
            let mut parts = l.split('"');
            let request = parts.nth(1)?;
            let status = parts.next()?.split_whitespace().next()?.parse().ok()?;
            let mut r = request.split_whitespace();
            Some((r.next()?.to_string(), status, r.next()?.to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_front_refusing_bodies_over_64_mib_gets_the_layer_in_chunks() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let front = Nginx::front(&dst.host(), "client_max_body_size 64m;");
    let (img, layer) = big_image(&src, "big/app", 5, 100 * MIB).await;
    let r = copy_image(&src.host(), &front.host(), "big/app", &img.digest, &[]).await;
    assert_eq!(r["target_digest"], json!(img.digest), "{}", front.log());
    let seen = nginx_requests(&front.access_log());
    let refused: Vec<_> = seen
        .iter()
        .filter(|(m, s, _)| m == "PUT" && *s == 413)
        .collect();
    assert_eq!(refused.len(), 1, "one monolithic PUT was refused: {seen:?}");
    let patches = seen.iter().filter(|(m, _, _)| m == "PATCH").count();
    assert!(
        seen.iter()
            .filter(|(m, _, _)| m == "PATCH")
            .all(|(_, s, _)| *s == 202),
        "every chunk accepted: {seen:?}"
    );
    assert_eq!(patches, 13, "100 MiB in 8 MiB chunks: {seen:?}");
    assert!(Pusher::new(&dst).blob_exists("big/app", &layer).await);
    // skopeo reads every blob back through the front and checks its digest.
    let oci = tempfile::tempdir().unwrap();
    skopeo::copy_all_to_oci(&format!("{}/big/app:v1", front.host()), oci.path(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_size_setting_keeps_every_request_under_a_4_mib_limit() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    // GHCR takes at most 4 MiB per PATCH.
    let front = Nginx::front(&dst.host(), "client_max_body_size 4m;");
    let (img, _) = big_image(&src, "ghcr/app", 6, 18 * MIB).await;
    let r = copy_image(
        &src.host(),
        &front.host(),
        "ghcr/app",
        &img.digest,
        &["--chunk-size", "4MiB"],
    )
    .await;
    assert_eq!(r["target_digest"], json!(img.digest));
    let seen = nginx_requests(&front.access_log());
    assert!(
        seen.iter().all(|(_, s, _)| *s != 413),
        "no request over the limit: {seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|(m, _, _)| m == "PATCH").count(),
        5,
        "18 MiB in 4 MiB chunks: {seen:?}"
    );
    skopeo::copy_all_to_oci(
        &format!("{}/ghcr/app:v1", front.host()),
        tempfile::tempdir().unwrap().path(),
        None,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_chunk_size_is_refused_with_the_range() {
    let out = mirror(&["copy", "a/b:c", "d/e:f", "--chunk-size", "1k"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--chunk-size (MIRROR_CHUNK_SIZE): a chunk size of 1024 bytes is outside 256 KiB to 64 MiB"),
        "{err}"
    );
    let out = mirror(&["copy", "a/b:c", "d/e:f", "--chunk-size", "lots"]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a size"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ecr_and_ghcr_answers_to_chunks_are_followed() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    // ECR answers a chunk with 201; GHCR gives relative Locations.
    let front = Front::start(&dst.host(), |r| {
        if r.path.contains("/blobs/uploads/") {
            let patch = r.method == Method::PATCH;
            Action::Rewrite(Box::new(move |p| {
                if patch && p.status == StatusCode::ACCEPTED {
                    p.status = StatusCode::CREATED;
                }
                relative_location(p);
            }))
        } else {
            Action::Pass
        }
    })
    .await;
    let (img, _) = big_image(&src, "ecr/app", 7, 12 * MIB).await;
    let r = copy_image(
        &src.host(),
        &front.host(),
        "ecr/app",
        &img.digest,
        &["--chunk-size", "5MiB"],
    )
    .await;
    assert_eq!(r["target_digest"], json!(img.digest));
    let log = front.log();
    let patches: Vec<_> = log.iter().filter(|l| l.method == Method::PATCH).collect();
    assert_eq!(patches.len(), 3, "12 MiB in 5 MiB chunks: {log:?}");
    assert!(patches.iter().all(|l| l.status == 201), "{log:?}");
    skopeo::copy_all_to_oci(
        &format!("{}/ecr/app:v1", dst.host()),
        tempfile::tempdir().unwrap().path(),
        None,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_cut_every_96_mib_resumes_a_1_gib_layer() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let (img, layer) = big_image(&src, "huge/app", 8, 1 << 30).await;
    // Every blob connection drops after 96 MiB.
    let front = Front::start(&src.host(), |r| {
        if r.method == Method::GET && r.path.contains("/blobs/sha256:") {
            Action::CutAfter(96 * MIB)
        } else {
            Action::Pass
        }
    })
    .await;
    let r = copy_image(&front.host(), &dst.host(), "huge/app", &img.digest, &[]).await;
    assert_eq!(r["target_digest"], json!(img.digest));
    let served = front.blob_bytes_served();
    eprintln!(
        "1 GiB layer through a source cut every 96 MiB: {served} bytes read from the source ({:.3} x)",
        served as f64 / (1u64 << 30) as f64
    );
    assert!(
        served as f64 <= 1.1 * (1u64 << 30) as f64,
        "read {served} bytes from the source for a 1 GiB layer"
    );
    let resumed = front
        .log()
        .iter()
        .filter(|l| l.range.as_deref().is_some_and(|r| r.starts_with("bytes=")) && l.status == 206)
        .count();
    assert!(resumed >= 10, "continued with Range: {:?}", front.log());
    assert!(Pusher::new(&dst).blob_exists("huge/app", &layer).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_that_ignores_range_starts_the_blob_again() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let (img, layer) = big_image(&src, "norange/app", 9, 4 * MIB).await;
    let first = Arc::new(AtomicUsize::new(0));
    let cut = layer.clone();
    let front = Front::start(&src.host(), move |r| {
        if r.method != Method::GET || !r.path.contains("/blobs/sha256:") {
            Action::Pass
        } else if r.headers.contains_key(header::RANGE) {
            Action::Strip(header::RANGE)
        } else if r.path.ends_with(&cut) && first.fetch_add(1, Ordering::SeqCst) == 0 {
            Action::CutAfter(MIB)
        } else {
            Action::Pass
        }
    })
    .await;
    let r = copy_image(&front.host(), &dst.host(), "norange/app", &img.digest, &[]).await;
    assert_eq!(r["target_digest"], json!(img.digest));
    let gets: Vec<_> = front
        .log()
        .into_iter()
        .filter(|l| l.method == Method::GET && l.path.ends_with(&layer))
        .map(|l| (l.range, l.status))
        .collect();
    // The front cuts after 1 MiB; what reached the copy before the cut (and so where it asks
    // to continue) depends on the load, never more than that.
    let resumed_at = gets
        .get(1)
        .and_then(|(r, _)| r.as_deref()?.strip_prefix("bytes=")?.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    assert!(
        resumed_at.is_some_and(|n| n > 0 && n <= MIB as usize),
        "{gets:?}"
    );
    assert_eq!(
        gets.iter()
            .map(|(r, s)| (r.is_some(), *s))
            .collect::<Vec<_>>(),
        vec![(false, 200), (true, 200), (false, 200)],
        "cut, a Range the source ignored, then the whole blob again: {gets:?}"
    );
    assert!(Pusher::new(&dst).blob_exists("norange/app", &layer).await);
}

/// The requests to upload sessions that received chunks, in order: (method, range, status);
/// and how many sessions were opened in all.
fn chunked_steps(front: &Front) -> (Vec<(String, Option<String>, u16)>, usize) {
    let log = front.log();
    let session = |path: &str| {
        path.rsplit_once("/blobs/uploads/")
            .map(|(_, id)| id.to_string())
    };
    let chunked: std::collections::HashSet<String> = log
        .iter()
        .filter(|l| l.method == Method::PATCH)
        .filter_map(|l| session(&l.path))
        .collect();
    let steps = log
        .iter()
        .filter(|l| session(&l.path).is_some_and(|id| chunked.contains(&id)))
        .map(|l| (l.method.to_string(), l.range.clone(), l.status))
        .collect();
    let opened = log
        .iter()
        .filter(|l| l.method == Method::POST && l.path.ends_with("/blobs/uploads/"))
        .count();
    (steps, opened)
}

fn patch(i: u64, status: u16) -> (String, Option<String>, u16) {
    (
        "PATCH".to_string(),
        Some(format!("{}-{}", i * MIB, (i + 1) * MIB - 1)),
        status,
    )
}

fn step(method: &str, status: u16) -> (String, Option<String>, u16) {
    (method.to_string(), None, status)
}

/// Copies a 5 MiB layer in 1 MiB chunks to a front before `dst` that answers the second `PATCH`
/// with `fault`; answers the steps of the chunked sessions and the sessions opened (the config
/// blob takes one).
async fn copy_with_second_chunk(
    fault: fn() -> Action,
) -> (Vec<(String, Option<String>, u16)>, usize) {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let (img, layer) = big_image(&src, "lost/app", 10, 5 * MIB).await;
    let patches = Arc::new(AtomicUsize::new(0));
    let front = Front::start(&dst.host(), move |r| {
        if r.method == Method::PATCH && patches.fetch_add(1, Ordering::SeqCst) == 1 {
            fault()
        } else {
            Action::Pass
        }
    })
    .await;
    let r = copy_image(
        &src.host(),
        &front.host(),
        "lost/app",
        &img.digest,
        &["--chunk-size", "1MiB"],
    )
    .await;
    assert_eq!(r["target_digest"], json!(img.digest));
    assert!(Pusher::new(&dst).blob_exists("lost/app", &layer).await);
    chunked_steps(&front)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_refused_on_the_way_continues_where_the_session_stands() {
    // A front that failed the second chunk before the registry saw it.
    let (steps, opened) = copy_with_second_chunk(|| Action::Answer(503, "UNAVAILABLE")).await;
    assert_eq!(opened, 2, "one session for the config, one for the layer");
    assert_eq!(
        steps,
        [
            patch(0, 202),
            patch(1, 503),
            step("GET", 204),
            patch(1, 202),
            patch(2, 202),
            patch(3, 202),
            patch(4, 202),
            step("PUT", 201),
        ],
        "the session is asked where it stands and continues; the first chunk is not sent again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_whose_answer_was_lost_starts_a_new_session() {
    // The registry took the second chunk but its answer was lost: distribution then refuses the
    // session's URL (its state is behind), so the blob starts again in a new session.
    let (steps, opened) = copy_with_second_chunk(|| Action::Lose(502)).await;
    assert_eq!(opened, 3, "the config's session, the lost one, a new one");
    assert_eq!(
        &steps[..3],
        &[patch(0, 202), patch(1, 502), step("GET", 404)],
        "{steps:?}"
    );
    let fresh: Vec<_> = steps[3..]
        .iter()
        .filter(|(m, _, _)| m != "DELETE")
        .cloned()
        .collect();
    assert_eq!(
        fresh,
        [
            patch(0, 202),
            patch(1, 202),
            patch(2, 202),
            patch(3, 202),
            patch(4, 202),
            step("PUT", 201),
        ],
        "a new session from the first byte: {steps:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_blob_in_chunks_never_reaches_its_full_length_on_the_target() {
    use crate::faults::{Fault, Faulty, Route};
    // A source that serves a 1 MiB layer with one byte flipped, every time.
    let f = Faulty::default();
    let layer = crate::support::image::bytes(71, MIB as usize);
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let (c, l) = (f.blob(config), f.blob(&layer));
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l, "size": layer.len()}],
    }))
    .unwrap();
    f.manifest("v1", OCI_MANIFEST, &manifest);
    f.always(Route::Blob, Fault::Corrupt);
    let up = f.start().await;
    let dst = Registry::anonymous().await;
    // The (also corrupted) config is on the target already: only the layer moves, so its chunks
    // start for sure, not cut short by the config's mismatch.
    Pusher::new(&dst).blob("m/img", config).await;
    let front = Front::start(&dst.host(), |_| Action::Pass).await;
    let out = mirror(&[
        "copy",
        &format!("{up}/img:v1"),
        &format!("{}/m/img:v1", front.host()),
        "--chunk-size",
        "256KiB",
        "--retries",
        "2",
    ])
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("digest mismatch"),
        "{err}"
    );
    let ranges: Vec<String> = front
        .log()
        .into_iter()
        .filter(|l| l.method == Method::PATCH)
        .filter_map(|l| l.range)
        .collect();
    assert!(
        ranges.iter().any(|r| r == "0-262143"),
        "chunks were sent: {ranges:?}"
    );
    assert!(
        !ranges.iter().any(|r| r.ends_with(&format!("-{}", MIB - 1))),
        "the last chunk waits for the digest, so the upload never reaches 1 MiB: {ranges:?}"
    );
    assert!(
        !Pusher::new(&dst).blob_exists("m/img", &l).await,
        "not committed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_limit_in_the_registries_file_chunks_from_the_first_blob() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let front = Nginx::front(&dst.host(), "client_max_body_size 4m;");
    let (img, _) = big_image(&src, "file/app", 12, 10 * MIB).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registries.yaml");
    std::fs::write(&file, format!("{}:\n  max_body: 4MiB\n", front.host())).unwrap();
    let r = copy_image(
        &src.host(),
        &front.host(),
        "file/app",
        &img.digest,
        &["--registries-file", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(r["target_digest"], json!(img.digest));
    let seen = nginx_requests(&front.access_log());
    assert!(seen.iter().all(|(_, s, _)| *s != 413), "{seen:?}");
    assert_eq!(
        seen.iter().filter(|(m, _, _)| m == "PATCH").count(),
        3,
        "10 MiB in chunks of the 4 MiB limit: {seen:?}"
    );
}
