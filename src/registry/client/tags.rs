//! Tag lists: `GET /v2/<name>/tags/list`, following `Link` pages within limits.

use std::collections::HashSet;

use reqwest::StatusCode;
use reqwest::header;

use super::requests::{read_capped, status_error};
use super::{Client, Repo};
use crate::reference::ImageRef;
use crate::registry::error::{Error, Result};

/// Most tags [`Client::list_tags`] reads from one repository.
pub const MAX_TAGS: usize = 100_000;

/// Most pages [`Client::list_tags`] reads from one repository (a registry that pages by 100, as
/// most do at most, gives [`MAX_TAGS`] in this many).
pub const MAX_TAG_PAGES: usize = 1_000;

/// Largest page of a tag list accepted (as for a manifest).
pub const MAX_TAG_PAGE_BYTES: usize = 4 * 1024 * 1024;

impl Client {
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
}

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
