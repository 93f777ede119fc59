//! `GET /`: a small server-rendered status page — recent jobs with progress, mirrored images with
//! their trusted digests and copy-ready pull lines, and a search box. No JavaScript.

use std::fmt::Write as _;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Html;
use serde::Deserialize;

use super::{ApiError, AppState, rfc3339};
use crate::{ledger, queue};

/// The search box.
#[derive(Debug, Deserialize)]
pub struct Search {
    q: Option<String>,
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// `GET /?q=…`.
#[utoipa::path(get, path = "/", tag = "status",
    params(("q" = Option<String>, Query, description = "only images whose source or mirror name contains this")),
    responses((status = 200, description = "the status page (HTML)", content_type = "text/html")))]
pub async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(search): Query<Search>,
) -> Result<Html<String>, ApiError> {
    state.authenticate_read(&headers)?;
    let q = search.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let jobs = queue::list(&state.db, None, 20, None).await?;
    let images = ledger::latest(&state.db, q, 100).await?;
    let mut h = String::with_capacity(16 * 1024);
    h.push_str(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>mirror-mirror</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <style>body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}h1{margin:0 0 .2em}\
         table{border-collapse:collapse;width:100%;margin:1em 0}td,th{border-bottom:1px solid #ddd;padding:.35em .5em;text-align:left;vertical-align:top}\
         code{font:12px ui-monospace,monospace;background:#f4f4f4;padding:.1em .3em;word-break:break-all}\
         .succeeded{color:#176f2c}.failed{color:#b3261e}.running{color:#8a5a00}.queued{color:#555}\
         progress{width:8em}form{margin:1em 0}input[type=search]{width:24em;padding:.3em}</style></head><body>",
    );
    let _ = write!(
        h,
        "<h1>mirror-mirror</h1><p>Mirrors go under <code>{}</code>. Every image below was copied digest-exact and verified on the mirror: pull it by the digest shown.</p>",
        esc(&state.config.target.repo())
    );
    let _ = write!(
        h,
        "<form method=\"get\" action=\"/\"><input type=\"search\" name=\"q\" placeholder=\"image name, e.g. kaniko-project/executor\" value=\"{}\"> <button>Search</button></form>",
        esc(q.unwrap_or(""))
    );
    let _ = write!(
        h,
        "<h2>Mirrored images{}</h2>",
        q.map(|q| format!(" matching “{}”", esc(q)))
            .unwrap_or_default()
    );
    if images.is_empty() {
        h.push_str("<p>None yet.</p>");
    } else {
        h.push_str(
            "<table><tr><th>source</th><th>trusted digest</th><th>pull</th><th>verified</th></tr>",
        );
        for r in &images {
            let source = match &r.tag {
                Some(t) => format!("{}:{t}", r.source_repo),
                None => r.source_repo.clone(),
            };
            let pull = match &r.tag {
                Some(t) => format!("docker pull {}:{t}@{}", r.mirror_repo, r.mirror_digest),
                None => format!("docker pull {}@{}", r.mirror_repo, r.mirror_digest),
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>",
                esc(&source),
                esc(&r.source_digest),
                esc(&pull),
                esc(&rfc3339(r.verified_at))
            );
        }
        h.push_str("</table>");
    }
    let drift = ledger::list_drift(&state.db, false, 50, None).await?;
    if !drift.is_empty() {
        h.push_str("<h2>Drift</h2><p>Found by drift watch and not yet resolved (<a href=\"/drift\">details</a>).</p>\
            <table><tr><th>mirror</th><th>what</th><th>mirrored</th><th>policy</th><th>job</th><th>last seen</th></tr>");
        for d in &drift {
            let what = match d.kind.as_str() {
                "upstream_moved" => format!(
                    "upstream moved to <code>{}</code>",
                    esc(d.observed_digest.as_deref().unwrap_or(""))
                ),
                "upstream_gone" => "gone upstream".to_string(),
                _ => format!(
                    "missing on the mirror: <code>{}</code>",
                    esc(d.missing.as_deref().unwrap_or(""))
                ),
            };
            let job = d
                .job_id
                .map(|id| format!("<a href=\"/jobs/{id}\">{id}</a>"))
                .unwrap_or_default();
            let _ = write!(
                h,
                "<tr><td>{}{}</td><td>{what}</td><td><code>{}</code></td><td>{}</td><td>{job}</td><td>{}</td></tr>",
                esc(&d.mirror_repo),
                esc(&d
                    .mirror_tag
                    .as_deref()
                    .map(|t| format!(":{t}"))
                    .unwrap_or_default()),
                esc(&d.recorded_digest),
                esc(&d.policy),
                esc(&rfc3339(d.last_seen_at)),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Recent jobs</h2>");
    if jobs.is_empty() {
        h.push_str("<p>None yet.</p>");
    } else {
        h.push_str("<table><tr><th>id</th><th>state</th><th>source</th><th>progress</th><th>updated</th><th>last error</th></tr>");
        for j in &jobs {
            let progress = if j.bytes_total > 0 {
                format!(
                    "<progress max=\"{}\" value=\"{}\"></progress> {}/{} blobs",
                    j.bytes_total, j.bytes_done, j.blobs_done, j.blobs_total
                )
            } else {
                String::new()
            };
            let _ = write!(
                h,
                "<tr><td><a href=\"/jobs/{id}\">{id}</a></td><td class=\"{st}\">{st}</td><td>{src}</td><td>{progress}</td><td>{up}</td><td>{err}</td></tr>",
                id = j.id,
                st = esc(&j.state),
                src = esc(&j.source),
                up = esc(&rfc3339(j.updated_at)),
                err = esc(j.last_error.as_deref().unwrap_or("")),
            );
        }
        h.push_str("</table>");
    }
    h.push_str(
        "<p><a href=\"/openapi.json\">API</a> · <a href=\"/metrics\">metrics</a></p></body></html>",
    );
    Ok(Html(h))
}
