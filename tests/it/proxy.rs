//! Proxies: `copy`, `serve` and the notices go through `HTTP_PROXY` / `HTTPS_PROXY` (either case)
//! and respect `NO_PROXY`, checked against a real tinyproxy's request log; and in `serve` the
//! network policy still holds through the proxy: a name that resolves to a private address is
//! refused before the proxy could resolve and reach it.

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::image::{Style, TestImage};
use crate::support::proxy::Proxy;
use crate::support::service::Service;
use crate::support::tls::Pki;
use crate::support::{Pusher, Registry, TokenIssuer, bin, write_docker_config};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let empty = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env("DOCKER_CONFIG", empty.path())
        .env_remove("REGISTRY_AUTH_FILE")
        .env("MIRROR_LOG", "info");
    for v in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running mirror-mirror")
}

#[track_caller]
fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "copy failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn image(reg: &Registry, repo: &str, seed: u64) -> TestImage {
    let p = Pusher::new(reg);
    let img = p.image(repo, seed, &[30_000], false, Style::Compact).await;
    p.manifest(repo, "v1", &img.media_type, &img.bytes).await;
    img
}

fn through(proxy: &Proxy, host: &str) -> usize {
    proxy.requests().iter().filter(|r| r.contains(host)).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_goes_through_the_proxy_in_either_case_and_respects_no_proxy() {
    let proxy = Proxy::start().await;
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    image(&src, "acme/app", 1).await;
    let from = format!("{}/acme/app:v1", src.host());

    ok(&run(
        &["copy", &from, &format!("{}/upper/app", dst.host())],
        &[("HTTP_PROXY", &proxy.url())],
    ));
    let (s1, d1) = (through(&proxy, &src.host()), through(&proxy, &dst.host()));
    println!("through tinyproxy: {s1} requests to the source, {d1} to the target");
    assert!(s1 > 0 && d1 > 0, "{:?}", proxy.requests());

    ok(&run(
        &["copy", &from, &format!("{}/lower/app", dst.host())],
        &[("http_proxy", &proxy.url())],
    ));
    let (s2, d2) = (through(&proxy, &src.host()), through(&proxy, &dst.host()));
    assert!(
        s2 > s1 && d2 > d1,
        "lower-case http_proxy: {:?}",
        proxy.requests()
    );

    ok(&run(
        &["copy", &from, &format!("{}/direct/app", dst.host())],
        &[("HTTP_PROXY", &proxy.url()), ("NO_PROXY", "127.0.0.1")],
    ));
    assert_eq!(
        (through(&proxy, &src.host()), through(&proxy, &dst.host())),
        (s2, d2),
        "NO_PROXY: nothing more through the proxy"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn https_registries_are_reached_through_a_connect_tunnel() {
    let proxy = Proxy::start().await;
    let pki = Pki::new();
    let src = Registry::tls(&pki, false).await;
    let dst = Registry::anonymous().await;
    image(&src, "acme/app", 2).await;
    let certs = tempfile::tempdir().unwrap();
    pki.certs_d(certs.path(), &src.host(), false);
    ok(&run(
        &[
            "copy",
            &format!("{}/acme/app:v1", src.host()),
            &format!("{}/mirror/app", dst.host()),
        ],
        &[
            ("HTTPS_PROXY", &proxy.url()),
            (
                "MIRROR_SYSTEM_CERTS_DIRS",
                &certs.path().display().to_string(),
            ),
        ],
    ));
    let reqs = proxy.requests();
    assert!(
        reqs.iter()
            .any(|r| r.starts_with(&format!("CONNECT {}", src.host()))),
        "{reqs:?}"
    );
    assert_eq!(
        through(&proxy, &dst.host()),
        0,
        "plain HTTP has no HTTP_PROXY here: {reqs:?}"
    );
}

/// Counts notices.
async fn receiver() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/notices",
        axum::routing::post(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                "ok"
            }
        }),
    );
    (crate::support::serve(app, "127.0.0.1").await, hits)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_and_its_notices_go_through_the_proxy_and_a_name_resolving_to_a_private_address_is_still_refused()
 {
    let proxy = Proxy::start().await;
    let dst = Registry::anonymous().await;
    let open = Registry::anonymous().await;
    image(&open, "acme/app", 3).await;
    // A registry whose token realm is a name (localhost) that resolves to a private address. The
    // registry itself is allow-listed (trusted); the realm's host is not.
    let issuer = TokenIssuer::start("u", "p").await;
    let issuer_port = issuer.url().rsplit(':').next().unwrap().to_string();
    issuer.set_realm(&format!("http://localhost:{issuer_port}/token"));
    let hostile = Registry::token(&issuer).await;
    image(&hostile, "acme/app", 4).await;
    let (notify, notices) = receiver().await;

    let dir = tempfile::tempdir().unwrap();
    write_docker_config(dir.path(), &[(&hostile.host(), "u", "p")]);
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", dst.host()),
        &format!("{},{}", open.host(), hostile.host()),
        &[
            ("HTTP_PROXY", &proxy.url()),
            ("MIRROR_NOTIFY_URL", &format!("http://{notify}/notices")),
            ("MIRROR_NOTIFY_SECRET", "notice-secret"),
        ],
    )
    .await;

    // Through the proxy: registries the operator named, and the notice.
    let (_, job) = svc
        .mirror(&json!({ "image": format!("{}/acme/app:v1", open.host()) }))
        .await;
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(through(&proxy, &open.host()) > 0, "{:?}", proxy.requests());
    assert!(through(&proxy, &dst.host()) > 0, "{:?}", proxy.requests());
    let deadline = Instant::now() + Duration::from_secs(20);
    while notices.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no notice arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        through(&proxy, &notify) > 0,
        "the notice went through the proxy: {:?}",
        proxy.requests()
    );

    // The realm's name is resolved and refused by the service, not by the proxy.
    let (_, job) = svc
        .mirror(&json!({ "image": format!("{}/acme/app:v1", hostile.host()) }))
        .await;
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "failed", "{job}");
    let err = job["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("localhost") && err.contains("not a public address"),
        "{err}"
    );
    assert!(
        through(&proxy, &hostile.host()) > 0,
        "the registry itself was asked through the proxy: {:?}",
        proxy.requests()
    );
    assert_eq!(through(&proxy, "localhost"), 0, "{:?}", proxy.requests());
    assert_eq!(
        issuer.requests(),
        0,
        "no token request reached the private address"
    );

    // Without the policy (copy: its user names the registries), the same proxy resolves the
    // name and reaches the issuer: the refusal above is the service's, not the proxy's.
    let cfg = tempfile::tempdir().unwrap();
    write_docker_config(cfg.path(), &[(&hostile.host(), "u", "p")]);
    let out = run(
        &[
            "copy",
            &format!("{}/acme/app:v1", hostile.host()),
            &format!("{}/copied/app", dst.host()),
        ],
        &[
            ("HTTP_PROXY", &proxy.url()),
            ("DOCKER_CONFIG", &cfg.path().display().to_string()),
        ],
    );
    ok(&out);
    assert!(through(&proxy, "localhost") > 0, "{:?}", proxy.requests());
    assert!(issuer.requests() > 0);
}
