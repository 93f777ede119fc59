//! Blob upload sessions: opening one, cross-repository mounts, the session's `Location`,
//! closing one with a small blob's bytes, abandoning one, and uploading in `PATCH` chunks (for registries with a body limit) that resume
//! where the session stands after a failed chunk.

use bytes::{Bytes, BytesMut};
use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode};

use super::blobs::BlobBytes;
use super::requests::{Call, redact_query, refused_write, status_error};
use super::{Client, Repo};
use crate::digest::Digest;
use crate::registry::error::{Error, Result};
use crate::registry::retry::{RESUME_PROGRESS, take_retry_or};

const MIB: u64 = 1024 * 1024;

/// How blobs go up to one registry.
///
/// By default a blob goes up in one streamed `PUT`. A blob larger than `max_body` (or, when only
/// `chunk_size` is set, larger than one chunk) goes up in `PATCH` chunks of `chunk_size` bytes
/// (the last one shorter), then a closing `PUT` with its digest. A registry that answers a `PUT`
/// with `413 Payload Too Large` gets chunks of [`UploadLimits::DEFAULT_CHUNK`] from then on, and a
/// `413` to a chunk halves the chunk size (down to [`UploadLimits::MIN_CHUNK`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadLimits {
    /// Bytes per `PATCH` when uploading in chunks (ECR needs at least 5 MiB for every chunk but
    /// the last; GHCR takes at most 4 MiB per `PATCH`).
    pub chunk_size: Option<u64>,
    /// The largest request body the registry (or a front before it) accepts.
    pub max_body: Option<u64>,
}

impl UploadLimits {
    /// The chunk size when nothing says otherwise: ECR's minimum is 5 MiB, Azure's monolithic
    /// limit about 20 MB.
    pub const DEFAULT_CHUNK: u64 = 8 * MIB;
    /// The smallest chunk size accepted or learned.
    pub const MIN_CHUNK: u64 = 256 * 1024;
    /// The largest chunk size accepted (a chunk is held in memory while it is sent).
    pub const MAX_CHUNK: u64 = 64 * MIB;

    /// Whether the settings make sense; the reason when not.
    pub fn check(&self) -> std::result::Result<(), String> {
        if let Some(c) = self.chunk_size
            && !(Self::MIN_CHUNK..=Self::MAX_CHUNK).contains(&c)
        {
            return Err(format!(
                "a chunk size of {c} bytes is outside {} KiB to {} MiB",
                Self::MIN_CHUNK / 1024,
                Self::MAX_CHUNK / MIB
            ));
        }
        if let Some(m) = self.max_body
            && m < Self::MIN_CHUNK
        {
            return Err(format!(
                "a body limit of {m} bytes is below the smallest chunk ({} KiB)",
                Self::MIN_CHUNK / 1024
            ));
        }
        if let (Some(c), Some(m)) = (self.chunk_size, self.max_body)
            && c > m
        {
            return Err(format!(
                "the chunk size ({c} bytes) is larger than the body limit ({m} bytes)"
            ));
        }
        Ok(())
    }

    /// The chunk size to upload with.
    pub fn chunk(&self) -> u64 {
        self.chunk_size.unwrap_or_else(|| {
            Self::DEFAULT_CHUNK
                .min(self.max_body.unwrap_or(u64::MAX))
                .max(Self::MIN_CHUNK)
        })
    }

    /// Whether a blob of `size` bytes goes up in chunks.
    pub fn chunks(&self, size: u64) -> bool {
        match (self.max_body, self.chunk_size) {
            (Some(m), _) => size > m,
            (None, Some(c)) => size > c,
            (None, None) => false,
        }
    }
}

/// Where an upload session stands: the bytes the registry holds, and where to continue.
struct Status {
    offset: u64,
    url: url::Url,
}

/// Where a blob upload continues (the `Location` of an upload session).
#[derive(Debug, Clone)]
pub struct UploadSession(pub(super) url::Url);

/// The outcome of a cross-repository mount request.
#[derive(Debug)]
pub enum MountOutcome {
    /// The registry linked the blob (201): nothing to upload.
    Mounted,
    /// The registry declined and opened an upload session instead (202).
    Upload(UploadSession),
}

impl Client {
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
            .await
            .map_err(|e| refused_write(repo, e))?;
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

    /// Closes `session` with the whole blob in one `PUT`: a small blob already read and verified.
    pub async fn put_blob_bytes(
        &self,
        dst: &Repo,
        session: &UploadSession,
        digest: &Digest,
        bytes: Bytes,
    ) -> Result<()> {
        let mut put_url = session.0.clone();
        put_url
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let len = bytes.len() as u64;
        let resp = self
            .send(dst, &[dst.scope("pull,push")], &put_url, |http| {
                http.put(put_url.clone())
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_LENGTH, len)
                    .body(bytes.clone())
            })
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(status_error("PUT", &put_url, resp).await);
        }
        Ok(())
    }

    /// Whether a blob of `size` bytes goes up to `repo` in one request (no chunks by its limits).
    pub fn fits_one_request(&self, repo: &Repo, size: u64) -> bool {
        !self.upload_limits(repo).chunks(size)
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

    /// The upload limits in force for `repo`'s registry: configured ones, or the chunk size
    /// learned from a `413`.
    pub(super) fn upload_limits(&self, repo: &Repo) -> UploadLimits {
        let inner = &self.inner;
        let mut limits = inner
            .upload_limits
            .get(&repo.registry)
            .or_else(|| inner.upload_limits.get(repo.api_host()))
            .copied()
            .unwrap_or(inner.default_upload_limits);
        let learned = inner
            .learned_chunks
            .lock()
            .expect("learned chunks poisoned")
            .get(&repo.registry)
            .copied();
        if let Some(learned) = learned {
            let chunk = limits.chunk().min(learned);
            limits.chunk_size = Some(chunk);
            limits.max_body = Some(limits.max_body.unwrap_or(chunk).min(chunk));
        }
        limits
    }

    /// Records that `repo`'s registry refused a body of `refused` bytes (`413`); answers the chunk
    /// size to use from now on, `None` when it cannot get smaller.
    pub(super) fn learn_body_limit(&self, repo: &Repo, refused: u64) -> Option<u64> {
        let current = self.upload_limits(repo);
        let chunk = if current.chunks(refused) {
            // The refused body was a chunk already: halve it.
            (refused / 2).max(UploadLimits::MIN_CHUNK)
        } else {
            current
                .chunk()
                .min(refused / 2)
                .max(UploadLimits::MIN_CHUNK)
        };
        if chunk >= refused {
            return None;
        }
        self.inner
            .learned_chunks
            .lock()
            .expect("learned chunks poisoned")
            .insert(repo.registry.clone(), chunk);
        Some(chunk)
    }

    /// Uploads `size` bytes from `source` into `session` in `PATCH` chunks of `chunk` bytes, then
    /// closes the session with the digest. A chunk that fails (a cut, a 5xx) is resumed where the
    /// session stands (`GET` on the upload URL answers its `Range`); failures that move nothing
    /// spend the operation's retries. The last chunk is complete only once the source's digest is verified.
    pub(super) async fn upload_chunked(
        &self,
        dst: &Repo,
        session: &UploadSession,
        source: &mut BlobBytes,
        size: u64,
        chunk: u64,
    ) -> Result<()> {
        let mut url = session.0.clone();
        let mut start = 0u64;
        let mut spill: Option<Bytes> = None;
        while start < size {
            let want = chunk.min(size - start) as usize;
            let mut buf = BytesMut::with_capacity(want);
            while buf.len() < want {
                let piece = match spill.take() {
                    Some(p) => p,
                    None => match source.next().await? {
                        Some(p) => p,
                        None => break,
                    },
                };
                let take = (want - buf.len()).min(piece.len());
                buf.extend_from_slice(&piece[..take]);
                if take < piece.len() {
                    spill = Some(piece.slice(take..));
                }
            }
            if buf.len() < want {
                return Err(Error::Truncated {
                    what: format!("blob {}", source.digest().short()),
                    received: start + buf.len() as u64,
                    expected: size,
                });
            }
            url = self.patch_resuming(dst, url, start, buf.freeze()).await?;
            start += want as u64;
        }
        // Every byte is sent and verified (the source releases its last bytes only then).
        if let Some(rest) = source.next().await? {
            return Err(Error::SizeMismatch {
                what: format!("blob {}", source.digest().short()),
                expected: size,
                actual: size + rest.len() as u64,
            });
        }
        self.close_upload(dst, url, source.digest(), size).await
    }

    /// Sends `data` as the bytes from `start` of the session at `url`; after a failure asks the
    /// session where it stands and sends the rest from there. Answers the session's next URL.
    async fn patch_resuming(
        &self,
        dst: &Repo,
        mut url: url::Url,
        mut start: u64,
        mut data: Bytes,
    ) -> Result<url::Url> {
        let retry = self.retry_policy().clone();
        let (mut failures, mut free) = (0u32, false);
        loop {
            let err = match self.patch(dst, &url, start, data.clone()).await {
                Ok(next) => return Ok(next),
                Err(e) if e.status() == Some(413) => return Err(e),
                Err(e) if e.is_transient() || e.status() == Some(416) => e,
                Err(e) => return Err(e),
            };
            if !free && !take_retry_or(&retry, &mut failures) {
                return Err(err);
            }
            free = false;
            let delay = retry.delay(failures.max(1), &err);
            tracing::warn!(
                registry = %dst.registry,
                offset_bytes = start,
                "uploading a chunk to {dst} failed ({err}); asking the session where it stands in {} ms",
                delay.as_millis()
            );
            tokio::time::sleep(delay).await;
            let status = match self.upload_status(dst, &url).await {
                Ok(s) => s,
                Err(e) if e.is_transient() => continue,
                // Distribution forgets a session whose last answer was lost (its URL's state
                // no longer matches): only a new session helps.
                Err(e) if matches!(e.status(), Some(400 | 404 | 416)) => {
                    return Err(Error::Restart {
                        what: format!("uploading to {dst}"),
                        reason: format!("the upload session cannot continue ({e})"),
                    });
                }
                Err(e) => return Err(e),
            };
            let end = start + data.len() as u64;
            if status.offset < start || status.offset > end {
                return Err(Error::Restart {
                    what: format!("uploading to {dst}"),
                    reason: format!(
                        "the upload session holds {} bytes, expected {start} to {end}",
                        status.offset
                    ),
                });
            }
            if status.offset - start >= RESUME_PROGRESS.min(end - start) {
                // The failed request moved bytes: continuing costs no retry.
                failures = 0;
                free = true;
            }
            data = data.slice((status.offset - start) as usize..);
            start = status.offset;
            url = status.url;
            if data.is_empty() {
                return Ok(url);
            }
        }
    }

    /// One `PATCH` of `data` at `start`; answers the session's next URL.
    async fn patch(&self, dst: &Repo, url: &url::Url, start: u64, data: Bytes) -> Result<url::Url> {
        let len = data.len() as u64;
        let range = format!("{start}-{}", start + len - 1);
        let resp = self
            .send(dst, &[dst.scope("pull,push")], url, |http| {
                http.patch(url.clone())
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_LENGTH, len)
                    .header(header::CONTENT_RANGE, range.as_str())
                    .body(data.clone())
            })
            .await?;
        // 202 by the specification; ECR may answer 201, some 204.
        if !matches!(
            resp.status(),
            StatusCode::ACCEPTED | StatusCode::CREATED | StatusCode::NO_CONTENT
        ) {
            return Err(status_error("PATCH", url, resp).await);
        }
        next_location(dst, url, &resp)
    }

    /// Where the session at `url` stands (`GET` answers `204` with `Range: 0-<last byte>`).
    async fn upload_status(&self, dst: &Repo, url: &url::Url) -> Result<Status> {
        let resp = self
            .send(dst, &[dst.scope("pull,push")], url, |http| {
                http.get(url.clone())
            })
            .await?;
        if !matches!(resp.status(), StatusCode::NO_CONTENT | StatusCode::OK) {
            return Err(status_error("GET", url, resp).await);
        }
        let range = resp
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::MissingHeader {
                registry: dst.registry.clone(),
                what: "an upload status request".into(),
                header: "Range",
            })?;
        let offset = parse_upload_range(range).ok_or_else(|| {
            Error::Invalid(format!(
                "{} answered an upload status request with an unusable Range {range:?}",
                dst.registry
            ))
        })?;
        Ok(Status {
            offset,
            url: next_location(dst, url, &resp)?,
        })
    }

    /// The closing `PUT` with the digest. When its answer is lost, the blob counts as uploaded if
    /// the target has it at the right size.
    async fn close_upload(
        &self,
        dst: &Repo,
        url: url::Url,
        digest: &Digest,
        size: u64,
    ) -> Result<()> {
        let mut put_url = url;
        put_url
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let sent = self
            .send(dst, &[dst.scope("pull,push")], &put_url, |http| {
                http.put(put_url.clone())
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_LENGTH, 0)
                    .body(Bytes::new())
            })
            .await;
        let err = match sent {
            Ok(resp) if matches!(resp.status(), StatusCode::CREATED | StatusCode::NO_CONTENT) => {
                return Ok(());
            }
            Ok(resp) => status_error("PUT", &put_url, resp).await,
            Err(e) => e,
        };
        if err.is_transient() && self.blob_size(dst, digest).await.ok().flatten() == Some(size) {
            return Ok(());
        }
        Err(err)
    }
}

/// The session URL an upload answer points to: its `Location` (relative or absolute), or the
/// same URL when it names none.
fn next_location(dst: &Repo, base: &url::Url, resp: &reqwest::Response) -> Result<url::Url> {
    match resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(loc) => base.join(loc).map_err(|e| {
            Error::Invalid(format!(
                "{} answered {} with an unusable Location {loc:?}: {e}",
                dst.registry,
                redact_query(base)
            ))
        }),
        None => Ok(base.clone()),
    }
}

/// The bytes an upload session holds from its `Range: 0-<last>` (`0-0` for an empty session, as
/// distribution answers; also `bytes=0-<last>`).
fn parse_upload_range(range: &str) -> Option<u64> {
    let r = range.trim();
    let r = r.strip_prefix("bytes=").unwrap_or(r);
    let (first, last) = r.split_once('-')?;
    if first.trim() != "0" {
        return None;
    }
    let last: u64 = last.trim().parse().ok()?;
    Some(if last == 0 { 0 } else { last + 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_ranges() {
        assert_eq!(parse_upload_range("0-0"), Some(0));
        assert_eq!(parse_upload_range("0-1048575"), Some(1 << 20));
        assert_eq!(parse_upload_range("bytes=0-99"), Some(100));
        assert_eq!(parse_upload_range("5-9"), None);
        assert_eq!(parse_upload_range("x"), None);
    }

    #[test]
    fn limits_decide_chunking() {
        let none = UploadLimits::default();
        assert!(!none.chunks(1 << 30));
        let body = UploadLimits {
            max_body: Some(64 * MIB),
            chunk_size: None,
        };
        assert!(!body.chunks(64 * MIB) && body.chunks(64 * MIB + 1));
        assert_eq!(body.chunk(), UploadLimits::DEFAULT_CHUNK);
        let ghcr = UploadLimits {
            chunk_size: Some(4 * MIB),
            max_body: None,
        };
        assert!(ghcr.chunks(4 * MIB + 1) && !ghcr.chunks(4 * MIB));
        assert_eq!(ghcr.chunk(), 4 * MIB);
        assert!(
            UploadLimits {
                chunk_size: Some(8 * MIB),
                max_body: Some(4 * MIB)
            }
            .check()
            .unwrap_err()
            .contains("larger than the body limit")
        );
        assert!(
            UploadLimits {
                chunk_size: Some(10),
                max_body: None
            }
            .check()
            .is_err()
        );
    }
}
