//! Blobs: their size on a registry, and streaming one from a source into an upload session,
//! hashed and counted on the way so a wrong blob is never committed. A source connection that
//! breaks mid-blob continues with `Range` where it stopped, the hash carrying on.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode};

use super::requests::{Call, observe, same_host, status_error};
use super::uploads::UploadSession;
use super::{ByteCounter, Client, Repo};
use crate::digest::{Digest, DigestHasher};
use crate::registry::budget::Ticket;
use crate::registry::error::{Error, Result};
use crate::registry::fanout::Feed;
use crate::registry::retry::{Budget, RESUME_PROGRESS, backoff, take_retry_or};

impl Client {
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

    /// Streams blob `digest` (`size` bytes) from `src` into `session` on `dst`, hashing and
    /// counting on the way: a body that is cut, too long, or hashes wrong is never committed.
    ///
    /// One streamed `PUT` by default; `PATCH` chunks when the target's [`UploadLimits`] say so or
    /// after it answered `413`. A source connection that breaks continues from where it stopped
    /// (`Range`), a failed chunk from where the session stands. What cannot continue fails this
    /// attempt; the caller retries.
    ///
    /// `opened`, when given, is the blob's source read already open (its first attempt reads it).
    ///
    /// [`UploadLimits`]: super::UploadLimits
    #[allow(clippy::too_many_arguments)]
    pub async fn stream_blob(
        &self,
        src: &Repo,
        dst: &Repo,
        session: UploadSession,
        digest: &Digest,
        size: u64,
        progress: Option<ByteCounter>,
        mut opened: Option<Source>,
    ) -> Result<u64> {
        let mut session = session;
        let open = |opened: Option<Source>| async {
            match opened {
                Some(s) => Ok(s),
                None => Source::open(self, src, digest, size, progress.clone()).await,
            }
        };
        loop {
            let limits = self.upload_limits(dst);
            let chunked = limits.chunks(size);
            let result = if chunked {
                match open(opened.take()).await {
                    Ok(source) => {
                        let mut source = BlobBytes::Read(Box::new(source));
                        self.upload_chunked(dst, &session, &mut source, size, limits.chunk())
                            .await
                    }
                    Err(e) => Err(e),
                }
            } else {
                // The upload's place in the target's budget, taken before the source is open.
                match self.inner.budgets.acquire(&dst.registry, false).await {
                    Ok(ticket) => match open(opened.take()).await {
                        Ok(source) => {
                            self.put_streamed(
                                dst,
                                &session,
                                BlobBytes::Read(Box::new(source)),
                                ticket,
                            )
                            .await
                        }
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            };
            match result {
                Ok(()) => return Ok(size),
                Err(e) if e.status() == Some(413) => {
                    self.cancel_upload(dst, &session).await;
                    let refused = if chunked { limits.chunk() } else { size };
                    let Some(chunk) = self.learn_body_limit(dst, refused) else {
                        return Err(Error::Refused {
                            reason: format!(
                                "{} refused a request body of {refused} bytes (413 Payload Too Large), even as one chunk of the smallest size; raise the body limit of the registry or the proxy before it (nginx client_max_body_size)",
                                dst.registry
                            ),
                        });
                    };
                    tracing::warn!(
                        registry = %dst.registry,
                        refused_bytes = refused,
                        chunk_bytes = chunk,
                        "{} refused a request body of {refused} bytes (413); uploading to it in chunks of {chunk} bytes",
                        dst.registry
                    );
                    session = self.start_upload(dst).await?;
                }
                Err(e) => {
                    self.cancel_upload(dst, &session).await;
                    return Err(e);
                }
            }
        }
    }

    /// Uploads blob `digest` (`size` bytes) into `session` on `dst` from `feed`, a shared read of
    /// the source ([`crate::registry::fanout`]): one streamed `PUT`, or `PATCH` chunks when the
    /// target's limits say so. A failure (of the target, or of the shared read) abandons the
    /// session and is returned: the caller reads the source on its own then.
    pub async fn upload_fed(
        &self,
        dst: &Repo,
        session: UploadSession,
        size: u64,
        feed: Feed,
    ) -> Result<()> {
        let limits = self.upload_limits(dst);
        let (dropped, digest) = (feed.dropped(), feed.digest().clone());
        let mut body = BlobBytes::Fed(feed);
        let upload = async {
            if limits.chunks(size) {
                self.upload_chunked(dst, &session, &mut body, size, limits.chunk())
                    .await
            } else {
                let ticket = self.inner.budgets.acquire(&dst.registry, false).await?;
                self.put_streamed(dst, &session, body, ticket).await
            }
        };
        // A target that stopped reading never polls the body again: stop its upload from here.
        let result = tokio::select! {
            r = upload => r,
            _ = dropped.cancelled() => Err(Error::Restart {
                what: format!("blob {}", digest.short()),
                reason: "the shared read of the source dropped this target".into(),
            }),
        };
        if result.is_err() {
            self.cancel_upload(dst, &session).await;
        }
        result
    }

    /// The whole blob from `source` in one streamed `PUT` to `session`.
    async fn put_streamed(
        &self,
        dst: &Repo,
        session: &UploadSession,
        source: BlobBytes,
        ticket: Ticket,
    ) -> Result<()> {
        let (digest, size) = (source.digest().clone(), source.size());
        let what = format!("blob {}", digest.short());
        self.inner
            .network
            .check_before_sending(&session.0)
            .await
            .map_err(Error::from)?;
        let http = self.inner.conn.for_registry(&dst.registry)?;
        let mut put_url = session.0.clone();
        put_url
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        // The source's verdict when it fails the body (so the upload is aborted).
        let failure: Arc<Mutex<Option<Error>>> = Arc::default();
        let failed = failure.clone();
        // The body is polled by the connection's task: carry the operation's retry budget there.
        let budget = Budget::current();
        let body = futures_util::stream::unfold(Some(source), move |state| {
            let (failed, budget) = (failed.clone(), budget.clone());
            async move {
                let mut source = state?;
                let next = match budget {
                    Some(b) => b.scope(source.next()).await,
                    None => source.next().await,
                };
                match next {
                    Ok(Some(bytes)) => Some((Ok(bytes), Some(source))),
                    Ok(None) => None,
                    Err(e) => {
                        let msg = e.to_string();
                        *failed.lock().expect("failure poisoned") = Some(e);
                        Some((Err(std::io::Error::other(msg)), None))
                    }
                }
            }
        });
        let authz = if same_host(&put_url, dst.api_host()) {
            self.inner
                .auth
                .authorization(
                    &http,
                    &self.inner.retry,
                    &dst.registry,
                    &[dst.scope("pull,push")],
                )
                .await?
        } else {
            None
        };
        let mut req = http
            .put(put_url.clone())
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(body));
        if let Some(a) = authz {
            req = req.header(header::AUTHORIZATION, a);
        }
        let sent_at = std::time::Instant::now();
        let sent = req.send().await;
        if let Ok(r) = &sent {
            super::requests::timeline(&reqwest::Method::PUT, &put_url, r.status(), sent_at);
        }
        if let Some(e) = failure.lock().expect("failure poisoned").take() {
            return Err(e);
        }
        let resp = sent.map_err(|e| {
            self.inner
                .conn
                .error(&dst.registry, format!("uploading {what} to {dst}"), e)
        })?;
        crate::metrics::METRICS.registry_request(&dst.registry, resp.status().as_u16());
        observe(ticket, &resp, dst)?;
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
        Ok(())
    }
}

/// The bytes of a blob being uploaded: read from its source here, or fed by a shared read.
pub(super) enum BlobBytes {
    Read(Box<Source>),
    Fed(Feed),
}

impl BlobBytes {
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>> {
        match self {
            BlobBytes::Read(s) => s.next().await,
            BlobBytes::Fed(f) => f.next().await,
        }
    }

    pub(super) fn digest(&self) -> &Digest {
        match self {
            BlobBytes::Read(s) => &s.digest,
            BlobBytes::Fed(f) => f.digest(),
        }
    }

    fn size(&self) -> u64 {
        match self {
            BlobBytes::Read(s) => s.size,
            BlobBytes::Fed(f) => f.size(),
        }
    }
}

type BodyStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A blob read from its source registry: hashed and counted as it arrives; a connection that
/// breaks mid-blob continues with `Range: bytes=<offset>-` (the hash carrying on), within the
/// retry policy's attempts without progress. It fails on more bytes than `size` or a digest
/// mismatch, and holds its last bytes back until the digest is verified, so a wrong blob never
/// reaches its full length on the target.
pub struct Source {
    client: Client,
    repo: Repo,
    url: url::Url,
    digest: Digest,
    size: u64,
    body: BodyStream,
    /// `None` once the digest is verified.
    hasher: Option<DigestHasher>,
    held: Option<Bytes>,
    /// Bytes received and hashed.
    offset: u64,
    /// `offset` when the current connection opened.
    opened_at: u64,
    /// Connections in a row that broke without progress (counted when no operation's budget
    /// is in force).
    failures: u32,
    progress: Option<ByteCounter>,
}

impl Source {
    /// Opens blob `digest` of `repo` (`size` bytes by its descriptor).
    pub async fn open(
        client: &Client,
        repo: &Repo,
        digest: &Digest,
        size: u64,
        progress: Option<ByteCounter>,
    ) -> Result<Source> {
        let url = client.url(repo, &format!("blobs/{digest}"))?;
        let resp = client
            .send(repo, &[repo.scope("pull")], &url, |http| {
                http.get(url.clone())
            })
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error("GET", &url, resp).await);
        }
        if let Some(len) = resp.content_length()
            && len != size
        {
            return Err(Error::SizeMismatch {
                what: format!("blob {}@{}", repo, digest.short()),
                expected: size,
                actual: len,
            });
        }
        Ok(Source {
            client: client.clone(),
            repo: repo.clone(),
            url,
            digest: digest.clone(),
            size,
            body: Box::pin(resp.bytes_stream()),
            hasher: Some(DigestHasher::new(digest.algorithm())),
            held: None,
            offset: 0,
            opened_at: 0,
            failures: 0,
            progress,
        })
    }

    /// The digest being read.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    fn what(&self) -> String {
        format!("blob {}@{}", self.repo, self.digest.short())
    }

    fn emit(&self, bytes: Bytes) -> Result<Option<Bytes>> {
        if let Some(p) = &self.progress {
            p.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Some(bytes))
    }

    /// The next bytes of the blob, `None` after the last (which come only once the digest is
    /// verified).
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.hasher.is_none() {
                // Verified: release the held-back bytes, then end.
                return match self.held.take() {
                    Some(last) => self.emit(last),
                    None => Ok(None),
                };
            }
            match self.body.next().await {
                Some(Ok(chunk)) => {
                    if chunk.is_empty() {
                        continue;
                    }
                    self.offset += chunk.len() as u64;
                    if self.offset > self.size {
                        self.hasher = None;
                        self.held = None;
                        return Err(Error::SizeMismatch {
                            what: self.what(),
                            expected: self.size,
                            actual: self.offset,
                        });
                    }
                    if let Some(h) = self.hasher.as_mut() {
                        h.update(&chunk);
                    }
                    if let Some(prev) = self.held.replace(chunk) {
                        return self.emit(prev);
                    }
                }
                Some(Err(e)) if self.offset < self.size => {
                    self.resume(format!("source body failed: {}", error_chain(&e)))
                        .await?;
                }
                None if self.offset < self.size => {
                    self.resume("the source body ended early".into()).await?;
                }
                // Every byte is here (a connection that broke after the last one is no loss).
                Some(Err(_)) | None => {
                    let actual = self.hasher.take().expect("checked above").finish();
                    if actual != self.digest {
                        self.held = None;
                        return Err(Error::DigestMismatch {
                            what: self.what(),
                            expected: self.digest.clone(),
                            actual,
                        });
                    }
                }
            }
        }
    }

    /// Continues the blob from `offset` on a new connection. A connection that moved at least
    /// [`RESUME_PROGRESS`] bytes is continued without spending a retry; attempts that move
    /// nothing spend the operation's retries.
    async fn resume(&mut self, mut cause: String) -> Result<()> {
        let mut free =
            self.offset - self.opened_at >= RESUME_PROGRESS.min(self.size - self.opened_at);
        if free {
            self.failures = 0;
        }
        let retry = self.client.retry_policy().clone();
        loop {
            if !free && !take_retry_or(&retry, &mut self.failures) {
                tracing::warn!("{}: {cause}; no retries left", self.what());
                return Err(Error::Truncated {
                    what: self.what(),
                    received: self.offset,
                    expected: self.size,
                });
            }
            free = false;
            let delay = backoff(retry.base, retry.max_backoff, self.failures.max(1));
            tracing::warn!(
                registry = %self.repo.registry,
                offset_bytes = self.offset,
                size_bytes = self.size,
                "{}: {cause} after {} of {} bytes; continuing from there in {} ms",
                self.what(),
                self.offset,
                self.size,
                delay.as_millis()
            );
            tokio::time::sleep(delay).await;
            self.opened_at = self.offset;
            let range = format!("bytes={}-", self.offset);
            let url = self.url.clone();
            let sent = self
                .client
                .send(&self.repo, &[self.repo.scope("pull")], &url, |http| {
                    http.get(url.clone()).header(header::RANGE, range.as_str())
                })
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) if e.is_transient() => {
                    cause = e.to_string();
                    continue;
                }
                Err(e) => return Err(e),
            };
            match resp.status() {
                StatusCode::PARTIAL_CONTENT => {
                    let start = resp
                        .headers()
                        .get(header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(content_range_start);
                    if start != Some(self.offset) {
                        return Err(Error::Restart {
                            what: self.what(),
                            reason: format!(
                                "the source answered a request from byte {} with another range ({:?})",
                                self.offset,
                                resp.headers().get(header::CONTENT_RANGE)
                            ),
                        });
                    }
                    self.body = Box::pin(resp.bytes_stream());
                    return Ok(());
                }
                StatusCode::OK => {
                    return Err(Error::Restart {
                        what: self.what(),
                        reason: format!(
                            "the source ignores Range (it answered a request from byte {} with the whole blob)",
                            self.offset
                        ),
                    });
                }
                _ => {
                    let e = status_error("GET", &url, resp).await;
                    if !e.is_transient() {
                        return Err(e);
                    }
                    cause = e.to_string();
                }
            }
        }
    }
}

/// The first byte of a `Content-Range: bytes <first>-<last>/<total>`.
fn content_range_start(v: &str) -> Option<u64> {
    let r = v.trim().strip_prefix("bytes")?.trim_start();
    r.split_once('-')?.0.trim().parse().ok()
}

/// An error and its causes, joined (reqwest's own message hides the cause).
fn error_chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}
