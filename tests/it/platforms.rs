//! `copy --platform`: only some children of an index travel, each under its official digest, with
//! the attestations about them; the tag names the one child (or, with several, a rebuilt index that
//! says it is not official); a platform the index lacks is refused before anything is written.

use std::process::Output;

use serde_json::{Value, json};

use crate::support::image::{Style, TestImage, bytes, platform};
use crate::support::podman::Store;
use crate::support::{Pusher, Registry, bin, sha256, skopeo};

fn run(args: &[&str]) -> Output {
    let empty = tempfile::tempdir().unwrap();
    std::process::Command::new(bin())
        .args(args)
        .env("DOCKER_CONFIG", empty.path())
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

/// A synthetic child for `os/arch[/variant]` with its own config and layer.
pub(crate) async fn child(
    p: &Pusher,
    repo: &str,
    seed: u64,
    arch: &str,
    variant: Option<&str>,
) -> TestImage {
    let config = json!({
        "architecture": arch, "os": "linux", "variant": variant, "seed": seed,
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    p.image_with(
        repo,
        &serde_json::to_vec(&config).unwrap(),
        &[bytes(seed, 20_000 + seed as usize)],
        false,
        Style::Compact,
    )
    .await
}

fn attestation_of(d: &str) -> Value {
    json!({
        "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {
            "vnd.docker.reference.type": "attestation-manifest",
            "vnd.docker.reference.digest": d,
        },
    })
}

/// A six-platform index at `repo:tag` whose linux/amd64 child is `amd64` (and linux/arm64 is
/// `arm64`), each with an attestation manifest; returns (index, the other children, attestations).
pub(crate) async fn six_platforms(
    p: &Pusher,
    repo: &str,
    tag: &str,
    amd64: TestImage,
) -> (TestImage, Vec<TestImage>, Vec<TestImage>) {
    let arm64 = child(p, repo, 2, "arm64", Some("v8")).await;
    let mut others = vec![arm64.clone()];
    let mut entries = vec![
        (amd64.clone(), platform("linux", "amd64")),
        (
            arm64.clone(),
            json!({"platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}),
        ),
    ];
    for (i, (arch, variant)) in [
        ("arm", Some("v7")),
        ("s390x", None),
        ("ppc64le", None),
        ("riscv64", None),
    ]
    .into_iter()
    .enumerate()
    {
        let c = child(p, repo, 3 + i as u64, arch, variant).await;
        let mut plat = json!({"platform": {"os": "linux", "architecture": arch}});
        if let Some(v) = variant {
            plat["platform"]["variant"] = v.into();
        }
        entries.push((c.clone(), plat));
        others.push(c);
    }
    let att_amd = p.image(repo, 90, &[300], false, Style::Compact).await;
    let att_arm = p.image(repo, 91, &[301], false, Style::Compact).await;
    entries.push((att_amd.clone(), attestation_of(&amd64.digest)));
    entries.push((att_arm.clone(), attestation_of(&arm64.digest)));
    let idx = p
        .index(repo, Some(tag), &entries, false, Style::CrlfOdd)
        .await;
    (idx, others, vec![att_amd, att_arm])
}

/// What the harness's blob lists name: the config and layers of an image manifest.
pub(crate) fn blobs_of(manifest: &[u8]) -> Vec<String> {
    let v: Value = serde_json::from_slice(manifest).unwrap();
    let mut out = vec![v["config"]["digest"].as_str().unwrap().to_string()];
    for l in v["layers"].as_array().unwrap() {
        out.push(l["digest"].as_str().unwrap().to_string());
    }
    out
}

async fn catalog(reg: &Registry) -> Value {
    reg.http()
        .get(format!("{}/v2/_catalog", reg.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_platform_of_six_lands_under_its_official_digest_and_podman_pulls_it() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    // A real child built by buildah (real tar layers) as linux/amd64, among five synthetic ones.
    let store = Store::new();
    let real = store.build_and_push(
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

    let src = format!("{}/six/app:1.0", up.host());
    let dst = format!("{}/mirror/app", down.host());
    let out = run(&["copy", &src, &dst, "--platform", "linux/amd64", "--json"]);
    let r = ok_json(&out);
    assert_eq!(r["subset"], true, "{r}");
    assert_eq!(r["index_rebuilt"], false, "{r}");
    assert_eq!(r["source_digest"], idx.digest.as_str());
    assert_eq!(r["source_index_digest"], idx.digest.as_str());
    assert_eq!(r["target_digest"], real.as_str());
    assert_eq!(r["pull"], format!("{dst}@{real}"));
    assert_eq!(r["platforms"], json!(["linux/amd64"]));
    assert_eq!(
        r["children"],
        json!([{"platform": "linux/amd64", "digest": real, "attestations": [atts[0].digest]}])
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "platform linux/amd64: {dst}@{real} (official digest"
        )),
        "{stderr}"
    );

    // The tag names the child's official digest, byte-exact (skopeo agrees).
    let q = Pusher::new(&down);
    let (tagged, _, dcd) = q.get_manifest("mirror/app", "1.0").await.unwrap();
    assert_eq!(dcd, real);
    assert_eq!(tagged, amd64.bytes);
    let raw = skopeo::inspect_raw(&format!("{dst}:1.0"), None);
    assert_eq!(sha256(&raw), real, "skopeo inspect --raw of the tag");

    // Only that child, its blobs and its attestation are on the target; not the index, not the
    // other platforms, not the other platform's attestation.
    for b in &amd64.blobs {
        assert!(q.blob_exists("mirror/app", b).await, "blob {b} of amd64");
    }
    assert!(
        q.get_manifest("mirror/app", &atts[0].digest)
            .await
            .is_some()
    );
    for b in &atts[0].blobs {
        assert!(q.blob_exists("mirror/app", b).await, "attestation blob {b}");
    }
    assert!(q.get_manifest("mirror/app", &idx.digest).await.is_none());
    assert!(
        q.get_manifest("mirror/app", &atts[1].digest)
            .await
            .is_none()
    );
    for o in &others {
        assert!(q.get_manifest("mirror/app", &o.digest).await.is_none());
        for b in &o.blobs {
            assert!(
                !q.blob_exists("mirror/app", b).await,
                "blob {b} of another platform"
            );
        }
    }

    // A user pulls it by the official digest listed in the official index.
    assert!(String::from_utf8_lossy(&idx.bytes).contains(&real));
    // (a store of its own: the builder's knows the image by its pre-push digest)
    assert_eq!(Store::new().pull(&format!("{dst}@{real}")), real);

    // Again: nothing new to move, the same answer.
    let again = ok_json(&run(&[
        "copy",
        &src,
        &dst,
        "--platform",
        "linux/amd64",
        "--json",
    ]));
    assert_eq!(again["target_digest"], real.as_str());
    assert_eq!(again["blobs_uploaded"], 0, "{again}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_platforms_tag_a_rebuilt_index_that_says_it_is_not_official() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let amd64 = child(&p, "six/app", 1, "amd64", None).await;
    let (idx, others, atts) = six_platforms(&p, "six/app", "1.0", amd64.clone()).await;
    let src = format!("{}/six/app:1.0", up.host());
    let dst = format!("{}/mirror/app", down.host());
    let out = run(&[
        "copy",
        &src,
        &dst,
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm64",
        "--json",
    ]);
    let r = ok_json(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NOT an official digest"), "{stderr}");
    assert_eq!(r["subset"], true);
    assert_eq!(r["index_rebuilt"], true);
    assert_eq!(r["source_index_digest"], idx.digest.as_str());
    assert_eq!(r["platforms"], json!(["linux/amd64", "linux/arm64/v8"]));
    let rebuilt = r["target_digest"].as_str().unwrap().to_string();
    assert_ne!(rebuilt, idx.digest);
    assert_eq!(r["children"][0]["digest"], amd64.digest.as_str());
    assert_eq!(r["children"][1]["digest"], others[0].digest.as_str());

    // The tag names the rebuilt index: the two children and their attestations, nothing else,
    // and a note of the official index it was cut from.
    let q = Pusher::new(&down);
    let (bytes, _, dcd) = q.get_manifest("mirror/app", "1.0").await.unwrap();
    assert_eq!(dcd, rebuilt);
    assert_eq!(sha256(&bytes), rebuilt);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    let listed: Vec<&str> = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["digest"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        [
            amd64.digest.as_str(),
            others[0].digest.as_str(),
            atts[0].digest.as_str(),
            atts[1].digest.as_str()
        ]
    );
    assert_eq!(
        v["annotations"]["dev.mirror-mirror.subset-of"],
        format!("{}/six/app:1.0@{}", up.host(), idx.digest)
    );
    // Each child is there under its official digest; the other four platforms are not.
    for c in [&amd64, &others[0]] {
        let raw = skopeo::inspect_raw(&format!("{dst}@{}", c.digest), None);
        assert_eq!(sha256(&raw), c.digest);
    }
    for o in &others[1..] {
        assert!(q.get_manifest("mirror/app", &o.digest).await.is_none());
        for b in &o.blobs {
            assert!(!q.blob_exists("mirror/app", b).await);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_platform_the_index_lacks_is_refused_before_anything_is_written() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let amd64 = child(&p, "six/app", 1, "amd64", None).await;
    six_platforms(&p, "six/app", "1.0", amd64).await;
    let src = format!("{}/six/app:1.0", up.host());
    let dst = format!("{}/mirror/app", down.host());
    let out = run(&[
        "copy",
        &src,
        &dst,
        "--platform",
        "linux/amd64",
        "--platform",
        "windows/amd64",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("has no platform windows/amd64; it has linux/amd64, linux/arm64/v8, linux/arm/v7, linux/s390x, linux/ppc64le, linux/riscv64"),
        "{stderr}"
    );
    assert!(!errors[0].contains("unknown/unknown"), "{stderr}");
    assert_eq!(
        catalog(&down).await["repositories"],
        json!([]),
        "nothing written"
    );

    // A dry run of a subset plans only the chosen child and its attestation, and writes nothing.
    let out = run(&[
        "copy",
        &src,
        &dst,
        "--platform",
        "linux/amd64",
        "--dry-run",
        "--json",
    ]);
    let plan = ok_json(&out);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["subset"], true);
    assert_eq!(
        plan["manifests_pushed"], 2,
        "the child and its attestation: {plan}"
    );
    assert_eq!(plan["blobs_uploaded"], 4, "{plan}");
    assert_eq!(
        catalog(&down).await["repositories"],
        json!([]),
        "nothing written"
    );

    // Not a platform at all: a usage error.
    let out = run(&["copy", &src, &dst, "--platform", "amd64"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("os/arch"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_single_image_is_copied_only_when_its_config_names_the_platform() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let img = child(&p, "one/app", 7, "arm64", Some("v8")).await;
    p.manifest("one/app", "v1", &img.media_type, &img.bytes)
        .await;
    let src = format!("{}/one/app:v1", up.host());
    let dst = format!("{}/mirror/one", down.host());
    let out = run(&["copy", &src, &dst, "--platform", "linux/amd64"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "is a single image for linux/arm64/v8, not an index: it has no platform linux/amd64"
        ),
        "{stderr}"
    );
    assert_eq!(catalog(&down).await["repositories"], json!([]));

    let r = ok_json(&run(&[
        "copy",
        &src,
        &dst,
        "--platform",
        "linux/arm64",
        "--json",
    ]));
    assert_eq!(r["target_digest"], img.digest.as_str());
    assert_eq!(r["platforms"], json!(["linux/arm64/v8"]));
    assert!(r.get("subset").is_none(), "nothing was left out: {r}");
    let raw = skopeo::inspect_raw(&format!("{dst}:v1"), None);
    assert_eq!(sha256(&raw), img.digest);
}
