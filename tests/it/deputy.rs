//! The confused deputy on the target's registry: the service holds push credentials for its
//! target, and the target's registry is often a source too. A request for a private repository
//! there must not be read with those credentials (it would be published under the mirror) unless
//! the operator names it in `MIRROR_TRUSTED_SOURCE_CREDENTIALS`. Real registries with htpasswd and
//! token auth, through the service.

use std::time::Duration;

use serde_json::json;

use crate::support::image::{Style, TestImage};
use crate::support::service::Service;
use crate::support::{Pusher, Registry, TokenIssuer, write_docker_config};

async fn private_image(reg: &Registry) -> TestImage {
    let p = Pusher::new(reg);
    let img = p
        .image("acme/private", 11, &[20_000], false, Style::Compact)
        .await;
    p.manifest("acme/private", "v1", &img.media_type, &img.bytes)
        .await;
    img
}

/// Mirrors `host/acme/private:v1` through a service whose target is on the same registry;
/// returns the finished job.
async fn mirror_private(reg: &Registry, trusted: Option<&str>) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let (user, pass) = reg.creds().unwrap();
    write_docker_config(dir.path(), &[(&reg.host(), &user, &pass)]);
    let db = dir.path().join("mirror.db");
    let mut env = vec![];
    if let Some(t) = trusted {
        env.push(("MIRROR_TRUSTED_SOURCE_CREDENTIALS", t));
    }
    let svc = Service::start(&db, &format!("{}/mirror", reg.host()), &reg.host(), &env).await;
    let (status, job) = svc
        .mirror(&json!({ "image": format!("{}/acme/private:v1", reg.host()) }))
        .await;
    assert_eq!(status, 202, "{job}");
    svc.wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await
}

async fn check(reg: &Registry) {
    let img = private_image(reg).await;
    let mirror_repo = format!("mirror/{}/acme/private", reg.host().replace(':', "_"));

    // Not trusted: read as a stranger would, so the private repository is refused, and nothing
    // reaches the mirror.
    let job = mirror_private(reg, None).await;
    assert_eq!(job["state"], "failed", "{job}");
    let err = job["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("MIRROR_TRUSTED_SOURCE_CREDENTIALS") && err.contains("acme/private"),
        "the error says why and what to do: {err}"
    );
    assert_eq!(job["attempts"], 1, "a refusal is not retried: {job}");
    assert!(
        Pusher::new(reg)
            .get_manifest(&mirror_repo, "v1")
            .await
            .is_none(),
        "the private image was not published under the mirror"
    );

    // Named trusted by the operator: the target's credentials read it.
    let trusted = format!("{}/acme/private", reg.host());
    let job = mirror_private(reg, Some(&trusted)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["mirror_digest"], img.digest.as_str(), "{job}");
    let (bytes, _, _) = Pusher::new(reg)
        .get_manifest(&mirror_repo, "v1")
        .await
        .expect("mirrored");
    assert_eq!(bytes, img.bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_target_credentials_do_not_read_private_sources() {
    check(&Registry::basic("pusher", "push-secret").await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_target_credentials_do_not_read_private_sources() {
    let issuer = TokenIssuer::start("pusher", "push-secret").await;
    check(&Registry::token(&issuer).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_entry_elsewhere_stops_start_up_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(crate::support::bin())
        .arg("serve")
        .env("MIRROR_DATABASE", dir.path().join("m.db"))
        .env("MIRROR_TARGET", "127.0.0.1:5999/mirror")
        .env("MIRROR_API_TOKENS", "ci=0123456789abcdef0123")
        .env("MIRROR_TRUSTED_SOURCE_CREDENTIALS", "gcr.io/x")
        .env("MIRROR_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MIRROR_TRUSTED_SOURCE_CREDENTIALS entry \"gcr.io/x\" is on gcr.io, not on the target's registry"),
        "{stderr}"
    );
}
