//! `POST /mirror`: validate, allow-list and map a request, then enqueue it durably.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, AppState, Caller};
use crate::queue::{Dedupe, NewJob};
use crate::reference::ImageRef;

/// The request body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MirrorRequest {
    /// The source image: `gcr.io/kaniko-project/executor:v1.8.1`, `nginx`, `repo@sha256:…`.
    #[schema(
        pattern = "^(?:[a-z][a-z0-9]{0,15}(?:[.-][a-z0-9]{1,14}){0,3}(?::[1-9][0-9]{0,3})?/)?[a-z0-9]+(?:[_-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*){0,3}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})?(?:@sha256:[a-f0-9]{64})?$",
        max_length = 200
    )]
    pub image: String,
    /// Optional target (repository or repository:tag), which must lie under `MIRROR_TARGET`.
    #[schema(
        pattern = "^(?:[a-z][a-z0-9]{0,15}(?:[.-][a-z0-9]{1,14}){0,3}(?::[1-9][0-9]{0,3})?/)?[a-z0-9]+(?:[_-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*){0,3}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})?$",
        max_length = 200
    )]
    pub target: Option<String>,
    /// Copy signatures, attestations and other referrers too (default: the service setting).
    pub referrers: Option<bool>,
    /// What drift watch does when the source tag moves: `follow` (mirror the new digest) or `pin`
    /// (keep this one and record the move). Default: `MIRROR_DRIFT_POLICY`.
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
            // A name of the default mapping is reserved for its own source, used or not.
            if let Some(owner) = config.target.source_of(&repo)
                && owner != source.repo_name()
            {
                return Err(ApiError::Conflict(format!(
                    "target {repo} is where {owner} is mirrored; {} cannot be written there (name another target)",
                    source.repo_name()
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
        // A request that names a digest asked for that image: drift watch keeps it there
        // unless the request says `"policy": "follow"`.
        policy: source.digest().map(|_| crate::drift::Policy::Pin),
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
        (status = 409, description = "the target repository belongs to another source (it was used for it first, or it is where the default mapping puts that source)"),
        (status = 413, description = "body over 64 KiB"),
        (status = 415, description = "not JSON"),
        (status = 422, description = "JSON that does not fit the body: an unknown field, a wrong type, a missing `image`")))]
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
    new.policy = req.policy.or(new.policy);
    let queued = state.enqueuer.enqueue(new).await?;
    let (job, created) = (&queued.job, queued.created());
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
    let mut body = super::jobs::view(job);
    body["deduplicated"] = json!(!matches!(queued.dedupe, Dedupe::New));
    // How the request met the live jobs: `new`, `joined` (same job, same options), `merged`
    // (same queued job, options widened: referrers on, this request's policy), `queued_after`
    // (the running job was already pinned to an older digest or asked for less).
    body["dedupe"] = json!(queued.dedupe.as_str());
    if let Dedupe::QueuedAfter(id) = queued.dedupe {
        body["queued_after"] = json!(id);
    }
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/jobs/{}", job.id))],
        Json(body),
    )
        .into_response())
}
