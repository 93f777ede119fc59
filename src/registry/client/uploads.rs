//! Blob upload sessions: opening one, cross-repository mounts, the session's `Location`, and
//! abandoning one.

use bytes::Bytes;
use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode};

use super::requests::Call;
use super::{Client, Repo};
use crate::digest::Digest;
use crate::registry::error::{Error, Result};

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
}
