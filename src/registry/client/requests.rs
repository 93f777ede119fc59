//! Sending requests: authentication on a 401, rate-limit budgets, retries of transient failures,
//! and the registry's error answers turned into [`Error::Status`].

use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode};

use super::{Client, Repo};
use crate::registry::auth::{Challenge, read_small_body};
use crate::registry::budget::Ticket;
use crate::registry::error::{Error, Result};
use crate::registry::retry::parse_retry_after;

/// One request for [`Client::request`].
pub(super) struct Call<'a> {
    pub(super) what: String,
    pub(super) repo: &'a Repo,
    pub(super) scopes: &'a [String],
    pub(super) method: Method,
    pub(super) url: url::Url,
    pub(super) headers: HeaderMap,
    pub(super) body: Option<Bytes>,
    /// Statuses that end the request; any other is an error (retried when transient).
    pub(super) ok: &'a [StatusCode],
}

impl Client {
    /// Sends one request built by `build`, authenticating as the registry asks: on a 401 it learns
    /// the challenge (or drops a stale token), gets fresh credentials, and sends once more.
    pub(super) async fn send(
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
    pub(super) async fn send_metered(
        &self,
        repo: &Repo,
        scopes: &[String],
        url: &url::Url,
        metered: bool,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let inner = &self.inner;
        inner
            .network
            .check_before_sending(url)
            .await
            .map_err(Error::from)?;
        let http = inner.conn.for_registry(&repo.registry)?;
        let same_host = same_host(url, repo.api_host());
        let mut authz = if same_host {
            inner
                .auth
                .authorization(&http, &inner.retry, &repo.registry, scopes)
                .await?
        } else {
            None
        };
        let mut retried_auth = false;
        loop {
            let ticket = inner.budgets.acquire(&repo.registry, metered).await?;
            let mut req = build(&http);
            if let Some(a) = &authz {
                req = req.header(header::AUTHORIZATION, a);
            }
            let (http, req) = req.build_split();
            let context = || format!("{} {}", repo, redact_query(url));
            let req = req.map_err(|e| inner.conn.error(&repo.registry, context(), e))?;
            let method = req.method().clone();
            let sent_at = Instant::now();
            let resp = http
                .execute(req)
                .await
                .map_err(|e| inner.conn.error(&repo.registry, context(), e))?;
            timeline(&method, url, resp.status(), sent_at);
            crate::metrics::METRICS.registry_request(&repo.registry, resp.status().as_u16());
            observe(ticket, &resp, repo)?;
            if resp.status() == StatusCode::UNAUTHORIZED
                && same_host
                && retried_auth
                && let Some(reason) = inner.auth.refusal(&repo.registry, scopes)
            {
                // Read as a stranger because the stored credentials are the target's: say so.
                return Err(Error::Auth {
                    registry: repo.registry.clone(),
                    reason,
                    transient: false,
                });
            }
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
                .authorization(&http, &inner.retry, &repo.registry, scopes)
                .await?;
            if authz.is_none() {
                return Ok(resp);
            }
        }
    }

    /// Sends `call` with retries of transient failures.
    pub(super) async fn request(&self, call: Call<'_>) -> Result<reqwest::Response> {
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
}

/// When this process sent its first request: the zero of the request timeline.
static TIMELINE_ZERO: OnceLock<Instant> = OnceLock::new();

/// One line of the request timeline (`MIRROR_LOG=mirror_mirror::timeline=trace`): when a request
/// left and how long until its answer's headers came back, in milliseconds from the first request
/// of the process. A streamed body (a blob GET) keeps flowing after this line.
pub(super) fn timeline(method: &Method, url: &url::Url, status: StatusCode, sent_at: Instant) {
    let zero = *TIMELINE_ZERO.get_or_init(|| sent_at);
    tracing::trace!(
        target: "mirror_mirror::timeline",
        start_ms = sent_at.saturating_duration_since(zero).as_millis() as u64,
        duration_ms = sent_at.elapsed().as_millis() as u64,
        status = status.as_u16(),
        "{method} {}:{}{}",
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0),
        url.path()
    );
}

/// Applies an answer to its budget (answers from another host, such as object storage after a
/// redirect, say nothing about the registry's limits); a throttling answer that paused the budget
/// for longer than a request waits becomes [`Error::RateLimited`].
pub(super) fn observe(ticket: Ticket, resp: &reqwest::Response, repo: &Repo) -> Result<()> {
    if !same_host(resp.url(), repo.api_host()) {
        return Ok(());
    }
    match ticket.observe(resp.status(), resp.headers()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub(super) fn same_host(url: &url::Url, host: &str) -> bool {
    let Some(h) = url.host_str() else {
        return false;
    };
    let with_port = match url.port() {
        Some(p) => format!("{h}:{p}"),
        None => h.to_string(),
    };
    with_port.eq_ignore_ascii_case(host)
}

/// Upload URLs carry session state in the query; logs and errors need only the path.
pub(super) fn redact_query(url: &url::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}

/// Reads a body of at most `limit` bytes; stops reading at `limit + 1`.
pub(super) async fn read_capped(
    mut resp: reqwest::Response,
    limit: usize,
    what: &str,
) -> Result<Bytes> {
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
pub(super) async fn status_error(method: &str, url: &url::Url, resp: reqwest::Response) -> Error {
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
        // A HEAD has no body to say why; a 400 to one is most often the name itself.
        _ if method == "HEAD" && status == 400 => (
            None,
            "no reason given; a registry that takes only namespace/repo names (Docker Hub, Quay, ACR) answers this to a deeper name: use the flat layout (MIRROR_TARGET_LAYOUT=flat, copy --layout flat)".to_string(),
        ),
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

/// A write to `repo` refused because the repository or its namespace does not exist (ECR
/// repositories, Harbor projects, ACR and GAR namespaces are not created by a push; Docker Hub
/// and others then answer "requested access to the resource is denied") says to create it;
/// other errors pass unchanged.
pub(super) fn refused_write(repo: &Repo, err: Error) -> Error {
    let text = err.to_string().to_ascii_lowercase();
    // Missing content is another story (the copy writes it again).
    if err
        .code()
        .is_some_and(|c| c.starts_with("BLOB_") || c.starts_with("MANIFEST_"))
    {
        return err;
    }
    let names_a_place = ["repository", "project", "namespace"]
        .iter()
        .any(|w| text.contains(w));
    let missing = match err.status() {
        Some(404) => {
            err.code() == Some("NAME_UNKNOWN")
                || (names_a_place
                    && (text.contains("does not exist") || text.contains("not found")))
        }
        Some(401 | 403) => {
            matches!(err.code(), Some("DENIED" | "UNAUTHORIZED" | "NAME_UNKNOWN"))
                || text.contains("denied")
                || text.contains("does not exist")
        }
        _ => false,
    };
    if !missing {
        return err;
    }
    let create = match repo.name.split_once('/') {
        Some((namespace, _)) => format!("namespace {namespace} (or repository {})", repo.name),
        None => format!("repository {}", repo.name),
    };
    Error::Refused {
        reason: format!(
            "{} refused to write {repo} ({err}): create {create} on {} first (ECR, Harbor, ACR and GAR do not create it on push), and check that the credentials for {} may push there",
            repo.registry, repo.registry, repo.registry
        ),
    }
}
