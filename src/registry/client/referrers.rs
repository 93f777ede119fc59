//! The OCI referrers API.

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};

use super::manifests::MAX_MANIFEST_BYTES;
use super::requests::{Call, read_capped};
use super::{Client, Repo};
use crate::digest::Digest;
use crate::registry::error::Result;
use crate::registry::manifest::Manifest;

impl Client {
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
}
