//! Registry quirks with clear outcomes (see docs/registries.md): immutable tags (ECR, Harbor) and
//! namespaces a push does not create (ECR, Harbor, ACR, GAR), emulated by the fault front before
//! a real registry.

use std::sync::Arc;

use axum::http::Method;
use mirror_mirror::reference::ImageRef;
use mirror_mirror::registry::credentials::CredentialStore;
use mirror_mirror::registry::{Client, ClientConfig, CopyOptions, Progress, copy};

use crate::support::front::{Action, Front};
use crate::support::image::{Style, TestImage};
use crate::support::{Pusher, Registry, bin};

/// ECR's answer to a tag written again on an immutable repository.
fn ecr_immutable(r: &crate::support::front::Seen<'_>) -> Action {
    let tag_put = r.method == Method::PUT
        && r.path
            .rsplit_once("/manifests/")
            .is_some_and(|(_, reference)| !reference.starts_with("sha256:"));
    if tag_put {
        Action::Answer(400, "TAG_INVALID")
    } else {
        Action::Pass
    }
}

async fn copy_via(
    source: &str,
    target: &str,
    repair: bool,
) -> Result<mirror_mirror::registry::CopyResult, mirror_mirror::registry::Error> {
    let client = Client::new(ClientConfig::default(), CredentialStore::empty()).unwrap();
    copy(
        &client,
        &ImageRef::parse(source).unwrap(),
        &ImageRef::parse(target).unwrap(),
        &CopyOptions {
            repair,
            ..CopyOptions::default()
        },
        Arc::new(Progress::default()),
    )
    .await
}

async fn two_images(src: &Registry) -> (TestImage, TestImage) {
    let p = Pusher::new(src);
    (
        p.image("imm/app", 61, &[3000], false, Style::Compact).await,
        p.image("imm/app", 62, &[3000], false, Style::Compact).await,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_immutable_tag_that_already_names_the_digest_is_success() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let (a, _) = two_images(&src).await;
    let source = format!("{}/imm/app@{}", src.host(), a.digest);
    copy_via(&source, &format!("{}/imm/app:v1", dst.host()), false)
        .await
        .expect("first mirror");
    let front = Front::start(&dst.host(), ecr_immutable).await;
    // A repair writes every manifest and the tag again; the registry refuses the tag.
    let r = copy_via(&source, &format!("{}/imm/app:v1", front.host()), true)
        .await
        .expect("the tag already names the digest: success");
    assert_eq!(r.target_digest.to_string(), a.digest);
    assert!(
        front.log().iter().any(|l| l.method == Method::PUT
            && l.path.ends_with("/manifests/v1")
            && l.status == 400),
        "the registry did refuse the tag: {:?}",
        front.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_immutable_tag_naming_another_digest_is_refused_saying_so() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let (a, b) = two_images(&src).await;
    copy_via(
        &format!("{}/imm/app@{}", src.host(), a.digest),
        &format!("{}/imm/app:v1", dst.host()),
        false,
    )
    .await
    .expect("first mirror");
    let front = Front::start(&dst.host(), ecr_immutable).await;
    let err = copy_via(
        &format!("{}/imm/app@{}", src.host(), b.digest),
        &format!("{}/imm/app:v1", front.host()),
        false,
    )
    .await
    .expect_err("an immutable tag cannot move");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "{}/imm/app:v1 is an immutable tag on {} and names {}, not {}",
            front.host(),
            front.host(),
            a.digest,
            b.digest
        )) && msg.contains("mirror under another tag"),
        "{msg}"
    );
    assert!(!err.is_transient(), "retrying cannot help: {msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_the_push_does_not_create_is_named_in_the_error() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let img = Pusher::new(&src)
        .image("ns/app", 63, &[2000], false, Style::Compact)
        .await;
    // ECR: 404 NAME_UNKNOWN; Harbor, ACR and Docker Hub: 403 DENIED "requested access to the
    // resource is denied".
    for (status, code) in [(404, "NAME_UNKNOWN"), (403, "DENIED")] {
        let front = Front::start(&dst.host(), move |r| {
            if r.method == Method::POST && r.path.contains("/blobs/uploads/") {
                Action::Answer(status, code)
            } else {
                Action::Pass
            }
        })
        .await;
        let empty = tempfile::tempdir().unwrap();
        let out = tokio::process::Command::new(bin())
            .args([
                "copy",
                &format!("{}/ns/app@{}", src.host(), img.digest),
                &format!("{}/acme/team/app:v1", front.host()),
            ])
            .env("DOCKER_CONFIG", empty.path())
            .env_remove("REGISTRY_AUTH_FILE")
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!(
                "create namespace acme (or repository acme/team/app) on {} first",
                front.host()
            )),
            "{status} {code}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_artifact_type_the_target_refuses_is_named_with_what_to_allow() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&src);
    let config = p.blob("art/sbom", b"{}").await;
    let layer = p.blob("art/sbom", b"{\"spdxVersion\":\"SPDX-2.3\"}").await;
    let bytes = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::support::image::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.sbom.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/spdx+json", "digest": layer, "size": 26}],
    }))
    .unwrap();
    let digest = p
        .manifest(
            "art/sbom",
            "v1",
            crate::support::image::OCI_MANIFEST,
            &bytes,
        )
        .await;
    // Quay without the artifact type allow-listed: 400 MANIFEST_INVALID.
    let front = Front::start(&dst.host(), |r| {
        if r.method == Method::PUT && r.path.contains("/manifests/") {
            Action::Answer(400, "MANIFEST_INVALID")
        } else {
            Action::Pass
        }
    })
    .await;
    let err = copy_via(
        &format!("{}/art/sbom@{digest}", src.host()),
        &format!("{}/art/sbom:v1", front.host()),
        false,
    )
    .await
    .expect_err("the target refuses the artifact");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "{} refused artifact {digest} of type application/vnd.example.sbom.config.v1+json",
            front.host()
        )) && msg.contains("ALLOWED_OCI_ARTIFACT_TYPES"),
        "{msg}"
    );
    assert!(!err.is_transient());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mount_answered_401_falls_back_to_an_upload() {
    let reg = Registry::anonymous().await;
    let img = Pusher::new(&reg)
        .image("mnt/a", 64, &[5000], false, Style::Compact)
        .await;
    // Harbor answers a cross-repository mount with 401 instead of 202.
    let front = Front::start(&reg.host(), |r| {
        if r.method == Method::POST && r.path.contains("mount=") {
            Action::Answer(401, "UNAUTHORIZED")
        } else {
            Action::Pass
        }
    })
    .await;
    let r = copy_via(
        &format!("{}/mnt/a@{}", front.host(), img.digest),
        &format!("{}/mnt/b:v1", front.host()),
        false,
    )
    .await
    .expect("uploaded instead");
    assert_eq!(r.target_digest.to_string(), img.digest);
    assert_eq!((r.blobs_mounted, r.blobs_uploaded), (0, 2), "{r:?}");
    let log = front.log();
    assert!(
        log.iter()
            .any(|l| l.method == Method::POST && l.status == 401),
        "a mount was tried: {log:?}"
    );
}
