//! The network policy of the service's client: private addresses are refused unless trusted — for
//! IP literals, names that resolve to them, redirect hops and token realms — layer `urls` are never
//! fetched, and `Authorization` never follows a redirect to another host.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mirror_mirror::reference::ImageRef;
use mirror_mirror::registry::credentials::{Credential, CredentialStore};
use mirror_mirror::registry::guard::NetworkPolicy;
use mirror_mirror::registry::retry::RetryPolicy;
use mirror_mirror::registry::{
    Client, ClientConfig, CopyOptions, CopyResult, Error, Progress, copy,
};

use crate::support::{Registry, sha256};

/// Counts hits, and how many carried `Authorization`; serves blobs at `/<digest>`.
#[derive(Clone, Default)]
struct Sink {
    hits: Arc<AtomicUsize>,
    with_auth: Arc<AtomicUsize>,
    blobs: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

async fn sink(ip: &str) -> (String, Sink) {
    let s = Sink::default();
    let app = Router::new()
        .route(
            "/{*p}",
            axum::routing::any(
                |State(s): State<Sink>, Path(p): Path<String>, h: HeaderMap| async move {
                    s.hits.fetch_add(1, Ordering::SeqCst);
                    if h.contains_key(header::AUTHORIZATION) {
                        s.with_auth.fetch_add(1, Ordering::SeqCst);
                    }
                    match s.blobs.lock().unwrap().get(&p) {
                        Some(b) => (StatusCode::OK, b.clone()).into_response(),
                        None => StatusCode::NOT_FOUND.into_response(),
                    }
                },
            ),
        )
        .with_state(s.clone());
    (crate::support::serve(app, ip).await, s)
}

/// An upstream registry serving one image (manifest tagged `v1`), with optional behaviours.
#[derive(Clone, Default)]
struct Upstream {
    manifests: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    blobs: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    /// Require `Authorization: Basic` (challenge otherwise).
    basic: bool,
    /// Answer every request with a bearer challenge naming this realm.
    realm: Option<String>,
    /// Redirect blob GETs to `http://<this>/<digest>`.
    redirect_blobs_to: Option<String>,
}

async fn upstream_handler(
    State(u): State<Upstream>,
    method: Method,
    Path(rest): Path<String>,
    h: HeaderMap,
) -> Response {
    if let Some(realm) = &u.realm {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                format!("Bearer realm=\"{realm}\",service=\"s\""),
            )],
        )
            .into_response();
    }
    if u.basic && !h.contains_key(header::AUTHORIZATION) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"r\"".to_string())],
        )
            .into_response();
    }
    if let Some((_, r)) = rest.rsplit_once("/manifests/") {
        let Some(b) = u.manifests.lock().unwrap().get(r).cloned() else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let headers = [
            (
                header::CONTENT_TYPE,
                "application/vnd.oci.image.manifest.v1+json".to_string(),
            ),
            (
                header::HeaderName::from_static("docker-content-digest"),
                sha256(&b),
            ),
        ];
        return if method == Method::HEAD {
            (headers, ()).into_response()
        } else {
            (headers, b).into_response()
        };
    }
    if let Some((_, d)) = rest.rsplit_once("/blobs/") {
        if let Some(to) = &u.redirect_blobs_to {
            return (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, format!("http://{to}/{d}"))],
            )
                .into_response();
        }
        return match u.blobs.lock().unwrap().get(d) {
            Some(b) => (StatusCode::OK, b.clone()).into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        };
    }
    StatusCode::NOT_FOUND.into_response()
}

impl Upstream {
    /// Stores a small image (config + one layer, plus `extra` layer descriptors) tagged `v1`.
    fn with_image(self, extra_layers: &str) -> (Self, Vec<(String, Vec<u8>)>) {
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let layer = b"layer bytes for the ssrf tests".to_vec();
        let (c, l) = (sha256(&config), sha256(&layer));
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{l}","size":{}}}{extra_layers}]}}"#,
            config.len(),
            layer.len()
        );
        let d = sha256(m.as_bytes());
        self.manifests
            .lock()
            .unwrap()
            .insert("v1".into(), m.clone().into_bytes());
        self.manifests.lock().unwrap().insert(d, m.into_bytes());
        let blobs = vec![(c, config), (l, layer)];
        for (d, b) in &blobs {
            self.blobs.lock().unwrap().insert(d.clone(), b.clone());
        }
        (self, blobs)
    }

    async fn start(self, ip: &str) -> String {
        let app = Router::new()
            .route("/v2/", axum::routing::get(|| async { "{}" }))
            .route("/v2/{*rest}", axum::routing::any(upstream_handler))
            .with_state(self);
        crate::support::serve(app, ip).await
    }
}

fn client(trusted: &[&str], creds: CredentialStore) -> Client {
    let config = ClientConfig {
        network: NetworkPolicy::public_only(trusted.iter().map(|s| s.to_string())),
        retry: RetryPolicy {
            max_attempts: 3,
            base: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            max_retry_after: Duration::from_secs(1),
        },
        ..ClientConfig::default()
    };
    Client::new(config, creds).unwrap()
}

async fn go(client: &Client, src: &str, dst: &str) -> Result<CopyResult, Error> {
    let (s, d) = (
        ImageRef::parse_source(src).unwrap(),
        ImageRef::parse(dst).unwrap(),
    );
    copy(
        client,
        &s,
        &d,
        &CopyOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn private_ip_literals_and_names_resolving_to_them_are_refused() {
    let (addr, hits) = sink("127.0.0.1").await;
    let port = addr.rsplit(':').next().unwrap();
    let down = Registry::anonymous().await;
    let c = client(&["127.0.0.2"], CredentialStore::empty());
    let started = Instant::now();
    for src in [
        format!("127.0.0.1:{port}/x:v1"),
        format!("localhost:{port}/x:v1"),
        format!("[::ffff:127.0.0.1]:{port}/x:v1"),
    ] {
        let e = go(&c, &src, &format!("{}/m/x:v1", down.host()))
            .await
            .expect_err(&src);
        assert!(e.to_string().contains("not a public address"), "{src}: {e}");
        assert!(!e.is_transient(), "{src}: a refusal is final");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refusals are not retried"
    );
    assert_eq!(
        hits.hits.load(Ordering::SeqCst),
        0,
        "no request reached the private address"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_and_token_realms_to_private_addresses_are_refused() {
    let (inside, hits) = sink("127.0.0.2").await;
    let down = Registry::anonymous().await;
    // A trusted upstream redirecting blobs to an untrusted private address.
    let (up, _) = Upstream {
        redirect_blobs_to: Some(inside.clone()),
        ..Upstream::default()
    }
    .with_image("");
    let up = up.start("127.0.0.1").await;
    let c = client(&["127.0.0.1"], CredentialStore::empty());
    let e = go(
        &c,
        &format!("{up}/x:v1"),
        &format!("{}/m/x:v1", down.host()),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("not a public address"), "{e}");
    assert!(!e.is_transient());
    // A trusted upstream whose token realm is an untrusted private address.
    let realm = Upstream {
        realm: Some(format!("http://{inside}/token")),
        ..Upstream::default()
    };
    let up = realm.start("127.0.0.1").await;
    let e = go(
        &c,
        &format!("{up}/x:v1"),
        &format!("{}/m/x:v1", down.host()),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("not a public address"), "{e}");
    assert_eq!(
        hits.hits.load(Ordering::SeqCst),
        0,
        "the private address saw no request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_redirects_to_object_storage_work_without_authorization() {
    let (store, s) = sink("127.0.0.2").await;
    let (up, blobs) = Upstream {
        basic: true,
        redirect_blobs_to: Some(store.clone()),
        ..Upstream::default()
    }
    .with_image("");
    for (d, b) in &blobs {
        s.blobs.lock().unwrap().insert(d.clone(), b.clone());
    }
    let up = up.start("127.0.0.1").await;
    let down = Registry::anonymous().await;
    let mut creds = CredentialStore::empty();
    creds.insert(
        &up,
        Credential::Basic {
            username: "u".into(),
            password: "p".into(),
        },
    );
    // Both hosts are trusted (an operator's object storage); the credential must stay with the registry.
    let c = client(&["127.0.0.1", "127.0.0.2"], creds);
    let r = go(
        &c,
        &format!("{up}/x:v1"),
        &format!("{}/m/x:v1", down.host()),
    )
    .await
    .expect("copy through the redirect");
    assert_eq!(r.blobs_uploaded, 2);
    assert_eq!(
        s.hits.load(Ordering::SeqCst),
        2,
        "both blobs came from object storage"
    );
    assert_eq!(
        s.with_auth.load(Ordering::SeqCst),
        0,
        "Authorization was never sent to another host"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_layer_urls_are_never_fetched() {
    let (elsewhere, hits) = sink("127.0.0.1").await;
    let foreign = format!(
        r#",{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"sha256:{}","size":5,"urls":["http://{elsewhere}/layer"]}}"#,
        "a".repeat(64)
    );
    let (up, _) = Upstream::default().with_image(&foreign);
    let up = up.start("127.0.0.1").await;
    let down = Registry::anonymous().await;
    let c = client(&["127.0.0.1"], CredentialStore::empty());
    let r = go(
        &c,
        &format!("{up}/x:v1"),
        &format!("{}/m/x:v1", down.host()),
    )
    .await;
    match &r {
        Ok(res) => assert_eq!(res.blobs_foreign, 1),
        Err(e) => assert!(
            e.to_string().contains("non-distributable"),
            "a refusal names the foreign layer: {e}"
        ),
    }
    assert_eq!(
        hits.hits.load(Ordering::SeqCst),
        0,
        "the layer's urls were not fetched"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_to_a_name_resolving_to_a_private_address_is_refused_through_a_proxy() {
    // The redirect hop is followed inside the HTTP client, so only the proxy relay sees it: it
    // resolves `localhost` itself and refuses, before the real proxy (tinyproxy) could.
    let proxy = crate::support::proxy::Proxy::start().await;
    let (inside, hits) = sink("127.0.0.1").await;
    let port = inside.rsplit(':').next().unwrap();
    let down = Registry::anonymous().await;
    let (up, _) = Upstream {
        redirect_blobs_to: Some(format!("localhost:{port}")),
        ..Upstream::default()
    }
    .with_image("");
    let up = up.start("127.0.0.1").await;
    let proxied = |policy: NetworkPolicy| {
        let config = ClientConfig {
            network: policy.with_proxy(mirror_mirror::registry::proxy::ProxyConfig {
                http: Some(proxy.url()),
                ..Default::default()
            }),
            retry: RetryPolicy {
                max_attempts: 2,
                base: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
                max_retry_after: Duration::from_secs(1),
            },
            ..ClientConfig::default()
        };
        Client::new(config, CredentialStore::empty()).unwrap()
    };
    let c = proxied(NetworkPolicy::public_only(["127.0.0.1".to_string()]));
    let e = go(
        &c,
        &format!("{up}/x:v1"),
        &format!("{}/m/x:v1", down.host()),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("localhost") && e.to_string().contains("not a public address"),
        "{e}"
    );
    assert!(!e.is_transient(), "{e}");
    assert_eq!(
        hits.hits.load(Ordering::SeqCst),
        0,
        "the sink was not reached"
    );
    let reqs = proxy.requests();
    assert!(reqs.iter().any(|r| r.contains(&up)), "{reqs:?}");
    assert!(!reqs.iter().any(|r| r.contains("localhost")), "{reqs:?}");

    // The same client without the policy: the proxy resolves the name and reaches the sink.
    let c = proxied(NetworkPolicy::permissive());
    let _ = go(
        &c,
        &format!("{up}/x:v1"),
        &format!("{}/m/x:v1", down.host()),
    )
    .await;
    assert!(
        hits.hits.load(Ordering::SeqCst) > 0,
        "{:?}",
        proxy.requests()
    );
}
