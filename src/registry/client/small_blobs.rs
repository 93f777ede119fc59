//! Small blobs read whole (an image config, to learn its platform; a small blob the copy puts with
//! one request), verified against their size and digest, never read past their size.

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;

use super::requests::status_error;
use super::{Client, Repo};
use crate::digest::Digest;
use crate::registry::error::{Error, Result};

/// The most bytes a blob read whole may have.
pub const MAX_SMALL_BLOB: u64 = 4 * 1024 * 1024;

impl Client {
    /// GETs blob `digest` (`size` bytes, at most [`MAX_SMALL_BLOB`]) from `repo` whole, checked
    /// against its size and digest.
    pub async fn get_small_blob(&self, repo: &Repo, digest: &Digest, size: u64) -> Result<Bytes> {
        let what = format!("blob {}@{}", repo, digest.short());
        if size > MAX_SMALL_BLOB {
            return Err(Error::Invalid(format!(
                "{what} is {size} bytes, more than the {MAX_SMALL_BLOB} read whole"
            )));
        }
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
                    let mut body = BytesMut::with_capacity(size as usize);
                    let mut resp = resp;
                    while let Some(chunk) = resp.chunk().await.map_err(|_| Error::Truncated {
                        what: what.clone(),
                        received: body.len() as u64,
                        expected: size,
                    })? {
                        if (body.len() + chunk.len()) as u64 > size {
                            return Err(Error::SizeMismatch {
                                what,
                                expected: size,
                                actual: (body.len() + chunk.len()) as u64,
                            });
                        }
                        body.extend_from_slice(&chunk);
                    }
                    if (body.len() as u64) < size {
                        return Err(Error::Truncated {
                            what,
                            received: body.len() as u64,
                            expected: size,
                        });
                    }
                    let body = body.freeze();
                    let actual = Digest::of(digest.algorithm(), &body);
                    if &actual != digest {
                        return Err(Error::DigestMismatch {
                            what,
                            expected: digest.clone(),
                            actual,
                        });
                    }
                    Ok(body)
                }
            })
            .await
    }
}
