//! Manifests: HEAD, GET as exact bytes (capped and checked against their digest), PUT.

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};

use super::requests::{Call, read_capped, refused_write, status_error};
use super::{Client, Repo};
use crate::digest::Digest;
use crate::registry::error::{Error, Result};
use crate::registry::manifest::{self, Manifest};

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

impl Client {
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
    ///
    /// A registry with immutable tags (ECR, Harbor) refuses to write a tag again even with the
    /// same digest: when the tag already names `m`, that is success; when it names another
    /// digest, the error says so. A write refused because the repository or its namespace does
    /// not exist says to create it.
    pub async fn put_manifest(&self, repo: &Repo, reference: &str, m: &Manifest) -> Result<()> {
        let err = match self.put_manifest_once(repo, reference, m).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let is_tag = Digest::parse(reference).is_err();
        if !is_tag || err.is_transient() || !matches!(err.status(), Some(400 | 403 | 409 | 412)) {
            return Err(refused_write(repo, err));
        }
        if matches!(
            err.code(),
            Some("MANIFEST_BLOB_UNKNOWN" | "MANIFEST_UNKNOWN" | "BLOB_UNKNOWN")
        ) {
            return Err(err);
        }
        let named = match self.head_manifest(repo, reference).await {
            Ok(Some(h)) => h.digest,
            _ => None,
        };
        if named.as_ref() == Some(&m.digest) {
            tracing::info!(
                registry = %repo.registry,
                "{repo}:{reference} already names {} ({} refused to write it again: {err}); nothing to change",
                m.digest,
                repo.registry
            );
            return Ok(());
        }
        if let Some(other) = named
            && immutable_tag(&err)
        {
            return Err(Error::Refused {
                reason: format!(
                    "{repo}:{reference} is an immutable tag on {} and names {other}, not {}; it cannot be moved: mirror under another tag, or make the tag mutable there ({err})",
                    repo.registry, m.digest
                ),
            });
        }
        Err(refused_write(repo, err))
    }

    async fn put_manifest_once(&self, repo: &Repo, reference: &str, m: &Manifest) -> Result<()> {
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
}

pub(super) fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Whether a refused tag write says the tag is immutable (ECR: `400 TAG_INVALID` "… cannot be
/// overwritten because the repository is immutable"; Harbor: `412` "… configured as immutable").
fn immutable_tag(err: &Error) -> bool {
    let text = err.to_string().to_ascii_lowercase();
    err.code() == Some("TAG_INVALID")
        || err.status() == Some(412)
        || text.contains("immutable")
        || text.contains("cannot be overwritten")
}
