//! Faults from an in-process misbehaving registry (429 with Retry-After, 503, a body cut halfway, a
//! corrupted blob, a missing `Location`, a spent pull allowance), with a real registry on the other side.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use mirror_mirror::reference::ImageRef;
use mirror_mirror::registry::credentials::CredentialStore;
use mirror_mirror::registry::retry::RetryPolicy;
use mirror_mirror::registry::{Client, ClientConfig, CopyOptions, Error, Progress, copy};
use sha2::{Digest as _, Sha256};

use crate::support::{Pusher, Registry, TokenIssuer, bin, sha256};

/// What the misbehaving registry does to one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status (and `Retry-After`, if given) instead.
    Status(u16, Option<&'static str>),
    /// Send the first half of the body, then cut the connection.
    Cut,
    /// Serve the body with one byte flipped (same size).
    Corrupt,
    /// Send the first half of the body, then hold the rest until [`Stall::release`] (a HEAD:
    /// hold the whole answer).
    Stall(Arc<Stall>),
}

/// A body held halfway: when the client read that far, whether it hung up, and the release.
#[derive(Debug, Default)]
pub struct Stall {
    reached: std::sync::atomic::AtomicBool,
    dropped: std::sync::atomic::AtomicBool,
    go: tokio::sync::Notify,
}

impl Stall {
    /// Whether the client has read the first half and waits for the rest.
    pub fn reached(&self) -> bool {
        self.reached.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Whether the client hung up (the body was dropped before its end).
    pub fn dropped(&self) -> bool {
        self.dropped.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Sends the rest of the body.
    pub fn release(&self) {
        self.go.notify_one();
    }
}

/// Marks the stall dropped unless the body was sent to its end.
struct StallGuard(Arc<Stall>, bool);

impl Drop for StallGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0
                .dropped
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Manifest,
    Blob,
    Upload,
}

#[derive(Default)]
struct Inner {
    manifests: HashMap<String, (String, Bytes)>,
    blobs: HashMap<String, Bytes>,
    faults: HashMap<Route, VecDeque<Fault>>,
    /// Faults applied to every request of a route, after the queued ones.
    always: HashMap<Route, Fault>,
    /// A pull allowance on manifest GETs, as Docker Hub's.
    allowance: Option<Allowance>,
}

/// Manifest GETs allowed per window (which starts at the first manifest request after the last
/// one ended), told in `RateLimit-*` headers on every manifest answer; a GET beyond it gets a 429.
struct Allowance {
    per_window: u64,
    window: Duration,
    started: Option<Instant>,
    used: u64,
}

/// One request the faulty registry answered: when it arrived, what, and the status it got.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub method: Method,
    pub path: String,
    pub status: u16,
}

/// An in-process registry that serves one image and misbehaves on cue.
#[derive(Clone, Default)]
pub struct Faulty {
    inner: Arc<Mutex<Inner>>,
    pub requests: Arc<Mutex<HashMap<Route, usize>>>,
    /// Every request under `/v2/<name>/`, in arrival order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Faulty {
    /// Adds a blob; returns its digest.
    pub fn blob(&self, bytes: &[u8]) -> String {
        let d = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        self.inner
            .lock()
            .unwrap()
            .blobs
            .insert(d.clone(), Bytes::copy_from_slice(bytes));
        d
    }

    /// Adds a manifest under its digest and `tag`; returns its digest.
    pub fn manifest(&self, tag: &str, media_type: &str, bytes: &[u8]) -> String {
        let d = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let v = (media_type.to_string(), Bytes::copy_from_slice(bytes));
        let mut inner = self.inner.lock().unwrap();
        inner.manifests.insert(d.clone(), v.clone());
        inner.manifests.insert(tag.to_string(), v);
        d
    }

    /// Queues faults for the next requests of `route`.
    pub fn then(&self, route: Route, faults: &[Fault]) {
        self.inner
            .lock()
            .unwrap()
            .faults
            .entry(route)
            .or_default()
            .extend(faults.iter().cloned());
    }

    /// Applies `fault` to every request of `route`.
    pub fn always(&self, route: Route, fault: Fault) {
        self.inner.lock().unwrap().always.insert(route, fault);
    }

    /// Allows `per_window` manifest GETs per `window` (see [`Allowance`]).
    pub fn allowance(&self, per_window: u64, window: Duration) {
        self.inner.lock().unwrap().allowance = Some(Allowance {
            per_window,
            window,
            started: None,
            used: 0,
        });
    }

    /// Charges a manifest request to the allowance: whether it may be served, and the headers.
    fn charge(&self, method: &Method, rest: &str) -> (bool, Option<HeaderMap>) {
        let mut inner = self.inner.lock().unwrap();
        let Some(a) = inner
            .allowance
            .as_mut()
            .filter(|_| rest.contains("/manifests/"))
        else {
            return (true, None);
        };
        let now = Instant::now();
        if a.started.is_none_or(|s| now >= s + a.window) {
            a.started = Some(now);
            a.used = 0;
        }
        let allowed = *method != Method::GET || a.used < a.per_window;
        if *method == Method::GET && allowed {
            a.used += 1;
        }
        let w = a.window.as_secs();
        let mut h = HeaderMap::new();
        h.insert(
            "ratelimit-limit",
            format!("{};w={w}", a.per_window).parse().unwrap(),
        );
        h.insert(
            "ratelimit-remaining",
            format!("{};w={w}", a.per_window - a.used).parse().unwrap(),
        );
        (allowed, Some(h))
    }

    /// What the registry answered so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self, route: Route) -> usize {
        *self.requests.lock().unwrap().get(&route).unwrap_or(&0)
    }

    fn next_fault(&self, route: Route) -> Option<Fault> {
        *self.requests.lock().unwrap().entry(route).or_default() += 1;
        let mut inner = self.inner.lock().unwrap();
        let queued = inner.faults.get_mut(&route).and_then(|q| q.pop_front());
        queued.or_else(|| inner.always.get(&route).cloned())
    }

    /// Starts serving on a free loopback port; returns `127.0.0.1:PORT`.
    pub async fn start(&self) -> String {
        let app = Router::new()
            .route("/v2/", axum::routing::get(|| async { "{}" }))
            .route("/v2/{*rest}", axum::routing::any(handle))
            .with_state(self.clone());
        crate::support::serve(app, "127.0.0.1").await
    }
}

fn status(code: u16, retry_after: Option<&str>) -> Response {
    let mut r = (
        StatusCode::from_u16(code).unwrap(),
        r#"{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}"#,
    )
        .into_response();
    if let Some(v) = retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, v.parse().unwrap());
    }
    r
}

async fn handle(State(f): State<Faulty>, method: Method, Path(rest): Path<String>) -> Response {
    let at = Instant::now();
    let (allowed, quota) = f.charge(&method, &rest);
    let mut resp = if allowed {
        respond(&f, &method, &rest).await
    } else {
        status(429, None)
    };
    resp.headers_mut().extend(quota.unwrap_or_default());
    f.seen.lock().unwrap().push(Seen {
        at,
        method,
        path: rest,
        status: resp.status().as_u16(),
    });
    resp
}

async fn respond(f: &Faulty, method: &Method, rest: &str) -> Response {
    let (route, key) = if let Some((_, r)) = rest.rsplit_once("/manifests/") {
        (Route::Manifest, r.to_string())
    } else if rest.ends_with("/blobs/uploads/") || rest.contains("/blobs/uploads/") {
        (Route::Upload, String::new())
    } else if let Some((_, d)) = rest.rsplit_once("/blobs/") {
        (Route::Blob, d.to_string())
    } else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let fault = f.next_fault(route);
    // A HEAD has no body to hold: it is held whole (a registry that stops answering).
    if let Some(Fault::Stall(stall)) = &fault
        && *method == Method::HEAD
    {
        let mut guard = StallGuard(stall.clone(), false);
        stall
            .reached
            .store(true, std::sync::atomic::Ordering::SeqCst);
        stall.go.notified().await;
        guard.1 = true;
    }
    if let Some(Fault::Status(code, ra)) = &fault {
        return status(*code, *ra);
    }
    let (media_type, bytes) = {
        let inner = f.inner.lock().unwrap();
        match route {
            Route::Upload => {
                // A registry that forgets the Location of the upload session.
                return StatusCode::ACCEPTED.into_response();
            }
            Route::Manifest => match inner.manifests.get(&key) {
                Some((mt, b)) => (mt.clone(), b.clone()),
                None => {
                    return (
                        StatusCode::NOT_FOUND,
                        r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#,
                    )
                        .into_response();
                }
            },
            Route::Blob => match inner.blobs.get(&key) {
                Some(b) => ("application/octet-stream".to_string(), b.clone()),
                None => {
                    return (
                        StatusCode::NOT_FOUND,
                        r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#,
                    )
                        .into_response();
                }
            },
        }
    };
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, media_type.parse().unwrap());
    headers.insert("docker-content-digest", digest.parse().unwrap());
    headers.insert(header::CONTENT_LENGTH, bytes.len().into());
    if method == Method::HEAD {
        return (StatusCode::OK, headers, Body::empty()).into_response();
    }
    let body = match fault {
        Some(Fault::Corrupt) => {
            let mut v = bytes.to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 0xff;
            Body::from(v)
        }
        Some(Fault::Cut) => {
            let half = bytes.slice(..bytes.len() / 2);
            let stream = futures_util::stream::iter(vec![
                Ok::<Bytes, std::io::Error>(half),
                Err(std::io::Error::other("cut")),
            ]);
            Body::from_stream(stream)
        }
        Some(Fault::Stall(stall)) => {
            let (half, rest) = (
                bytes.slice(..bytes.len() / 2),
                bytes.slice(bytes.len() / 2..),
            );
            let guard = StallGuard(stall, false);
            let stream = futures_util::stream::unfold((0u8, guard), move |(step, mut g)| {
                let (half, rest) = (half.clone(), rest.clone());
                async move {
                    match step {
                        0 => Some((Ok::<Bytes, std::io::Error>(half), (1, g))),
                        1 => {
                            g.0.reached.store(true, std::sync::atomic::Ordering::SeqCst);
                            g.0.go.notified().await;
                            g.1 = true;
                            Some((Ok(rest), (2, g)))
                        }
                        _ => None,
                    }
                }
            });
            Body::from_stream(stream)
        }
        _ => Body::from(bytes),
    };
    (StatusCode::OK, headers, body).into_response()
}

/// A small image on the faulty registry: one config, two layers (one of 1 MiB), a manifest tagged `v1`.
pub(crate) fn seed(f: &Faulty) -> (String, Vec<String>) {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let big: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let small = b"small layer".to_vec();
    let c = f.blob(config);
    let l1 = f.blob(&big);
    let l2 = f.blob(&small);
    let manifest = format!(
        "{{\r\n  \"schemaVersion\": 2,\r\n  \"mediaType\": \"application/vnd.oci.image.manifest.v1+json\",\r\n  \"config\": {{\"mediaType\": \"application/vnd.oci.image.config.v1+json\", \"digest\": \"{c}\", \"size\": {}}},\r\n  \"layers\": [{{\"mediaType\": \"application/vnd.oci.image.layer.v1.tar\", \"digest\": \"{l1}\", \"size\": {}}}, {{\"mediaType\": \"application/vnd.oci.image.layer.v1.tar\", \"digest\": \"{l2}\", \"size\": {}}}]\r\n}}",
        config.len(),
        big.len(),
        small.len()
    );
    let d = f.manifest(
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        manifest.as_bytes(),
    );
    (d, vec![c, l1, l2])
}

fn fast_client() -> Client {
    Client::new(
        ClientConfig {
            retry: RetryPolicy {
                max_attempts: 4,
                base: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
                max_retry_after: Duration::from_secs(5),
            },
            ..ClientConfig::default()
        },
        CredentialStore::empty(),
    )
    .unwrap()
}

async fn run_copy(src: &str, dst: &str) -> Result<mirror_mirror::registry::CopyResult, Error> {
    let source = ImageRef::parse_source(src).unwrap();
    let target = ImageRef::parse(dst).unwrap();
    copy(
        &fast_client(),
        &source,
        &target,
        &CopyOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_and_unavailability_are_retried_honouring_retry_after() {
    let f = Faulty::default();
    let (digest, _) = seed(&f);
    let up = f.start().await;
    let down = Registry::anonymous().await;
    f.then(
        Route::Manifest,
        &[Fault::Status(429, Some("1")), Fault::Status(503, None)],
    );
    f.then(
        Route::Blob,
        &[Fault::Status(503, None), Fault::Status(502, None)],
    );
    let started = Instant::now();
    let r = run_copy(
        &format!("{up}/img:v1"),
        &format!("{}/m/img:v1", down.host()),
    )
    .await
    .expect("the copy survives 429 and 503");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
    assert_eq!(r.target_digest.to_string(), digest);
    let (bytes, _, _) = Pusher::new(&down)
        .get_manifest("m/img", "v1")
        .await
        .unwrap();
    assert_eq!(sha256(&bytes), digest);
    assert!(
        f.count(Route::Manifest) >= 4,
        "HEAD retried twice, then GET"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_cut_halfway_is_fetched_again() {
    let f = Faulty::default();
    let (digest, blobs) = seed(&f);
    let up = f.start().await;
    let down = Registry::anonymous().await;
    f.then(Route::Blob, &[Fault::Cut, Fault::Cut]);
    let r = run_copy(
        &format!("{up}/img:v1"),
        &format!("{}/m/img:v1", down.host()),
    )
    .await
    .expect("the copy survives cut connections");
    assert_eq!(r.target_digest.to_string(), digest);
    for b in &blobs {
        assert!(
            Pusher::new(&down).blob_exists("m/img", b).await,
            "{b} on the target"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_blob_fails_the_copy_and_writes_no_tag() {
    let f = Faulty::default();
    let (_, blobs) = seed(&f);
    let up = f.start().await;
    let down = Registry::anonymous().await;
    f.always(Route::Blob, Fault::Corrupt);
    let out = tokio::process::Command::new(bin())
        .args([
            "copy",
            &format!("{up}/img:v1"),
            &format!("{}/m/img", down.host()),
            "--retries",
            "2",
        ])
        .env("DOCKER_CONFIG", tempfile::tempdir().unwrap().path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "exit status is non-zero");
    assert!(out.stdout.is_empty(), "no pull line");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error:") && last.contains("digest mismatch"),
        "{err}"
    );
    let p = Pusher::new(&down);
    assert!(
        p.get_manifest("m/img", "v1").await.is_none(),
        "the target has no tag"
    );
    assert!(
        !p.blob_exists("m/img", &blobs[1]).await,
        "the corrupt blob was not committed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_omitting_location_gets_a_clear_error_not_a_panic() {
    let src = Faulty::default();
    seed(&src);
    let up = src.start().await;
    let dst = Faulty::default();
    let down = dst.start().await;
    let e = run_copy(&format!("{up}/img:v1"), &format!("{down}/m/img:v1"))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("without a Location header"), "{msg}");
    assert!(!e.is_transient());
}

#[tokio::test(flavor = "multi_thread")]
async fn schema1_sources_are_refused_with_the_reason() {
    let f = Faulty::default();
    f.manifest(
        "old",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        br#"{"schemaVersion":1,"name":"img","tag":"old","fsLayers":[]}"#,
    );
    let up = f.start().await;
    let down = Registry::anonymous().await;
    let e = run_copy(
        &format!("{up}/img:old"),
        &format!("{}/m/img:old", down.host()),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("schema 1"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_token_server_is_retried() {
    let issuer = TokenIssuer::start("erin", "erin-password-1").await;
    let reg = Registry::token(&issuer).await;
    let img = Pusher::new(&reg)
        .image(
            "tk/a",
            41,
            &[10_000],
            false,
            crate::support::image::Style::Compact,
        )
        .await;
    issuer.fail_next(&[429, 503]);
    let mut creds = CredentialStore::empty();
    creds.insert(
        &reg.host(),
        mirror_mirror::registry::credentials::Credential::Basic {
            username: "erin".into(),
            password: "erin-password-1".into(),
        },
    );
    let client = Client::new(
        ClientConfig {
            retry: fast_client().retry_policy().clone(),
            ..ClientConfig::default()
        },
        creds,
    )
    .unwrap();
    let source = ImageRef::parse(&format!("{}/tk/a@{}", reg.host(), img.digest)).unwrap();
    let target = ImageRef::parse(&format!("{}/tk/b:x", reg.host())).unwrap();
    let r = copy(
        &client,
        &source,
        &target,
        &CopyOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
    .expect("copy after a throttled token server");
    assert_eq!(r.target_digest.to_string(), img.digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_garbage_collected_from_the_target_are_copied_again() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let img = Pusher::new(&up)
        .image(
            "gc/app",
            51,
            &[40_000, 50_000],
            false,
            crate::support::image::Style::CrlfOdd,
        )
        .await;
    Pusher::new(&up)
        .manifest("gc/app", "v1", &img.media_type, &img.bytes)
        .await;
    let src = format!("{}/gc/app:v1", up.host());
    run_copy(&src, &format!("{}/gc/app:v1", down.host()))
        .await
        .unwrap();
    // Garbage collection takes a layer away; the manifest still resolves by digest.
    let lost = &img.blobs[2];
    let target = Pusher::new(&down);
    target.delete_blob("gc/app", lost).await;
    assert!(!target.blob_exists("gc/app", lost).await);
    // Writing the tag now meets MANIFEST_BLOB_UNKNOWN; the copy puts the blob back and retries.
    let r = run_copy(&src, &format!("{}/gc/app:v2", down.host()))
        .await
        .expect("repaired copy");
    assert_eq!(r.target_digest.to_string(), img.digest);
    assert!(
        target.blob_exists("gc/app", lost).await,
        "the lost blob is back"
    );
    let (bytes, _, _) = target.get_manifest("gc/app", "v2").await.unwrap();
    assert_eq!(sha256(&bytes), img.digest);
}

/// An OCI image manifest on `f` naming the seeded blobs, under `tag`.
fn good_image(f: &Faulty, tag: &str) -> (String, usize) {
    let (_, blobs) = seed(f);
    let size = |d: &str| f.inner.lock().unwrap().blobs[d].len();
    let (config_size, layer_size) = (size(&blobs[0]), size(&blobs[2]));
    let body = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{layer_size}}}]}}"#,
        blobs[0], blobs[2],
    );
    (
        f.manifest(
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            body.as_bytes(),
        ),
        body.len(),
    )
}

fn index_of(entries: &[(String, usize, &str)]) -> String {
    let m: Vec<String> = entries
        .iter()
        .map(|(d, size, mt)| format!(r#"{{"mediaType":"{mt}","digest":"{d}","size":{size}}}"#))
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
        m.join(",")
    )
}

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Copies `tag` from the hostile `f` and checks it was refused with `want` before any blob moved.
async fn refused(f: &Faulty, tag: &str, want: &str) {
    let up = f.start().await;
    let down = Registry::anonymous().await;
    let e = run_copy(
        &format!("{up}/img:{tag}"),
        &format!("{}/m/img:{tag}", down.host()),
    )
    .await
    .expect_err("a hostile manifest is refused");
    assert!(e.to_string().contains(want), "{e}");
    assert!(!e.is_transient(), "{e} is not retried");
    assert_eq!(f.count(Route::Blob), 0, "no blob request at all");
    assert!(
        Pusher::new(&down)
            .get_manifest("m/img", tag)
            .await
            .is_none(),
        "nothing tagged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_over_4_mib_is_refused() {
    let f = Faulty::default();
    let pad = " ".repeat(4 * 1024 * 1024);
    f.manifest(
        "big",
        MANIFEST,
        format!(r#"{{"schemaVersion":2,"layers":[]{pad}}}"#).as_bytes(),
    );
    refused(&f, "big", "larger than 4194304 bytes").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_with_ten_thousand_entries_is_refused() {
    let f = Faulty::default();
    let (d, size) = good_image(&f, "one");
    let entries: Vec<(String, usize, &str)> =
        (0..10_000).map(|_| (d.clone(), size, MANIFEST)).collect();
    f.manifest("wide", INDEX, index_of(&entries).as_bytes());
    refused(&f, "wide", "at most 1000").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn indexes_nested_too_deep_are_refused_before_any_blob_moves() {
    let f = Faulty::default();
    let (mut d, mut size) = good_image(&f, "leaf");
    let mut mt = MANIFEST;
    for level in 0..6 {
        let body = index_of(&[(d.clone(), size, mt)]);
        d = f.manifest(&format!("level{level}"), INDEX, body.as_bytes());
        size = body.len();
        mt = INDEX;
    }
    refused(&f, "level5", "nested deeper than").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_whose_content_type_disagrees_is_refused_before_its_siblings_blobs_move() {
    let f = Faulty::default();
    let (good, good_size) = good_image(&f, "good");
    let liar = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}"#;
    let bad = f.manifest(
        "liar",
        "application/vnd.docker.distribution.manifest.v2+json",
        liar,
    );
    let body = index_of(&[(good, good_size, MANIFEST), (bad, liar.len(), MANIFEST)]);
    f.manifest("mixed", INDEX, body.as_bytes());
    refused(&f, "mixed", "served it as").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_digest_algorithms_are_refused() {
    let f = Faulty::default();
    let body = index_of(&[("md5:d41d8cd98f00b204e9800998ecf8427e".into(), 10, MANIFEST)]);
    f.manifest("md5", INDEX, body.as_bytes());
    refused(&f, "md5", "not supported").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_layer_longer_than_its_descriptor_is_cut_off() {
    let f = Faulty::default();
    let (_, blobs) = seed(&f);
    let config_size = f.inner.lock().unwrap().blobs[&blobs[0]].len();
    // The descriptor says the 1 MiB layer has 1000 bytes.
    let body = format!(
        r#"{{"schemaVersion":2,"mediaType":"{MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":1000}}]}}"#,
        blobs[0], config_size, blobs[1]
    );
    f.manifest("long", MANIFEST, body.as_bytes());
    let up = f.start().await;
    let down = Registry::anonymous().await;
    let e = run_copy(
        &format!("{up}/img:long"),
        &format!("{}/m/img:long", down.host()),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("size mismatch"), "{e}");
    assert!(!Pusher::new(&down).blob_exists("m/img", &blobs[1]).await);
    assert!(
        Pusher::new(&down)
            .get_manifest("m/img", "long")
            .await
            .is_none()
    );
}

/// Waits (at most `limit`) until `cond` holds; panics naming `what` otherwise.
pub(crate) async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Copies `src` to `dst` with `client` in a task of its own (a worker).
fn spawn_copy(
    client: &Client,
    src: String,
    dst: String,
) -> tokio::task::JoinHandle<Result<mirror_mirror::registry::CopyResult, Error>> {
    let client = client.clone();
    tokio::spawn(async move {
        copy(
            &client,
            &ImageRef::parse_source(&src).unwrap(),
            &ImageRef::parse(&dst).unwrap(),
            &CopyOptions::default(),
            Arc::new(Progress::default()),
        )
        .await
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_pauses_every_copy_of_that_registry_not_only_the_one_that_got_it() {
    use mirror_mirror::metrics::METRICS;
    let f = Faulty::default();
    let (digest, _) = seed(&f);
    let up = f.start().await;
    let down = Registry::anonymous().await;
    f.then(Route::Manifest, &[Fault::Status(429, Some("2"))]);
    let client = fast_client();
    let waits_before = METRICS.rate_limit_waits.get();
    let first = spawn_copy(
        &client,
        format!("{up}/img:v1"),
        format!("{}/m/img0:v1", down.host()),
    );
    // The 429 reached the client: its budget for the registry is paused.
    wait_for(
        "the budget pauses after the 429",
        Duration::from_secs(10),
        || {
            let limits = METRICS.rate_limits.lock().unwrap();
            limits
                .get(&up)
                .and_then(|(_, until)| *until)
                .is_some_and(|u| u > std::time::SystemTime::now())
        },
    )
    .await;
    // A burst of copies from the same registry arrives during the pause.
    let burst: Vec<_> = (1..4)
        .map(|i| {
            spawn_copy(
                &client,
                format!("{up}/img:v1"),
                format!("{}/m/img{i}:v1", down.host()),
            )
        })
        .collect();
    for (i, task) in std::iter::once(first).chain(burst).enumerate() {
        let r = task.await.unwrap().expect("every copy succeeds");
        assert_eq!(r.target_digest.to_string(), digest);
        let (bytes, _, _) = Pusher::new(&down)
            .get_manifest(&format!("m/img{i}"), "v1")
            .await
            .unwrap();
        assert_eq!(sha256(&bytes), digest, "copy {i} on the target");
    }
    // The registry saw nothing while its Retry-After ran: the other workers waited too.
    let seen = f.seen();
    let throttled = seen.iter().find(|s| s.status == 429).expect("the 429");
    let too_early: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.at > throttled.at && s.at < throttled.at + Duration::from_secs(2))
        .collect();
    assert!(
        too_early.is_empty(),
        "requests during the pause: {too_early:?}"
    );
    assert_eq!(
        seen.iter().filter(|s| s.status == 429).count(),
        1,
        "one 429 in all"
    );
    assert!(
        METRICS.rate_limit_waits.get() - waits_before >= 3,
        "the three copies of the burst each waited"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spent_pull_allowance_holds_manifest_gets_until_its_window_ends_without_429s() {
    let f = Faulty::default();
    let (digest, _) = seed(&f);
    let up = f.start().await;
    let down = Registry::anonymous().await;
    // Two manifest GETs per 2-second window; each copy needs one (HEADs are free, as on Docker Hub).
    f.allowance(2, Duration::from_secs(2));
    let client = fast_client();
    let copies: Vec<_> = (0..4)
        .map(|i| {
            spawn_copy(
                &client,
                format!("{up}/img:v1"),
                format!("{}/m/img{i}:v1", down.host()),
            )
        })
        .collect();
    for task in copies {
        let r = task.await.unwrap().expect("every copy succeeds");
        assert_eq!(r.target_digest.to_string(), digest);
    }
    let seen = f.seen();
    let t0 = seen[0].at;
    let timeline: Vec<String> = seen
        .iter()
        .filter(|s| s.path.contains("/manifests/"))
        .map(|s| format!("{} ms {} {}", (s.at - t0).as_millis(), s.method, s.status))
        .collect();
    assert!(
        seen.iter().all(|s| s.status != 429),
        "the budget kept within the allowance: {timeline:#?}"
    );
    let gets: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.method == Method::GET && s.path.contains("/manifests/"))
        .collect();
    assert_eq!(gets.len(), 4, "one GET per copy, none retried: {gets:?}");
    let window_start = seen
        .iter()
        .find(|s| s.path.contains("/manifests/"))
        .unwrap()
        .at;
    assert!(
        gets[2..]
            .iter()
            .all(|g| g.at >= window_start + Duration::from_secs(2)),
        "the third and fourth GET waited for the next window: {gets:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_beyond_the_max_wait_puts_the_job_back_in_the_queue_with_its_attempt() {
    use crate::support::service::Service;
    let f = Faulty::default();
    seed(&f);
    let up = f.start().await;
    let down = Registry::anonymous().await;
    f.always(Route::Manifest, Fault::Status(429, Some("3600")));
    let dir = tempfile::tempdir().unwrap();
    // One attempt per job: without the deferral, the 429 would fail it for good.
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up,
        &[
            ("MIRROR_MAX_ATTEMPTS", "1"),
            ("MIRROR_RATE_LIMIT_MAX_WAIT", "10"),
        ],
    )
    .await;
    let (status, job) = svc
        .mirror(&serde_json::json!({ "image": format!("{up}/img:v1") }))
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_i64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        let (_, job) = svc.get(&format!("/jobs/{id}")).await;
        if !job["last_error"].is_null() || job["state"] == "failed" {
            break job;
        }
        assert!(Instant::now() < deadline, "the job ran within 30 s: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["state"], "queued", "{job}");
    assert_eq!(job["attempts"], 0, "the attempt is given back: {job}");
    let error = job["last_error"].as_str().unwrap();
    assert!(error.contains("rate-limiting"), "{error}");
    let next =
        chrono::DateTime::parse_from_rfc3339(job["next_attempt_at"].as_str().unwrap()).unwrap();
    let wait = next.signed_duration_since(chrono::Utc::now()).num_seconds();
    assert!((3500..=3600).contains(&wait), "runs again in {wait} s");
    assert_eq!(
        f.count(Route::Manifest),
        1,
        "the registry was asked once, not hammered"
    );
    let (_, metrics) = svc.get_text("/metrics").await;
    let paused = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "mirror_registry_rate_limit_paused_seconds{{registry=\"{up}\"}} "
            ))
        })
        .unwrap_or_else(|| panic!("no pause gauge for {up}:\n{metrics}"));
    assert!(paused.parse::<f64>().unwrap() > 3500.0, "{paused}");
}
