//! `POST /mirror`: validate, allow-list and map a request, then enqueue it durably.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, AppState, Caller};
use crate::queue::NewJob;
use crate::reference::ImageRef;

/// The request body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MirrorRequest {
    /// The source image: `gcr.io/kaniko-project/executor:v1.8.1`, `nginx`, `repo@sha256:…`.
    pub image: String,
    /// Optional target (repository or repository:tag), which must lie under `MIRROR_TARGET`.
    pub target: Option<String>,
    /// Copy signatures, attestations and other referrers too (default: the service setting).
    pub referrers: Option<bool>,
    /// What drift watch does when the source tag moves: `follow` (mirror the new digest) or `pin`
    /// (keep this one and record the move). Default: `MIRROR_DRIFT_POLICY`.
    #[schema(value_type = Option<String>)]
    pub policy: Option<crate::drift::Policy>,
}

/// What to enqueue for `image` (and an optional `target`), or why not. Shared with the webhook.
pub fn plan(
    state: &AppState,
    image: &str,
    target: Option<&str>,
    requested_by: Value,
) -> Result<NewJob, ApiError> {
    let source = ImageRef::parse_source(image).map_err(|e| {
        ApiError::BadRequest(format!("image {image:?} is not a valid reference: {e}"))
    })?;
    let config = &state.config;
    if !config.allowed_sources.allows(&source) {
        return Err(ApiError::Forbidden(format!(
            "source {} is not in MIRROR_ALLOWED_SOURCES; ask the operator to add {} (or a prefix of it)",
            source.repo_name(),
            source.registry()
        )));
    }
    // A digest-only source with no target tag is written by digest only.
    let (target_repo, target_tag) = match target {
        None => (
            config
                .target
                .repo_for(&source)
                .map_err(ApiError::BadRequest)?,
            source.tag().map(str::to_string),
        ),
        Some(t) => {
            let t_ref = ImageRef::parse(t).map_err(|e| {
                ApiError::BadRequest(format!("target {t:?} is not a valid reference: {e}"))
            })?;
            if t_ref.digest().is_some() {
                return Err(ApiError::BadRequest(format!(
                    "target {t:?} names a digest; name a repository or repository:tag (the digest is the source's)"
                )));
            }
            let repo = t_ref.repo_name();
            if !config.target.contains(&repo) {
                return Err(ApiError::Forbidden(format!(
                    "target {repo} is not under MIRROR_TARGET {}",
                    config.target.repo()
                )));
            }
            let tag = t_ref
                .tag()
                .map(str::to_string)
                .or_else(|| source.tag().map(str::to_string));
            (repo, tag)
        }
    };
    Ok(NewJob {
        source: source.to_string(),
        target_repo,
        target_tag,
        requested_by: requested_by.to_string(),
        max_attempts: config.max_attempts,
        referrers: true,
        policy: None,
        repair: false,
    })
}

/// `POST /mirror` → `202 Accepted` with `Location: /jobs/{id}` and the job.
#[utoipa::path(post, path = "/mirror", tag = "mirrors", request_body = MirrorRequest,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "queued (or the queued/running job for the same source and target); Location: /jobs/{id}"),
        (status = 400, description = "invalid reference, saying which part"),
        (status = 401, description = "missing or unknown bearer token"),
        (status = 403, description = "source not in MIRROR_ALLOWED_SOURCES, or target outside MIRROR_TARGET"),
        (status = 413, description = "body over 64 KiB"),
        (status = 415, description = "not JSON")))]
pub async fn create(
    State(state): State<AppState>,
    Caller(who): Caller,
    ApiJson(req): ApiJson<MirrorRequest>,
) -> Result<Response, ApiError> {
    let mut new = plan(
        &state,
        &req.image,
        req.target.as_deref(),
        json!({ "kind": "token", "name": who }),
    )?;
    new.referrers = req.referrers.unwrap_or(true);
    new.policy = req.policy;
    let (job, created) = state.enqueuer.enqueue(new).await?;
    if created {
        state.wake.notify_one();
        tracing::info!(
            job.id = job.id,
            "job {} queued: {} → {}",
            job.id,
            job.source,
            job.target_repo
        );
    }
    let mut body = super::jobs::view(&job);
    body["deduplicated"] = json!(!created);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/jobs/{}", job.id))],
        Json(body),
    )
        .into_response())
}
