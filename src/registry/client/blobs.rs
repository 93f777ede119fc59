//! Blobs: their size on a registry, and streaming one from a source into an upload session,
//! hashed and counted on the way so a wrong blob is never committed.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode};

use super::requests::{Call, observe, same_host, status_error};
use super::uploads::UploadSession;
use super::{ByteCounter, Client, Repo};
use crate::digest::{Digest, DigestHasher};
use crate::registry::error::{Error, Result};

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
            .check_before_sending(&session.0)
            .await
            .map_err(Error::from)?;
        let http = self.inner.conn.for_registry(&dst.registry)?;
        let mut put_url = session.0.clone();
        put_url
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let body = reqwest::Body::wrap_stream(body);
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
        let resp = sent.map_err(|e| {
            self.inner
                .conn
                .error(&dst.registry, format!("uploading {what} to {dst}"), e)
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
