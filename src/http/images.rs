//! `GET /images/{name}` and `GET /digests/{digest}`: the trusted digests in the ledger.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, AppState, rfc3339};
use crate::digest::Digest;
use crate::reference::ImageRef;
use crate::store::{Drift, Record, Subset};

fn entry(r: &Record, drift: &[Drift]) -> Value {
    let platforms: Vec<Value> = r
        .manifests
        .iter()
        .filter(|m| {
            m.get("platform")
                .is_some_and(|p| !p.as_str().unwrap_or("").starts_with("unknown/"))
        })
        .map(|m| json!({ "platform": m["platform"], "digest": m["digest"] }))
        .collect();
    let referrers: Vec<Value> = r
        .manifests
        .iter()
        .filter(|m| m.get("referrer_of").is_some())
        .cloned()
        .collect();
    let mut e = json!({
        "tag": r.tag,
        "mirror_tag": mirror_tag(r),
        "referrers": referrers,
        "digest": r.source_digest,
        "source": match &r.tag { Some(t) => format!("{}:{t}", r.source_repo), None => format!("{}@{}", r.source_repo, r.source_digest) },
        "mirror": r.mirror_repo,
        "pull": {
            "by_tag": mirror_tag(r).map(|t| format!("{}:{t}@{}", r.mirror_repo, r.mirror_digest)),
            "by_digest": format!("{}@{}", r.mirror_repo, r.mirror_digest),
        },
        "media_type": r.media_type,
        "platforms": platforms,
        "size_bytes": r.size_bytes,
        "requested_by": r.requested_by,
        "job_id": r.job_id,
        "verified_at": rfc3339(r.verified_at),
        "policy": r.policy,
        // Open drift of this tag (or digest-only mirror) on this mirror: empty when in sync.
        "drift": drift
            .iter()
            .filter(|d| {
                d.mirror_repo == r.mirror_repo
                    && d.mirror_tag.as_deref() == mirror_tag(r)
                    && (d.mirror_tag.is_some() || d.recorded_digest == r.source_digest)
            })
            .map(super::drift::view)
            .collect::<Vec<_>>(),
        "subset": r.subset.is_some(),
    });
    if let Some(s) = &r.subset {
        subset(&mut e, r, s);
    }
    e
}

/// What a platform subset's entry adds: the source index it was cut from (never written to the
/// mirror), the children copied (their platforms are in `platforms` too) with a pull line each by
/// its official digest, and whether the digest the tag names is an official one.
fn subset(e: &mut Value, r: &Record, s: &Subset) {
    e["source_index_digest"] = json!(r.source_digest);
    e["children"] = s
        .children
        .iter()
        .map(|c| {
            json!({
                "platform": c.platform,
                "digest": c.digest,
                "attestations": c.attestations,
                "pull": format!("{}@{}", r.mirror_repo, c.digest),
            })
        })
        .collect();
    e["index_rebuilt"] = json!(s.index_rebuilt());
    e["mirror_digest"] = json!(r.mirror_digest);
    e["mirror_digest_official"] = json!(!s.index_rebuilt());
    e["note"] = json!(match s.index_rebuilt() {
        false => format!(
            "only {} of {}@{} was mirrored: the mirror names that child, under its official digest {}",
            s.platforms.join(", "),
            r.source_repo,
            r.source_digest,
            r.mirror_digest
        ),
        true => format!(
            "only {} of {}@{} were mirrored, each child under its official digest; the tag names an index rebuilt from them, {}, which is NOT an official digest",
            s.platforms.join(", "),
            r.source_repo,
            r.source_digest,
            r.mirror_digest
        ),
    });
}

/// The tag on the target: the request's own, or the source's.
fn mirror_tag(r: &Record) -> Option<&str> {
    r.mirror_tag.as_deref().or(r.tag.as_deref())
}

/// `GET /images/{name}` (every tag) or `GET /images/{name}:{tag}` (one tag, with its history).
/// `name` is a source repository (short Docker Hub names too) or a mirror repository.
#[utoipa::path(get, path = "/images/{*name}", tag = "ledger",
    params(("name" = String, Path, pattern = "^(?:[a-z][a-z0-9]{0,15}(?:[.-][a-z0-9]{1,14}){0,3}(?::[1-9][0-9]{0,3})?/)?[a-z0-9]+(?:[_-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*){0,3}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})?$", max_length = 200, description = "source or mirror repository, optionally :tag")),
    responses((status = 200, description = "each mirrored tag with its trusted digest and pull lines; with :tag, its history"),
        (status = 400, description = "not an image name"), (status = 404, description = "never mirrored")))]
pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    state.authenticate_read(&headers)?;
    let key = format!("images/{name}");
    let version = state.store.versions().ledger();
    if let Some(kept) = kept(&state, &headers, &key, version) {
        return Ok(kept);
    }
    let body = lookup(&state, &name).await?;
    Ok(answer(&state, &key, version, &body))
}

/// The answer kept for a lookup, unless the client asks for a fresh one (`Cache-Control:
/// no-cache`, as after a copy it was told of).
fn kept(
    state: &AppState,
    headers: &HeaderMap,
    key: &str,
    version: Option<u64>,
) -> Option<Response> {
    let fresh = headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"));
    if fresh {
        return None;
    }
    let body = state.reads.get(key, version)?;
    crate::metrics::METRICS.read_cache_hits.add(1);
    Some(([(CONTENT_TYPE, "application/json")], body).into_response())
}

/// The answer built for a lookup from the ledger at `version`, kept for the next ones.
fn answer(state: &AppState, key: &str, version: Option<u64>, body: &Value) -> Response {
    crate::metrics::METRICS.read_cache_misses.add(1);
    let bytes = Bytes::from(serde_json::to_vec(body).expect("JSON values serialize"));
    state.reads.put(key, version, bytes.clone());
    ([(CONTENT_TYPE, "application/json")], bytes).into_response()
}

/// What `GET /images/{name}` answers, from the ledger.
async fn lookup(state: &AppState, name: &str) -> Result<Value, ApiError> {
    let reference = ImageRef::parse(name)
        .map_err(|e| ApiError::BadRequest(format!("{name:?} is not an image name: {e}")))?;
    if reference.digest().is_some() {
        return Err(ApiError::BadRequest(
            "to look up a digest, use GET /digests/{digest}".into(),
        ));
    }
    let repo = reference.repo_name();
    let drift = match state.drift.maybe_open() {
        true => state.store.open_drift(&repo).await?,
        false => Vec::new(),
    };
    match reference.tag() {
        Some(tag) => {
            let records = state.store.by_repo_tag(&repo, tag).await?;
            let Some(current) = records.first() else {
                return Err(ApiError::NotFound(format!(
                    "{repo}:{tag} has never been mirrored"
                )));
            };
            let mut body = entry(current, &drift);
            body["name"] = json!(repo);
            // A source tag may be mirrored under several names: each one's current record.
            let mut mirrors: BTreeMap<(String, Option<String>), Value> = BTreeMap::new();
            for r in &records {
                mirrors
                    .entry((r.mirror_repo.clone(), mirror_tag(r).map(str::to_string)))
                    .or_insert_with(|| entry(r, &drift));
            }
            body["mirrors"] = mirrors.into_values().collect();
            body["history"] = records.iter().map(|r| entry(r, &[])).collect();
            Ok(body)
        }
        None => {
            let records = state.store.by_repo(&repo).await?;
            if records.is_empty() {
                return Err(ApiError::NotFound(format!(
                    "{repo} has never been mirrored"
                )));
            }
            // Newest first: the first record of each tag on each mirror is what that tag is now
            // (one source tag mirrored under two names is two entries).
            let mut tags: BTreeMap<(String, String), Value> = BTreeMap::new();
            let mut digests = Vec::new();
            for r in &records {
                match mirror_tag(r) {
                    Some(t) => {
                        tags.entry((t.to_string(), r.mirror_repo.clone()))
                            .or_insert_with(|| entry(r, &drift));
                    }
                    None => digests.push(entry(r, &drift)),
                }
            }
            Ok(json!({
                "name": repo,
                "source": records[0].source_repo,
                "mirror": records[0].mirror_repo,
                "tags": tags.into_values().collect::<Vec<_>>(),
                "digests": digests,
            }))
        }
    }
}

/// `GET /digests/{digest}`: which sources and mirrors carry this digest, since when.
#[utoipa::path(get, path = "/digests/{digest}", tag = "ledger",
    params(("digest" = String, Path, pattern = "^sha256:[a-f0-9]{64}$", description = "sha256:…")),
    responses((status = 200, description = "the records carrying it, as image or platform manifest"),
        (status = 400, description = "not a digest"), (status = 404, description = "never mirrored here")))]
pub async fn digest(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    state.authenticate_read(&headers)?;
    let d = Digest::parse(&digest)
        .map_err(|e| ApiError::BadRequest(format!("{digest:?} is not a digest: {e}")))?;
    let key = format!("digests/{d}");
    let version = state.store.versions().ledger();
    if let Some(kept) = kept(&state, &headers, &key, version) {
        return Ok(kept);
    }
    let records = state.store.by_digest(&d.to_string()).await?;
    if records.is_empty() {
        return Err(ApiError::NotFound(format!(
            "{d} is not in the ledger: it was never mirrored here"
        )));
    }
    let body = json!({
        "digest": d.to_string(),
        "first_verified_at": rfc3339(records[0].verified_at),
        "records": records.iter().map(|r| {
            let mut e = entry(r, &[]);
            let d = d.to_string();
            e["as"] = json!(match (&r.subset, d == r.mirror_digest, d == r.source_digest) {
                (_, true, _) => "image",
                (Some(_), false, true) => "source index (not on the mirror: a platform subset)",
                (None, false, true) => "image",
                _ => "platform manifest",
            });
            e
        }).collect::<Vec<_>>(),
    });
    Ok(answer(&state, &key, version, &body))
}
