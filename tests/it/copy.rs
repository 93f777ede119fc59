//! `mirror-mirror copy` against real registries: whole indexes byte-exact, every auth mode, mounts,
//! shared blobs, digest-only sources, no-op second copies. skopeo checks the results independently.

use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_mirror::reference::ImageRef;
use mirror_mirror::registry::credentials::{Credential, CredentialStore};
use mirror_mirror::registry::{Client, ClientConfig, CopyOptions, Progress, copy};
use serde_json::{Value, json};

use crate::support::image::{Style, TestImage, platform};
use crate::support::{Pusher, Registry, TokenIssuer, bin, sha256, skopeo, write_docker_config};

/// Runs the CLI with `DOCKER_CONFIG` set to `docker_config` (a fresh empty one if `None`).
fn run(args: &[&str], docker_config: Option<&std::path::Path>) -> Output {
    let empty = tempfile::tempdir().unwrap();
    std::process::Command::new(bin())
        .args(args)
        .env("DOCKER_CONFIG", docker_config.unwrap_or(empty.path()))
        .env_remove("REGISTRY_AUTH_FILE")
        .env("MIRROR_LOG", "info")
        .output()
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

/// Checks, with our own GET and with skopeo, that `repo@digest` on `reg` serves exactly `bytes`.
async fn assert_served(reg: &Registry, repo: &str, reference: &str, want: &TestImage) {
    let (bytes, _, dcd) = Pusher::new(reg)
        .get_manifest(repo, reference)
        .await
        .expect("manifest on target");
    assert_eq!(sha256(&bytes), want.digest, "sha256 of the served bytes");
    assert_eq!(bytes, want.bytes, "byte-exact");
    assert_eq!(dcd, want.digest);
    let raw = skopeo::inspect_raw(
        &format!("{}/{repo}@{}", reg.host(), want.digest),
        reg.creds(),
    );
    assert_eq!(sha256(&raw), want.digest, "skopeo sees the same digest");
}

/// A 3-platform index whose platforms share one base layer, with unusual bytes.
async fn three_platforms(up: &Registry, repo: &str, tag: &str, docker: bool) -> TestImage {
    let p = Pusher::new(up);
    let base = support_bytes(1, 300_000);
    let mut children = Vec::new();
    for (i, arch) in ["amd64", "arm64", "s390x"].iter().enumerate() {
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let own = support_bytes(10 + i as u64, 50_000 + i * 1000);
        let img = p
            .image_with(
                repo,
                config.as_bytes(),
                &[base.clone(), own],
                docker,
                Style::CrlfOdd,
            )
            .await;
        children.push((img, platform("linux", arch)));
    }
    p.index(repo, Some(tag), &children, docker, Style::CrlfOdd)
        .await
}

fn support_bytes(seed: u64, n: usize) -> Vec<u8> {
    crate::support::image::bytes(seed, n)
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_index_with_three_platforms_is_copied_byte_exact() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let idx = three_platforms(&up, "team/app", "v1", false).await;
    assert!(
        String::from_utf8_lossy(&idx.bytes).contains("\r\n"),
        "the fixture has CRLF bytes"
    );
    let src = format!("{}/team/app:v1", up.host());
    let dst = format!("{}/mirror/app", down.host());
    let out = run(&["copy", &src, &dst], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pull = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        pull.trim(),
        format!("{dst}@{}", idx.digest),
        "stdout is the pull line"
    );
    assert_served(&down, "mirror/app", "v1", &idx).await;
    assert_served(&down, "mirror/app", &idx.digest, &idx).await;
    let oci = tempfile::tempdir().unwrap();
    skopeo::copy_all_to_oci(
        &format!("{dst}@{}", idx.digest),
        &oci.path().join("img"),
        None,
    );
    // The shared base layer crossed once: 3 configs + 3 own layers + 1 base = 7 uploads.
    let out = run(
        &[
            "copy",
            &src,
            &format!("{}/mirror/app2", down.host()),
            "--json",
        ],
        None,
    );
    let r = ok_json(&out);
    assert_eq!(r["target_digest"], json!(idx.digest));
    assert_eq!(r["blobs_uploaded"], 7, "{r:#}");
    assert_eq!(
        r["platforms"],
        json!(["linux/amd64", "linux/arm64", "linux/s390x"])
    );
    assert_eq!(r["manifests"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_manifest_list_keeps_its_digest_and_media_type() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let list = three_platforms(&up, "lib/tool", "1.0", true).await;
    let out = run(
        &[
            "copy",
            &format!("{}/lib/tool:1.0", up.host()),
            &format!("{}/m/tool", down.host()),
            "--json",
        ],
        None,
    );
    let r = ok_json(&out);
    assert_eq!(
        r["media_type"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    assert_served(&down, "m/tool", "1.0", &list).await;
    let (_, ct, _) = Pusher::new(&down)
        .get_manifest("m/tool", "1.0")
        .await
        .unwrap();
    assert_eq!(
        ct,
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    skopeo::copy_all_to_oci(
        &format!("{}/m/tool:1.0", down.host()),
        &tempfile::tempdir().unwrap().path().join("x"),
        None,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn index_of_indexes_with_attestations_is_copied_whole() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let amd = p
        .image("x/y", 1, &[1000, 2000], false, Style::Compact)
        .await;
    let arm = p.image("x/y", 2, &[1500], false, Style::Compact).await;
    // A buildx-style attestation manifest for the amd64 image.
    let att_config = br#"{"mediaType":"application/vnd.oci.image.config.v1+json"}"#;
    let att = p
        .image_with(
            "x/y",
            att_config,
            &[br#"{"_type":"https://in-toto.io/Statement/v0.1"}"#.to_vec()],
            false,
            Style::Compact,
        )
        .await;
    let inner = p
        .index(
            "x/y",
            None,
            &[
                (amd.clone(), platform("linux", "amd64")),
                (arm, platform("linux", "arm64")),
                (
                    att,
                    json!({"platform": {"os": "unknown", "architecture": "unknown"}, "annotations": {"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": amd.digest}}),
                ),
            ],
            false,
            Style::CrlfOdd,
        )
        .await;
    let win = p.image("x/y", 3, &[700], false, Style::Compact).await;
    let outer = p
        .index(
            "x/y",
            Some("multi"),
            &[
                (inner.clone(), json!({})),
                (win, platform("windows", "amd64")),
            ],
            false,
            Style::CrlfOdd,
        )
        .await;
    let out = run(
        &[
            "copy",
            &format!("{}/x/y:multi", up.host()),
            &format!("{}/x/y", down.host()),
            "--json",
        ],
        None,
    );
    let r = ok_json(&out);
    assert_served(&down, "x/y", "multi", &outer).await;
    assert_served(&down, "x/y", &inner.digest, &inner).await;
    let platforms = r["platforms"].as_array().unwrap();
    assert!(
        platforms.contains(&json!("linux/arm64")) && platforms.contains(&json!("windows/amd64")),
        "{r:#}"
    );
    let all: Vec<&Value> = r["manifests"].as_array().unwrap().iter().collect();
    assert_eq!(
        all.len(),
        6,
        "outer, inner, 3 children of inner, windows: {r:#}"
    );
    assert!(
        all.iter().any(|m| m["platform"] == "unknown/unknown"),
        "attestation copied"
    );
    for blob in &outer.blobs {
        assert!(
            Pusher::new(&down).blob_exists("x/y", blob).await,
            "blob {blob} on the target"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn artifacts_with_subject_and_empty_config_are_copied() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let img = p.image("art/x", 5, &[1234], false, Style::Compact).await;
    p.manifest("art/x", "v1", &img.media_type, &img.bytes).await;
    let empty = p.blob("art/x", b"{}").await;
    let sig = p.blob("art/x", b"signature bytes").await;
    let artifact = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.dev.cosign.simplesigning.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": sig, "size": 15}],
        "subject": {"mediaType": img.media_type, "digest": img.digest, "size": img.bytes.len()},
        "annotations": {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"}
    });
    let bytes = serde_json::to_vec_pretty(&artifact).unwrap();
    let d = p
        .manifest(
            "art/x",
            "sig",
            "application/vnd.oci.image.manifest.v1+json",
            &bytes,
        )
        .await;
    let want = TestImage {
        digest: d,
        bytes,
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        blobs: vec![empty, sig],
    };
    // The subject first (as a referrers-aware mirror would), then the artifact.
    ok_json(&run(
        &[
            "copy",
            &format!("{}/art/x:v1", up.host()),
            &format!("{}/art/x", down.host()),
            "--json",
        ],
        None,
    ));
    let r = ok_json(&run(
        &[
            "copy",
            &format!("{}/art/x:sig", up.host()),
            &format!("{}/art/x", down.host()),
            "--json",
        ],
        None,
    ));
    assert_eq!(r["blobs_uploaded"], 2);
    assert_served(&down, "art/x", "sig", &want).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn digest_only_source_is_written_by_digest_without_a_tag() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let img = Pusher::new(&up)
        .image("d/x", 9, &[4096], false, Style::CrlfOdd)
        .await;
    let src = format!("{}/d/x@{}", up.host(), img.digest);
    let out = run(&["copy", &src, &format!("{}/d/x", down.host())], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("{}/d/x@{}", down.host(), img.digest)
    );
    assert_served(&down, "d/x", &img.digest, &img).await;
    let tags: Value = serde_json::from_slice(
        &reqwest::get(format!("{}/v2/d/x/tags/list", down.url()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap_or(Value::Null);
    assert!(
        tags["tags"].as_array().is_none_or(|t| t.is_empty()),
        "no tag was written: {tags}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_copy_moves_no_blob_bytes() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    three_platforms(&up, "n/x", "1", false).await;
    let (src, dst) = (
        format!("{}/n/x:1", up.host()),
        format!("{}/n/x", down.host()),
    );
    let first = ok_json(&run(&["copy", &src, &dst, "--json"], None));
    assert_eq!(first["up_to_date"], false);
    let (up_before, down_before) = (up.log().lines().count(), down.log().lines().count());
    let second = ok_json(&run(&["copy", &src, &dst, "--json"], None));
    assert_eq!(second["up_to_date"], true);
    assert_eq!(second["bytes_moved"], 0);
    assert_eq!(second["target_digest"], first["target_digest"]);
    let up_log: Vec<String> = up
        .log()
        .lines()
        .skip(up_before)
        .filter(|l| {
            l.contains("\"GET /v2")
                || l.contains("\"HEAD /v2")
                || l.contains("\"PUT /v2")
                || l.contains("\"POST /v2")
        })
        .map(str::to_string)
        .collect();
    let down_log: Vec<String> = down
        .log()
        .lines()
        .skip(down_before)
        .filter(|l| {
            l.contains("\"GET /v2")
                || l.contains("\"HEAD /v2")
                || l.contains("\"PUT /v2")
                || l.contains("\"POST /v2")
        })
        .map(str::to_string)
        .collect();
    assert!(
        up_log.iter().all(|l| !l.contains("/blobs/")),
        "no blob request upstream: {up_log:#?}"
    );
    assert!(
        down_log.iter().all(|l| !l.contains("/blobs/")),
        "no blob request on the target: {down_log:#?}"
    );
    assert!(
        up_log.len() <= 2 && down_log.len() <= 2,
        "upstream {up_log:#?}\ntarget {down_log:#?}"
    );
    assert!(
        up_log.iter().all(|l| l.contains("\"HEAD ")),
        "the source is checked with HEAD: {up_log:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn layers_shared_across_repositories_are_mounted() {
    let issuer = TokenIssuer::start("alice", "s3cret-pass").await;
    let reg = Registry::token(&issuer).await;
    let img = Pusher::new(&reg)
        .image("src/app", 21, &[100_000, 200_000], false, Style::Compact)
        .await;
    Pusher::new(&reg)
        .manifest("src/app", "v2", &img.media_type, &img.bytes)
        .await;
    let cfg = tempfile::tempdir().unwrap();
    write_docker_config(cfg.path(), &[(&reg.host(), "alice", "s3cret-pass")]);
    let r = ok_json(&run(
        &[
            "copy",
            &format!("{}/src/app:v2", reg.host()),
            &format!("{}/dst/app", reg.host()),
            "--json",
        ],
        Some(cfg.path()),
    ));
    assert_eq!(
        r["blobs_mounted"], 3,
        "config and both layers mounted: {r:#}"
    );
    assert_eq!(r["blobs_uploaded"], 0);
    assert!(
        issuer
            .scopes()
            .iter()
            .any(|s| s == "repository:src/app:pull"),
        "the mount token asked for pull on the source: {:?}",
        issuer.scopes()
    );
    assert_served(&reg, "dst/app", "v2", &img).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_to_basic_and_basic_to_bearer_with_docker_config_credentials() {
    let anon = Registry::anonymous().await;
    let basic = Registry::basic("bob", "hunter2-long").await;
    let issuer = TokenIssuer::start("carol", "tok-pass-123").await;
    let bearer = Registry::token(&issuer).await;
    let img = three_platforms(&anon, "a/img", "t", false).await;
    let cfg = tempfile::tempdir().unwrap();
    write_docker_config(
        cfg.path(),
        &[
            (&basic.host(), "bob", "hunter2-long"),
            (&bearer.host(), "carol", "tok-pass-123"),
        ],
    );
    ok_json(&run(
        &[
            "copy",
            &format!("{}/a/img:t", anon.host()),
            &format!("{}/b/img", basic.host()),
            "--json",
        ],
        Some(cfg.path()),
    ));
    assert_served(&basic, "b/img", "t", &img).await;
    ok_json(&run(
        &[
            "copy",
            &format!("{}/b/img:t", basic.host()),
            &format!("{}/c/img", bearer.host()),
            "--json",
        ],
        Some(cfg.path()),
    ));
    assert_served(&bearer, "c/img", "t", &img).await;
    skopeo::copy_all_to_oci(
        &format!("{}/c/img:t", bearer.host()),
        &cfg.path().join("oci"),
        bearer.creds(),
    );
    // Without credentials the basic registry refuses, and the message says what to do.
    let out = run(
        &[
            "copy",
            &format!("{}/b/img:t", basic.host()),
            &format!("{}/z/img", anon.host()),
        ],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("requires credentials") && err.contains("Docker config"),
        "{err}"
    );
    // Wrong credentials for the bearer registry: a clear refusal, not a retry loop.
    let bad = tempfile::tempdir().unwrap();
    write_docker_config(bad.path(), &[(&bearer.host(), "carol", "wrong")]);
    let out = run(
        &[
            "copy",
            &format!("{}/c/img:t", bearer.host()),
            &format!("{}/z/img", anon.host()),
        ],
        Some(bad.path()),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("check the credentials"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_shorter_lived_than_the_copy_are_refreshed() {
    let issuer = TokenIssuer::start("dave", "pw-for-dave-1").await;
    issuer.set_lifetime(2);
    let (src, dst) = (
        Registry::token(&issuer).await,
        Registry::token(&issuer).await,
    );
    // The registry really rejects an expired token (so this test can fail).
    let t = issuer.mint("probe/x", "pull");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3100) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = reqwest::Client::new()
        .get(format!("{}/v2/probe/x/tags/list", src.url()))
        .bearer_auth(t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "an expired token is refused");
    let a = Pusher::new(&src)
        .image("t/a", 31, &[50_000; 3], false, Style::Compact)
        .await;
    let b = Pusher::new(&src)
        .image("t/b", 32, &[50_000; 3], false, Style::Compact)
        .await;
    let mut creds = CredentialStore::empty();
    for r in [&src, &dst] {
        creds.insert(
            &r.host(),
            Credential::Basic {
                username: "dave".into(),
                password: "pw-for-dave-1".into(),
            },
        );
    }
    let client = Client::new(ClientConfig::default(), creds).unwrap();
    let go = |img: &TestImage, repo: &str| {
        let source = ImageRef::parse(&format!("{}/{repo}@{}", src.host(), img.digest)).unwrap();
        let target = ImageRef::parse(&format!("{}/{repo}:x", dst.host())).unwrap();
        let client = client.clone();
        async move {
            copy(
                &client,
                &source,
                &target,
                &CopyOptions {
                    jobs: 2,
                    ..CopyOptions::default()
                },
                Arc::new(Progress::default()),
            )
            .await
        }
    };
    go(&a, "t/a").await.expect("first copy");
    let served = issuer.requests();
    // Outlive every token the first copy got, then copy again with the same client.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2100) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = go(&b, "t/b")
        .await
        .expect("copy with expired cached tokens");
    assert_eq!(r.target_digest.to_string(), b.digest);
    assert!(issuer.requests() > served, "fresh tokens were fetched");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1_gib_layer_outlives_its_2_second_tokens() {
    let issuer = TokenIssuer::start("gina", "gina-password-1").await;
    let (src, dst) = (
        Registry::token(&issuer).await,
        Registry::token(&issuer).await,
    );
    // 1 GiB of data: a 1 MiB random block, each copy stamped with its index.
    let block = support_bytes(77, 1 << 20);
    let mut big = Vec::with_capacity(1 << 30);
    for i in 0..1024u32 {
        big.extend_from_slice(&i.to_le_bytes());
        big.extend_from_slice(&block[4..]);
    }
    let p = Pusher::new(&src);
    let img = p
        .image_with(
            "huge/app",
            br#"{"architecture":"amd64","os":"linux"}"#,
            &[big],
            false,
            Style::Compact,
        )
        .await;
    drop(p);
    issuer.set_lifetime(2);
    let cfg = tempfile::tempdir().unwrap();
    write_docker_config(
        cfg.path(),
        &[
            (&src.host(), "gina", "gina-password-1"),
            (&dst.host(), "gina", "gina-password-1"),
        ],
    );
    let before = issuer.requests();
    let started = Instant::now();
    let r = ok_json(&run(
        &[
            "copy",
            &format!("{}/huge/app@{}", src.host(), img.digest),
            &format!("{}/huge/app:big", dst.host()),
            "--json",
        ],
        Some(cfg.path()),
    ));
    let took = started.elapsed();
    assert_eq!(r["target_digest"], json!(img.digest));
    assert_eq!(
        r["bytes_moved"].as_u64().unwrap(),
        (1u64 << 30) + 37,
        "the layer and the 37-byte config"
    );
    assert!(
        issuer.requests() > before,
        "tokens were fetched during the copy"
    );
    eprintln!(
        "1 GiB copy with 2 s tokens took {took:?}, {} token requests",
        issuer.requests() - before
    );
    assert_served(&dst, "huge/app", "big", &img).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identity_token_in_the_docker_config_is_used_as_a_refresh_token() {
    let issuer = TokenIssuer::start("hank", "hank-password-1").await;
    let reg = Registry::token(&issuer).await;
    let img = Pusher::new(&reg)
        .image("id/app", 91, &[3000], false, Style::Compact)
        .await;
    let cfg = tempfile::tempdir().unwrap();
    // The issuer accepts `refresh-<password>` as hank's refresh token.
    std::fs::write(
        cfg.path().join("config.json"),
        json!({"auths": {reg.host(): {"identitytoken": "refresh-hank-password-1"}}}).to_string(),
    )
    .unwrap();
    let r = ok_json(&run(
        &[
            "copy",
            &format!("{}/id/app@{}", reg.host(), img.digest),
            &format!("{}/id/copy:x", reg.host()),
            "--json",
        ],
        Some(cfg.path()),
    ));
    assert_eq!(r["target_digest"], json!(img.digest));
    assert_served(&reg, "id/copy", "x", &img).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn signatures_and_referrers_travel_with_the_image() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let img = p
        .image("signed/app", 101, &[2000], false, Style::Compact)
        .await;
    p.manifest("signed/app", "v1", &img.media_type, &img.bytes)
        .await;
    let hex = img.digest.trim_start_matches("sha256:");
    // A cosign-style signature under the `sha256-<hex>.sig` tag.
    let sig = p
        .image_with(
            "signed/app",
            br#"{"cosign":"sig"}"#,
            &[b"signature payload".to_vec()],
            false,
            Style::Compact,
        )
        .await;
    p.manifest(
        "signed/app",
        &format!("sha256-{hex}.sig"),
        &sig.media_type,
        &sig.bytes,
    )
    .await;
    // An OCI 1.1 artifact with a subject, listed in the `sha256-<hex>` fallback index (this
    // registry has no referrers API).
    let empty = p.blob("signed/app", b"{}").await;
    let sbom = p
        .blob("signed/app", b"{\"spdxVersion\":\"SPDX-2.3\"}")
        .await;
    let artifact = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/spdx+json", "digest": sbom, "size": 26}],
        "subject": {"mediaType": img.media_type, "digest": img.digest, "size": img.bytes.len()}
    }))
    .unwrap();
    let art = p
        .manifest(
            "signed/app",
            &sha256(&artifact),
            "application/vnd.oci.image.manifest.v1+json",
            &artifact,
        )
        .await;
    let fallback = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": art, "size": artifact.len(), "artifactType": "application/spdx+json"}]
    }))
    .unwrap();
    p.manifest(
        "signed/app",
        &format!("sha256-{hex}"),
        "application/vnd.oci.image.index.v1+json",
        &fallback,
    )
    .await;

    let r = ok_json(&run(
        &[
            "copy",
            &format!("{}/signed/app:v1", up.host()),
            &format!("{}/m/app", down.host()),
            "--json",
        ],
        None,
    ));
    let referrers = r["referrers"].as_array().unwrap();
    assert_eq!(referrers.len(), 2, "{r:#}");
    let target = Pusher::new(&down);
    let (bytes, _, _) = target
        .get_manifest("m/app", &format!("sha256-{hex}.sig"))
        .await
        .expect("signature tag copied");
    assert_eq!(sha256(&bytes), sig.digest);
    let (bytes, _, _) = target
        .get_manifest("m/app", &format!("sha256-{hex}"))
        .await
        .expect("fallback index copied");
    assert_eq!(bytes, fallback);
    let (bytes, _, _) = target
        .get_manifest("m/app", &art)
        .await
        .expect("the artifact itself");
    assert_eq!(bytes, artifact);
    assert!(target.blob_exists("m/app", &sbom).await);

    // Switched off: only the image.
    let r = ok_json(&run(
        &[
            "copy",
            &format!("{}/signed/app:v1", up.host()),
            &format!("{}/bare/app", down.host()),
            "--json",
            "--no-referrers",
        ],
        None,
    ));
    assert_eq!(r["referrers"], json!([]));
    assert!(
        target
            .get_manifest("bare/app", &format!("sha256-{hex}.sig"))
            .await
            .is_none()
    );
}

/// A source with the OCI referrers API, which distribution 2.8 lacks: an in-process front that
/// answers `GET /v2/<name>/referrers/<digest>` from `listed` (subject → descriptors) and forwards
/// every other request, bytes unchanged, to the real registry `up`.
async fn referrers_front(up: &Registry, listed: Vec<(String, Value)>) -> String {
    let upstream = up.url();
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (upstream, http, listed) = (upstream.clone(), http.clone(), listed.clone());
        async move {
            let path = req.uri().path().to_string();
            if req.method() == axum::http::Method::GET
                && let Some((_, subject)) = path.split_once("/referrers/")
            {
                let manifests: Vec<&Value> = listed
                    .iter()
                    .filter(|(s, _)| s == subject)
                    .map(|(_, d)| d)
                    .collect();
                let body = serde_json::to_vec(&json!({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": manifests,
                }))
                .unwrap();
                return axum::response::Response::builder()
                    .header("content-type", "application/vnd.oci.image.index.v1+json")
                    .body(axum::body::Body::from(body))
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

#[tokio::test(flavor = "multi_thread")]
async fn referrers_from_the_api_are_listed_in_the_targets_fallback_index() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let img = p
        .image("api/app", 201, &[2000], false, Style::Compact)
        .await;
    p.manifest("api/app", "v1", &img.media_type, &img.bytes)
        .await;
    let hex = img.digest.trim_start_matches("sha256:");
    // A signature bundle with a subject, listed by the source's referrers API only (no fallback tag).
    let empty = p.blob("api/app", b"{}").await;
    let bundle = p.blob("api/app", b"{\"bundle\":1}").await;
    let artifact = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "digest": bundle, "size": 12}],
        "subject": {"mediaType": img.media_type, "digest": img.digest, "size": img.bytes.len()}
    }))
    .unwrap();
    let art = p
        .manifest(
            "api/app",
            &sha256(&artifact),
            "application/vnd.oci.image.manifest.v1+json",
            &artifact,
        )
        .await;
    let listed = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": art,
        "size": artifact.len(),
        "artifactType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "annotations": {"org.opencontainers.image.created": "2026-11-28T00:00:00Z"}
    });
    let front = referrers_front(&up, vec![(img.digest.clone(), listed.clone())]).await;
    // The target's fallback index already lists another referrer: it must be kept.
    let target = Pusher::new(&down);
    let other = target
        .image("m/api", 202, &[10], false, Style::Compact)
        .await;
    let other_desc = json!({"mediaType": other.media_type, "digest": other.digest, "size": other.bytes.len(), "artifactType": "application/example"});
    let seeded = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [other_desc],
    }))
    .unwrap();
    target
        .manifest(
            "m/api",
            &format!("sha256-{hex}"),
            "application/vnd.oci.image.index.v1+json",
            &seeded,
        )
        .await;

    let r = ok_json(&run(
        &[
            "copy",
            &format!("{front}/api/app:v1"),
            &format!("{}/m/api", down.host()),
            "--json",
        ],
        None,
    ));
    let (bytes, _, _) = target
        .get_manifest("m/api", &art)
        .await
        .expect("the artifact itself");
    assert_eq!(bytes, artifact);
    assert!(target.blob_exists("m/api", &bundle).await);
    let (index, _, _) = target
        .get_manifest("m/api", &format!("sha256-{hex}"))
        .await
        .expect("fallback index");
    let index: Value = serde_json::from_slice(&index).unwrap();
    assert_eq!(
        index["manifests"],
        json!([other_desc, listed]),
        "kept the old entry, added the source's as given"
    );
    // An independent client reads the index the same way.
    let raw = skopeo::inspect_raw(&format!("{}/m/api:sha256-{hex}", down.host()), None);
    assert_eq!(serde_json::from_slice::<Value>(&raw).unwrap(), index);
    let referrers = r["referrers"].as_array().unwrap();
    assert!(referrers.iter().any(|x| x["digest"] == json!(art)), "{r:#}");
    assert!(
        referrers
            .iter()
            .any(|x| x["tag"] == json!(format!("sha256-{hex}"))
                && x["digest"] == json!(sha256(&raw))),
        "{r:#}"
    );
}
