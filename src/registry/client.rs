//! The Registry HTTP API v2 transport: one HTTP client for every registry, with authentication,
//! retries and size limits. Each operation here is one protocol step; the copy engine composes them.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};

use super::auth::{Authenticator, Challenge, read_small_body};
use super::budget::{BudgetPolicy, Budgets, Ticket};
use super::credentials::CredentialStore;
use super::error::{Error, Result};
use super::guard::{GuardedResolver, NetworkPolicy};
use super::manifest::{self, Manifest};
use super::retry::{RetryPolicy, parse_retry_after};
use crate::digest::{Digest, DigestHasher};
use crate::reference::{ImageRef, is_loopback};

/// A repository on a registry: where manifests and blobs live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repo {
    /// The normalised registry name (`docker.io`, `ghcr.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// The repository path (`library/nginx`).
    pub name: String,
}

impl Repo {
    /// The repository an image reference lives in.
    pub fn of(image: &ImageRef) -> Repo {
        Repo {
            registry: image.registry().to_string(),
            name: image.repository().to_string(),
        }
    }

    /// The host to send HTTP requests to (Docker Hub's API lives on `registry-1.docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    fn scope(&self, actions: &str) -> String {
        format!("repository:{}:{actions}", self.name)
    }
}

impl std::fmt::Display for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// Settings for [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Registries (host or host:port) to talk to over plain HTTP. Loopback registries always are.
    pub insecure_registries: Vec<String>,
    /// Retry policy for every request.
    pub retry: RetryPolicy,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of an answer before the connection counts as stalled.
    pub read_timeout: Duration,
    /// Which addresses connections may reach.
    pub network: NetworkPolicy,
    /// The longest a request waits for a registry's rate limit; beyond it the request fails with
    /// [`Error::RateLimited`] so the caller can reschedule.
    pub rate_limit_max_wait: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            insecure_registries: Vec::new(),
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(120),
            network: NetworkPolicy::permissive(),
            rate_limit_max_wait: Duration::from_secs(60),
        }
    }
}

/// The largest manifest accepted (the limit CNCF distribution enforces).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// What a manifest HEAD tells.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    /// `Docker-Content-Digest`, when the registry sent it.
    pub digest: Option<Digest>,
    /// `Content-Type`.
    pub media_type: Option<String>,
}

/// Where a blob upload continues (the `Location` of an upload session).
#[derive(Debug, Clone)]
pub struct UploadSession(url::Url);

/// The outcome of a cross-repository mount request.
#[derive(Debug)]
pub enum MountOutcome {
    /// The registry linked the blob (201): nothing to upload.
    Mounted,
    /// The registry declined and opened an upload session instead (202).
    Upload(UploadSession),
}

/// One request for [`Client::request`].
struct Call<'a> {
    what: String,
    repo: &'a Repo,
    scopes: &'a [String],
    method: Method,
    url: url::Url,
    headers: HeaderMap,
    body: Option<Bytes>,
    /// Statuses that end the request; any other is an error (retried when transient).
    ok: &'a [StatusCode],
}

/// Counts bytes as they stream, shared with whoever reports progress.
pub type ByteCounter = Arc<std::sync::atomic::AtomicU64>;

/// The registry client: cheap to clone, shared by every copy in the process.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    auth: Authenticator,
    insecure: HashSet<String>,
    retry: RetryPolicy,
    network: Arc<NetworkPolicy>,
    /// Rate-limit budgets per registry and credential, shared by every copy.
    budgets: Arc<Budgets>,
    /// Per (target registry, blob): the repository this process last put it in, behind a lock
    /// that one transfer of that blob holds at a time.
    blob_slots: Mutex<HashMap<(String, Digest), BlobSlot>>,
}

/// Where a blob is known to be on a target registry; locked while it is being moved there.
pub type BlobSlot = Arc<tokio::sync::Mutex<Option<String>>>;

/// Entries kept in the blob record before idle ones are dropped.
const MAX_BLOB_SLOTS: usize = 100_000;

impl Client {
    /// A client with `config`, authenticating with `credentials`.
    pub fn new(config: ClientConfig, credentials: CredentialStore) -> Result<Client> {
        let network = Arc::new(config.network.clone());
        let hops = network.clone();
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver(network.clone())))
            .user_agent(concat!("mirror-mirror/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            // Blob GETs redirect to object storage; reqwest drops Authorization on a cross-host hop.
            // Each hop meets the network policy; at most 5.
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 {
                    attempt.error("more than 5 redirects")
                } else if let Err(refused) = hops.check_url(attempt.url()) {
                    attempt.error(refused)
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .map_err(|e| Error::Network {
                context: "building the HTTP client".into(),
                source: e,
            })?;
        let budgets = Arc::new(Budgets::for_credentials(
            BudgetPolicy {
                max_wait: config.rate_limit_max_wait,
                backoff: config.retry.base,
                max_backoff: config.retry.max_backoff,
            },
            &credentials,
        ));
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                auth: Authenticator::new(credentials, network.clone(), budgets.clone()),
                budgets,
                insecure: config.insecure_registries.into_iter().collect(),
                retry: config.retry,
                network,
                blob_slots: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The slot of `digest` on `registry` (see [`BlobSlot`]).
    pub fn blob_slot(&self, registry: &str, digest: &Digest) -> BlobSlot {
        let mut slots = self.inner.blob_slots.lock().expect("blob slots poisoned");
        if slots.len() >= MAX_BLOB_SLOTS {
            slots.retain(|_, s| Arc::strong_count(s) > 1);
        }
        slots
            .entry((registry.to_string(), digest.clone()))
            .or_default()
            .clone()
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    fn scheme(&self, registry: &str) -> &'static str {
        if is_loopback(registry) || self.inner.insecure.contains(registry) {
            "http"
        } else {
            "https"
        }
    }

    fn url(&self, repo: &Repo, tail: &str) -> Result<url::Url> {
        let s = format!(
            "{}://{}/v2/{}/{}",
            self.scheme(&repo.registry),
            repo.api_host(),
            repo.name,
            tail
        );
        url::Url::parse(&s).map_err(|e| Error::Invalid(format!("cannot build URL {s}: {e}")))
    }

    /// Sends one request built by `build`, authenticating as the registry asks: on a 401 it learns
    /// the challenge (or drops a stale token), gets fresh credentials, and sends once more.
    async fn send(
        &self,
        repo: &Repo,
        scopes: &[String],
        url: &url::Url,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        self.send_metered(repo, scopes, url, false, build).await
    }

    /// [`Client::send`] within the registry's rate-limit budget: each request waits while the
    /// budget is paused, and a `metered` one (a manifest GET) reserves one of its allowance.
    async fn send_metered(
        &self,
        repo: &Repo,
        scopes: &[String],
        url: &url::Url,
        metered: bool,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let inner = &self.inner;
        inner.network.check_url(url).map_err(Error::from)?;
        let same_host = same_host(url, repo.api_host());
        let mut authz = if same_host {
            inner
                .auth
                .authorization(&inner.http, &inner.retry, &repo.registry, scopes)
                .await?
        } else {
            None
        };
        let mut retried_auth = false;
        loop {
            let ticket = inner.budgets.acquire(&repo.registry, metered).await?;
            let mut req = build(&inner.http);
            if let Some(a) = &authz {
                req = req.header(header::AUTHORIZATION, a);
            }
            let resp = req.send().await.map_err(|e| Error::Network {
                context: format!("{} {}", repo, redact_query(url)),
                source: e,
            })?;
            crate::metrics::METRICS.registry_request(&repo.registry, resp.status().as_u16());
            observe(ticket, &resp, repo)?;
            if resp.status() != StatusCode::UNAUTHORIZED || retried_auth || !same_host {
                return Ok(resp);
            }
            let Some(challenge) = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(Challenge::parse)
            else {
                return Ok(resp);
            };
            retried_auth = true;
            inner.auth.learn(&repo.registry, challenge);
            inner.auth.invalidate(&repo.registry, scopes).await;
            authz = inner
                .auth
                .authorization(&inner.http, &inner.retry, &repo.registry, scopes)
                .await?;
            if authz.is_none() {
                return Ok(resp);
            }
        }
    }

    /// Sends `call` with retries of transient failures.
    async fn request(&self, call: Call<'_>) -> Result<reqwest::Response> {
        let Call {
            what,
            repo,
            scopes,
            method,
            url,
            headers,
            body,
            ok,
        } = call;
        self.inner
            .retry
            .run(&what, |_| {
                let (method, url, headers, body) =
                    (method.clone(), url.clone(), headers.clone(), body.clone());
                async move {
                    let metered = method == Method::GET && url.path().contains("/manifests/");
                    let resp = self
                        .send_metered(repo, scopes, &url, metered, |http| {
                            let mut r = http.request(method.clone(), url.clone());
                            r = r.headers(headers.clone());
                            if let Some(b) = &body {
                                r = r.body(b.clone());
                            }
                            r
                        })
                        .await?;
                    if ok.contains(&resp.status()) {
                        Ok(resp)
                    } else {
                        Err(status_error(method.as_str(), &url, resp).await)
                    }
                }
            })
            .await
    }

    /// HEAD a manifest by tag or digest: `None` when it is not there.
    pub async fn head_manifest(
        &self,
        repo: &Repo,
        reference: &str,
    ) -> Result<Option<ManifestHead>> {
        let url = self.url(repo, &format!("manifests/{reference}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(manifest::ACCEPT));
        let resp = self
            .request(Call {
                what: format!("HEAD {repo}:{reference}"),
                repo,
                scopes: &[repo.scope("pull")],
                method: Method::HEAD,
                url,
                headers,
                body: None,
                ok: &[StatusCode::OK, StatusCode::NOT_FOUND],
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(ManifestHead {
            digest: resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Digest::parse(v).ok()),
            media_type: content_type(resp.headers()),
        }))
    }

    /// GET a manifest's exact bytes, capped at [`MAX_MANIFEST_BYTES`] and checked against `expected`
    /// (by digest) or `Docker-Content-Digest` (by tag).
    pub async fn get_manifest(
        &self,
        repo: &Repo,
        reference: &str,
        expected: Option<&Digest>,
    ) -> Result<Manifest> {
        let url = self.url(repo, &format!("manifests/{reference}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(manifest::ACCEPT));
        let what = format!("{repo}@{reference}");
        self.inner
            .retry
            .run(&format!("GET manifest {what}"), |_| {
                let (url, headers, what) = (url.clone(), headers.clone(), what.clone());
                async move {
                    let resp = self
                        .send_metered(repo, &[repo.scope("pull")], &url, true, |http| {
                            http.get(url.clone()).headers(headers.clone())
                        })
                        .await?;
                    if resp.status() != StatusCode::OK {
                        return Err(status_error("GET", &url, resp).await);
                    }
                    let media_type = content_type(resp.headers());
                    let header_digest = resp
                        .headers()
                        .get("docker-content-digest")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| Digest::parse(v).ok());
                    let bytes = read_capped(resp, MAX_MANIFEST_BYTES, &what).await?;
                    let want = expected.cloned().or(header_digest);
                    let digest = match &want {
                        Some(d) => {
                            let actual = Digest::of(d.algorithm(), &bytes);
                            if &actual != d {
                                return Err(Error::DigestMismatch {
                                    what: format!("manifest {what}"),
                                    expected: d.clone(),
                                    actual,
                                });
                            }
                            actual
                        }
                        None => Digest::sha256_of(&bytes),
                    };
                    Manifest::new(what, bytes, media_type, digest)
                }
            })
            .await
    }

    /// PUT a manifest's exact bytes under `reference` (a tag or its digest).
    pub async fn put_manifest(&self, repo: &Repo, reference: &str, m: &Manifest) -> Result<()> {
        let url = self.url(repo, &format!("manifests/{reference}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(&m.media_type)
                .map_err(|_| Error::Invalid(format!("bad media type {:?}", m.media_type)))?,
        );
        let resp = self
            .request(Call {
                what: format!("PUT manifest {repo}:{reference}"),
                repo,
                scopes: &[repo.scope("pull,push")],
                method: Method::PUT,
                url,
                headers,
                body: Some(m.bytes.clone()),
                ok: &[StatusCode::CREATED, StatusCode::OK, StatusCode::ACCEPTED],
            })
            .await?;
        if let Some(d) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok())
            && d != m.digest
        {
            return Err(Error::DigestMismatch {
                what: format!("manifest pushed to {repo}:{reference} (Docker-Content-Digest)"),
                expected: m.digest.clone(),
                actual: d,
            });
        }
        Ok(())
    }

    /// Every tag of `repo` (`GET /v2/<name>/tags/list?n=<page>`), sorted by name, following the
    /// `Link: <…>; rel="next"` pages the registry gives.
    ///
    /// A next page is followed only on the registry's own origin (scheme, host and port: no
    /// detour elsewhere, no downgrade to plain HTTP), never twice, and only after a page that had
    /// tags; at most [`MAX_TAG_PAGES`] pages of [`MAX_TAG_PAGE_BYTES`] each, and [`MAX_TAGS`] tags
    /// in all. Each page is fetched, read and parsed under the retry policy. Names that are not
    /// valid tags are left out (and logged), so every tag returned can be put in a reference.
    pub async fn list_tags(&self, repo: &Repo, page: usize) -> Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct TagList {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let first = self.url(repo, &format!("tags/list?n={}", page.max(1)))?;
        let base = ImageRef::parse("tag/check").expect("a constant reference");
        let mut url = first.clone();
        let mut visited: HashSet<url::Url> = HashSet::new();
        let mut out: Vec<String> = Vec::new();
        // Names received (valid or not), and the first name that was not a valid tag.
        let (mut received, mut invalid, mut first_invalid) = (0usize, 0usize, None::<String>);
        for pages in 1.. {
            visited.insert(url.clone());
            let what = format!("page {pages} of the tag list of {repo}");
            let (tags, next) = self
                .inner
                .retry
                .run(&format!("GET {what}"), |_| {
                    let (url, what) = (url.clone(), what.clone());
                    async move {
                        let resp = self
                            .send(repo, &[repo.scope("pull")], &url, |http| {
                                http.get(url.clone())
                            })
                            .await?;
                        if resp.status() != StatusCode::OK {
                            return Err(status_error("GET", &url, resp).await);
                        }
                        let next = resp
                            .headers()
                            .get_all(header::LINK)
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .find_map(next_link)
                            .map(|link| {
                                url.join(&link).map_err(|e| {
                                    Error::Invalid(format!(
                                        "{what}: the Link header's next page {link:?} is not a URL: {e}"
                                    ))
                                })
                            })
                            .transpose()?;
                        let body = read_capped(resp, MAX_TAG_PAGE_BYTES, &what)
                            .await
                            .map_err(|e| match e {
                                Error::ManifestTooLarge { .. } => Error::Invalid(format!(
                                    "{what} is larger than {MAX_TAG_PAGE_BYTES} bytes"
                                )),
                                e => e,
                            })?;
                        let list: TagList = serde_json::from_slice(&body).map_err(|e| {
                            Error::Invalid(format!("{what} is not a tag list: {e}"))
                        })?;
                        Ok((list.tags.unwrap_or_default(), next))
                    }
                })
                .await?;
            let had_tags = !tags.is_empty();
            received += tags.len();
            if received > MAX_TAGS {
                return Err(Error::Invalid(format!(
                    "{repo} has more than {MAX_TAGS} tags; name the tags to mirror instead of matching them"
                )));
            }
            for tag in tags {
                if base.clone().try_with_tag(Some(tag.clone())).is_ok() {
                    out.push(tag);
                } else {
                    invalid += 1;
                    first_invalid.get_or_insert(tag);
                }
            }
            let Some(next) = next else {
                break;
            };
            let refuse = |why: String| {
                Err(Error::Invalid(format!(
                    "{repo}: the tag list's page {} {why}; refusing to follow it",
                    pages + 1
                )))
            };
            if next.origin() != first.origin() {
                return refuse(format!(
                    "is at {}, not on the registry ({})",
                    next.origin().ascii_serialization(),
                    first.origin().ascii_serialization()
                ));
            }
            if visited.contains(&next) {
                return refuse("links back to a page already read".into());
            }
            if !had_tags {
                return refuse(format!("follows page {pages}, which was empty"));
            }
            if pages >= MAX_TAG_PAGES {
                return refuse(format!("is beyond the {MAX_TAG_PAGES} pages read at most"));
            }
            url = next;
        }
        if let Some(example) = first_invalid {
            tracing::warn!(
                registry = %repo.registry,
                invalid_tags = invalid,
                "{repo}: the tag list has {invalid} name(s) that are not valid tags, left out (such as {:?})",
                example.chars().take(140).collect::<String>()
            );
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The referrers of `digest` from the OCI referrers API, as the index the registry answered
    /// (its `manifests` are the referrers); `None` when the registry has no such API.
    pub async fn referrers(&self, repo: &Repo, digest: &Digest) -> Result<Option<Manifest>> {
        let url = self.url(repo, &format!("referrers/{digest}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        let resp = self
            .request(Call {
                what: format!("referrers of {repo}@{}", digest.short()),
                repo,
                scopes: &[repo.scope("pull")],
                method: Method::GET,
                url,
                headers,
                body: None,
                ok: &[
                    StatusCode::OK,
                    StatusCode::NOT_FOUND,
                    StatusCode::BAD_REQUEST,
                    StatusCode::METHOD_NOT_ALLOWED,
                ],
            })
            .await?;
        if resp.status() != StatusCode::OK {
            return Ok(None);
        }
        let what = format!("referrers of {repo}@{digest}");
        let bytes = read_capped(resp, MAX_MANIFEST_BYTES, &what).await?;
        let d = Digest::sha256_of(&bytes);
        let index = Manifest::new(
            what,
            bytes,
            Some("application/vnd.oci.image.index.v1+json".into()),
            d,
        )?;
        Ok(Some(index))
    }

    /// HEAD a blob: its size when the repository has it, `None` when not.
    pub async fn blob_size(&self, repo: &Repo, digest: &Digest) -> Result<Option<u64>> {
        let url = self.url(repo, &format!("blobs/{digest}"))?;
        let resp = self
            .request(Call {
                what: format!("HEAD blob {repo}@{}", digest.short()),
                repo,
                scopes: &[repo.scope("pull")],
                method: Method::HEAD,
                url,
                headers: HeaderMap::new(),
                body: None,
                ok: &[StatusCode::OK, StatusCode::NOT_FOUND],
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(
            resp.headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        ))
    }

    /// Asks `target` to link a blob that `from` (same registry) has. Needs pull on `from`.
    pub async fn mount_blob(
        &self,
        target: &Repo,
        from: &Repo,
        digest: &Digest,
    ) -> Result<MountOutcome> {
        let mut url = self.url(target, "blobs/uploads/")?;
        url.query_pairs_mut()
            .append_pair("mount", &digest.to_string())
            .append_pair("from", &from.name);
        let scopes = [target.scope("pull,push"), from.scope("pull")];
        let resp = self
            .request(Call {
                what: format!("mount {} into {target}", digest.short()),
                repo: target,
                scopes: &scopes,
                method: Method::POST,
                url: url.clone(),
                headers: HeaderMap::new(),
                body: Some(Bytes::new()),
                ok: &[StatusCode::CREATED, StatusCode::ACCEPTED],
            })
            .await?;
        if resp.status() == StatusCode::CREATED {
            return Ok(MountOutcome::Mounted);
        }
        Ok(MountOutcome::Upload(
            self.upload_location(target, &url, &resp)?,
        ))
    }

    /// Opens a blob upload session on `repo`.
    pub async fn start_upload(&self, repo: &Repo) -> Result<UploadSession> {
        let url = self.url(repo, "blobs/uploads/")?;
        let resp = self
            .request(Call {
                what: format!("start upload to {repo}"),
                repo,
                scopes: &[repo.scope("pull,push")],
                method: Method::POST,
                url: url.clone(),
                headers: HeaderMap::new(),
                body: Some(Bytes::new()),
                ok: &[StatusCode::ACCEPTED],
            })
            .await?;
        self.upload_location(repo, &url, &resp)
    }

    fn upload_location(
        &self,
        repo: &Repo,
        base: &url::Url,
        resp: &reqwest::Response,
    ) -> Result<UploadSession> {
        let loc = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::MissingHeader {
                registry: repo.registry.clone(),
                what: "an upload request".into(),
                header: "Location",
            })?;
        let url = base.join(loc).map_err(|e| {
            Error::Invalid(format!(
                "{} answered an upload request with an unusable Location {loc:?}: {e}",
                repo.registry
            ))
        })?;
        Ok(UploadSession(url))
    }

    /// Abandons an upload session (best effort: the registry expires it anyway).
    pub async fn cancel_upload(&self, repo: &Repo, session: &UploadSession) {
        let url = session.0.clone();
        let _ = self
            .send(repo, &[repo.scope("pull,push")], &url, |http| {
                http.delete(url.clone())
            })
            .await;
    }

    /// Streams blob `digest` (`size` bytes) from `src` into `session` on `dst`, hashing and
    /// counting on the way: a body that is cut, too long, or hashes wrong is never committed.
    /// One attempt; the caller retries.
    pub async fn stream_blob(
        &self,
        src: &Repo,
        dst: &Repo,
        session: UploadSession,
        digest: &Digest,
        size: u64,
        progress: Option<ByteCounter>,
    ) -> Result<u64> {
        let what = format!("blob {}@{}", src, digest.short());
        let get_url = self.url(src, &format!("blobs/{digest}"))?;
        // The upload's place in the target's budget, taken before the source stream is open.
        let put_ticket = match self.inner.budgets.acquire(&dst.registry, false).await {
            Ok(t) => t,
            Err(e) => {
                self.cancel_upload(dst, &session).await;
                return Err(e);
            }
        };
        let resp = self
            .send(src, &[src.scope("pull")], &get_url, |http| {
                http.get(get_url.clone())
            })
            .await?;
        if resp.status() != StatusCode::OK {
            self.cancel_upload(dst, &session).await;
            return Err(status_error("GET", &get_url, resp).await);
        }
        if let Some(len) = resp.content_length()
            && len != size
        {
            self.cancel_upload(dst, &session).await;
            return Err(Error::SizeMismatch {
                what,
                expected: size,
                actual: len,
            });
        }
        let state = Arc::new(Mutex::new(StreamState::Running));
        let body = VerifyingStream {
            inner: Box::pin(resp.bytes_stream()),
            hasher: Some(DigestHasher::new(digest.algorithm())),
            held: None,
            expected: digest.clone(),
            size,
            seen: 0,
            state: state.clone(),
            progress,
        };
        self.inner
            .network
            .check_url(&session.0)
            .map_err(Error::from)?;
        let mut put_url = session.0.clone();
        put_url
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let body = reqwest::Body::wrap_stream(body);
        let authz = if same_host(&put_url, dst.api_host()) {
            self.inner
                .auth
                .authorization(
                    &self.inner.http,
                    &self.inner.retry,
                    &dst.registry,
                    &[dst.scope("pull,push")],
                )
                .await?
        } else {
            None
        };
        let mut req = self
            .inner
            .http
            .put(put_url.clone())
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, size)
            .body(body);
        if let Some(a) = authz {
            req = req.header(header::AUTHORIZATION, a);
        }
        let sent = req.send().await;
        let outcome = std::mem::replace(
            &mut *state.lock().expect("stream state poisoned"),
            StreamState::Running,
        );
        match outcome {
            StreamState::Mismatch(actual) => {
                self.cancel_upload(dst, &session).await;
                return Err(Error::DigestMismatch {
                    what,
                    expected: digest.clone(),
                    actual,
                });
            }
            StreamState::TooLong(actual) => {
                self.cancel_upload(dst, &session).await;
                return Err(Error::SizeMismatch {
                    what,
                    expected: size,
                    actual,
                });
            }
            StreamState::Cut(received) => {
                self.cancel_upload(dst, &session).await;
                return Err(Error::Truncated {
                    what,
                    received,
                    expected: size,
                });
            }
            StreamState::Running | StreamState::Done => {}
        }
        let resp = sent.map_err(|e| Error::Network {
            context: format!("uploading {what} to {dst}"),
            source: e,
        })?;
        crate::metrics::METRICS.registry_request(&dst.registry, resp.status().as_u16());
        observe(put_ticket, &resp, dst)?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            // The token died mid-upload: drop it so the retry starts with a fresh one.
            self.inner
                .auth
                .invalidate(&dst.registry, &[dst.scope("pull,push")])
                .await;
            return Err(Error::Auth {
                registry: dst.registry.clone(),
                reason: "the token expired during a blob upload".into(),
                // Retryable: the next attempt fetches a fresh token; a real refusal surfaces there.
                transient: true,
            });
        }
        if resp.status() != StatusCode::CREATED {
            return Err(status_error("PUT", &put_url, resp).await);
        }
        Ok(size)
    }

    /// GETs blob `digest` from `repo` and hashes it as it streams, keeping nothing: `Ok(None)` when
    /// the repository does not have it, [`Error::DigestMismatch`], [`Error::SizeMismatch`] or
    /// [`Error::Truncated`] when its bytes are not exactly the `size` bytes of `digest`. Cut bodies
    /// are retried.
    pub async fn hash_blob(&self, repo: &Repo, digest: &Digest, size: u64) -> Result<Option<u64>> {
        let what = format!("blob {}@{}", repo, digest.short());
        let url = self.url(repo, &format!("blobs/{digest}"))?;
        self.inner
            .retry
            .run(&format!("GET {what}"), |_| {
                let (url, what) = (url.clone(), what.clone());
                async move {
                    let resp = self
                        .send(repo, &[repo.scope("pull")], &url, |http| {
                            http.get(url.clone())
                        })
                        .await?;
                    if resp.status() == StatusCode::NOT_FOUND {
                        return Ok(None);
                    }
                    if resp.status() != StatusCode::OK {
                        return Err(status_error("GET", &url, resp).await);
                    }
                    if let Some(len) = resp.content_length()
                        && len != size
                    {
                        return Err(Error::SizeMismatch {
                            what,
                            expected: size,
                            actual: len,
                        });
                    }
                    let mut hasher = DigestHasher::new(digest.algorithm());
                    let mut seen = 0u64;
                    let mut body = resp.bytes_stream();
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk.map_err(|_| Error::Truncated {
                            what: what.clone(),
                            received: seen,
                            expected: size,
                        })?;
                        seen += chunk.len() as u64;
                        if seen > size {
                            return Err(Error::SizeMismatch {
                                what,
                                expected: size,
                                actual: seen,
                            });
                        }
                        hasher.update(&chunk);
                    }
                    if seen < size {
                        return Err(Error::Truncated {
                            what,
                            received: seen,
                            expected: size,
                        });
                    }
                    let actual = hasher.finish();
                    if &actual != digest {
                        return Err(Error::DigestMismatch {
                            what,
                            expected: digest.clone(),
                            actual,
                        });
                    }
                    Ok(Some(seen))
                }
            })
            .await
    }
}

/// What the verifying stream saw, read after the upload.
enum StreamState {
    Running,
    Done,
    Mismatch(Digest),
    TooLong(u64),
    Cut(u64),
}

/// Passes bytes through while hashing and counting; fails the stream (so the upload is aborted)
/// on a cut, on more bytes than `size`, or on a digest mismatch at the end. The last chunk is held
/// back until the digest is verified, so a wrong blob never reaches its full length on the target.
struct VerifyingStream {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    hasher: Option<DigestHasher>,
    held: Option<Bytes>,
    expected: Digest,
    size: u64,
    seen: u64,
    state: Arc<Mutex<StreamState>>,
    progress: Option<ByteCounter>,
}

impl VerifyingStream {
    fn fail(&mut self, s: StreamState, msg: String) -> Poll<Option<std::io::Result<Bytes>>> {
        *self.state.lock().expect("stream state poisoned") = s;
        self.hasher = None;
        self.held = None;
        Poll::Ready(Some(Err(std::io::Error::other(msg))))
    }

    fn emit(&self, chunk: Bytes) -> Poll<Option<std::io::Result<Bytes>>> {
        if let Some(p) = &self.progress {
            p.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Poll::Ready(Some(Ok(chunk)))
    }
}

impl Stream for VerifyingStream {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.hasher.is_none() {
                // Verified: release the held-back chunk, then end.
                return match self.held.take() {
                    Some(last) => self.emit(last),
                    None => Poll::Ready(None),
                };
            }
            match self.inner.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    if chunk.is_empty() {
                        continue;
                    }
                    self.seen += chunk.len() as u64;
                    if self.seen > self.size {
                        let seen = self.seen;
                        return self.fail(
                            StreamState::TooLong(seen),
                            "blob longer than its descriptor".into(),
                        );
                    }
                    if let Some(h) = self.hasher.as_mut() {
                        h.update(&chunk);
                    }
                    if let Some(prev) = self.held.replace(chunk) {
                        return self.emit(prev);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let seen = self.seen;
                    return self.fail(StreamState::Cut(seen), format!("source body failed: {e}"));
                }
                Poll::Ready(None) => {
                    if self.seen < self.size {
                        let seen = self.seen;
                        return self.fail(StreamState::Cut(seen), "source body ended early".into());
                    }
                    let actual = self.hasher.take().expect("checked above").finish();
                    if actual != self.expected {
                        return self
                            .fail(StreamState::Mismatch(actual), "blob digest mismatch".into());
                    }
                    *self.state.lock().expect("stream state poisoned") = StreamState::Done;
                }
            }
        }
    }
}

/// Applies an answer to its budget (answers from another host, such as object storage after a
/// redirect, say nothing about the registry's limits); a throttling answer that paused the budget
/// for longer than a request waits becomes [`Error::RateLimited`].
fn observe(ticket: Ticket, resp: &reqwest::Response, repo: &Repo) -> Result<()> {
    if !same_host(resp.url(), repo.api_host()) {
        return Ok(());
    }
    match ticket.observe(resp.status(), resp.headers()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Most tags [`Client::list_tags`] reads from one repository.
pub const MAX_TAGS: usize = 100_000;

/// Most pages [`Client::list_tags`] reads from one repository (a registry that pages by 100, as
/// most do at most, gives [`MAX_TAGS`] in this many).
pub const MAX_TAG_PAGES: usize = 1_000;

/// Largest page of a tag list accepted (as for a manifest).
pub const MAX_TAG_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// The target of `rel="next"` in a `Link` header: `<url>; rel="next"`.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| target.to_string())
    })
}

fn same_host(url: &url::Url, host: &str) -> bool {
    let Some(h) = url.host_str() else {
        return false;
    };
    let with_port = match url.port() {
        Some(p) => format!("{h}:{p}"),
        None => h.to_string(),
    };
    with_port.eq_ignore_ascii_case(host)
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Upload URLs carry session state in the query; logs and errors need only the path.
fn redact_query(url: &url::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}

/// Reads a body of at most `limit` bytes; stops reading at `limit + 1`.
async fn read_capped(mut resp: reqwest::Response, limit: usize, what: &str) -> Result<Bytes> {
    if let Some(len) = resp.content_length()
        && len > limit as u64
    {
        return Err(Error::ManifestTooLarge {
            reference: what.to_string(),
            limit,
        });
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| Error::Network {
        context: format!("reading manifest {what}"),
        source: e,
    })? {
        if out.len() + chunk.len() > limit {
            return Err(Error::ManifestTooLarge {
                reference: what.to_string(),
                limit,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(serde::Deserialize)]
struct ErrorEntry {
    code: Option<String>,
    message: Option<String>,
}

/// Turns an unexpected answer into [`Error::Status`] with the registry's code and message.
pub(crate) async fn status_error(method: &str, url: &url::Url, resp: reqwest::Response) -> Error {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let body = read_small_body(resp, "error body")
        .await
        .unwrap_or_default();
    let (code, message) = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(b) if !b.errors.is_empty() => {
            let code = b.errors[0].code.clone();
            let message = b
                .errors
                .iter()
                .filter_map(|e| e.message.clone())
                .collect::<Vec<_>>()
                .join("; ");
            (code, message)
        }
        _ => (None, String::new()),
    };
    Error::Status {
        method: method.to_string(),
        url: redact_query(url),
        status,
        code,
        message,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links() {
        assert_eq!(
            next_link(r#"</v2/a/tags/list?n=10&last=x>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?n=10&last=x")
        );
        assert_eq!(
            next_link(r#"<http://h/x>; rel="prev", </y>; rel=next"#).as_deref(),
            Some("/y")
        );
        assert_eq!(next_link("garbage"), None);
    }
}
