//! `POST /mirror`: validate, allow-list and map a request, then enqueue it durably.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, AppState, Caller};
use crate::mapping::Target;
use crate::reference::ImageRef;
use crate::store::{Dedupe, EnqueueError, Enqueued, NewJob, NewRequest, Platforms};

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
    /// Optional target (repository or repository:tag), which must lie under one of the targets
    /// (`MIRROR_TARGET`, `MIRROR_TARGETS`); then the request goes there only.
    #[schema(
        pattern = "^(?:[a-z][a-z0-9]{0,15}(?:[.-][a-z0-9]{1,14}){0,3}(?::[1-9][0-9]{0,3})?/)?[a-z0-9]+(?:[_-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*){0,3}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})?$",
        max_length = 200
    )]
    pub target: Option<String>,
    /// The named targets (`MIRROR_TARGETS`) to mirror to; default: every one.
    #[schema(max_items = 32, value_type = Option<Vec<String>>)]
    pub targets: Option<Vec<TargetName>>,
    /// Copy signatures, attestations and other referrers too (default: the service setting).
    pub referrers: Option<bool>,
    /// What drift watch does when the source tag moves: `follow` (mirror the new digest) or `pin`
    /// (keep this one and record the move). Default: `MIRROR_DRIFT_POLICY`.
    pub policy: Option<crate::drift::Policy>,
    /// Queue nothing: answer `200` with what a copy would do (manifests to push, blobs to upload,
    /// mount or skip, bytes), found by reading the source and `HEAD`s on the target only.
    pub dry_run: Option<bool>,
    /// Copy only these platforms of an index (`os/arch[/variant]`: `linux/amd64`, `linux/arm/v7`),
    /// each child under its official digest, with its attestations. One platform: the tag names
    /// that child; several: an index rebuilt from them (its digest is not an official one).
    /// Default: every platform, the official index.
    #[schema(example = json!(["linux/amd64"]))]
    pub platforms: Option<Vec<String>>,
}

/// The platforms a request lists (`what` names the list in messages), checked and as the store
/// keeps them; none for the whole image.
pub fn platforms(what: &str, list: Option<&[String]>) -> Result<Option<Platforms>, ApiError> {
    let Some(list) = list else { return Ok(None) };
    let specs = crate::registry::platforms::parse_list(what, list).map_err(ApiError::BadRequest)?;
    Ok(Platforms::new(specs.iter().map(ToString::to_string)))
}

/// A target's name in a request.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[schema(pattern = "^[a-z0-9_-]{1,32}$")]
#[serde(transparent)]
pub struct TargetName(pub String);

/// How long a dry run of `POST /mirror` may take before it answers 503.
pub const DRY_RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `"dry_run": true`: the plan of the copy the request would queue, now, bounded by
/// [`DRY_RUN_TIMEOUT`].
async fn dry_run(state: &AppState, new: &NewJob) -> Result<Value, ApiError> {
    let source = ImageRef::parse_source(&new.source)
        .map_err(|e| ApiError::BadRequest(format!("image {:?}: {e}", new.source)))?;
    let target = ImageRef::parse(&new.target_repo)
        .map_err(|e| ApiError::BadRequest(format!("target {:?}: {e}", new.target_repo)))?
        .with_tag(new.target_tag.clone());
    let options = crate::registry::CopyOptions {
        referrers: false,
        ..Default::default()
    };
    let specs: Vec<crate::registry::platforms::PlatformSpec> = new
        .platforms
        .iter()
        .flat_map(|p| p.names())
        .map(|p| p.parse().map_err(ApiError::BadRequest))
        .collect::<Result<_, _>>()?;
    let plan = async {
        match specs.is_empty() {
            true => crate::registry::dry_run(&state.client, &source, &target, &options).await,
            false => {
                crate::registry::copy::copy_platforms(
                    &state.client,
                    &source,
                    &target,
                    &options,
                    &specs,
                    Default::default(),
                    true,
                )
                .await
            }
        }
    };
    let planned = tokio::time::timeout(DRY_RUN_TIMEOUT, plan)
    .await
    .map_err(|_| {
        ApiError::Unavailable(format!(
            "the dry run of {source} did not finish within {} s (a slow or throttling registry); try again, or run `mirror-mirror copy --dry-run` where it can take longer",
            DRY_RUN_TIMEOUT.as_secs()
        ))
    })?;
    let plan = planned.map_err(|e| {
        if e.is_transient() {
            ApiError::Unavailable(format!("the dry run of {source} could not finish now: {e}"))
        } else {
            ApiError::Unprocessable(format!("a copy of {source} would fail: {e}"))
        }
    })?;
    tracing::info!(
        "dry run {} → {}: {} manifest(s) to push, blobs {} to upload / {} to mount / {} there",
        plan.source,
        plan.target,
        plan.manifests_pushed,
        plan.blobs_uploaded,
        plan.blobs_mounted,
        plan.blobs_skipped
    );
    Ok(serde_json::to_value(&plan).map_err(anyhow::Error::from)?)
}

/// What to enqueue for `image`: one job per target `targets` names (all when `None`), or the
/// one job `target` (an explicit repository under a target) asks for; or why not. Shared with
/// the webhook.
pub fn plan(
    state: &AppState,
    image: &str,
    target: Option<&str>,
    targets: Option<&[String]>,
    requested_by: Value,
) -> Result<NewRequest, ApiError> {
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
    let job = |target_repo: String, target_tag: Option<String>| NewJob {
        source: source.to_string(),
        target_repo,
        target_tag,
        requested_by: requested_by.clone(),
        max_attempts: config.max_attempts,
        referrers: true,
        // A request that names a digest asked for that image: drift watch keeps it there
        // unless the request says `"policy": "follow"`.
        policy: source.digest().map(|_| crate::drift::Policy::Pin),
        repair: false,
        platforms: None,
    };
    let jobs = match target {
        // A digest-only source with no target tag is written by digest only.
        None => config
            .targets
            .select(targets)
            .map_err(ApiError::BadRequest)?
            .into_iter()
            .map(|t: &Target| {
                let repo = t.prefix.repo_for(&source).map_err(ApiError::BadRequest)?;
                Ok((t.name.clone(), job(repo, source.tag().map(str::to_string))))
            })
            .collect::<Result<Vec<_>, ApiError>>()?,
        Some(t) => {
            if targets.is_some() {
                return Err(ApiError::BadRequest(
                    "give \"target\" (one repository) or \"targets\" (names of configured targets), not both".into(),
                ));
            }
            let t_ref = ImageRef::parse(t).map_err(|e| {
                ApiError::BadRequest(format!("target {t:?} is not a valid reference: {e}"))
            })?;
            if t_ref.digest().is_some() {
                return Err(ApiError::BadRequest(format!(
                    "target {t:?} names a digest; name a repository or repository:tag (the digest is the source's)"
                )));
            }
            let repo = t_ref.repo_name();
            let Some(under) = config.targets.containing(&repo) else {
                return Err(ApiError::Forbidden(format!(
                    "target {repo} is not under {} {}",
                    if config.targets.iter().count() == 1 {
                        "MIRROR_TARGET"
                    } else {
                        "any of MIRROR_TARGETS:"
                    },
                    config.targets.repos()
                )));
            };
            // A name of the default mapping is reserved for its own source, used or not.
            if let Some(owner) = under.prefix.source_of(&repo)
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
            vec![(under.name.clone(), job(repo, tag))]
        }
    };
    Ok(NewRequest {
        source: source.to_string(),
        requested_by,
        jobs,
    })
}

/// A target's answer in a request's reply: the job (with how the request met it), or why the
/// target refused it.
fn target_view(target: &str, answer: &Result<Enqueued, EnqueueError>) -> Value {
    match answer {
        Ok(q) => {
            let mut body = super::jobs::view(&q.job);
            body["target_name"] = json!(target);
            body["deduplicated"] = json!(!matches!(q.dedupe, Dedupe::New));
            // How the request met the live jobs: `new`, `joined` (same job, same options),
            // `merged` (same queued job, options widened: referrers on, this request's policy),
            // `queued_after` (the running job was already pinned to an older digest or asked
            // for less).
            body["dedupe"] = json!(q.dedupe.as_str());
            if let Dedupe::QueuedAfter(id) = q.dedupe {
                body["queued_after"] = json!(id);
            }
            body
        }
        Err(e) => json!({
            "target_name": target,
            "error": { "code": "conflict", "message": e.to_string() },
        }),
    }
}

/// `POST /mirror` → `202 Accepted` with `Location: /jobs/{id}` and the job.
#[utoipa::path(post, path = "/mirror", tag = "mirrors", request_body = MirrorRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "with \"dry_run\": true: nothing queued; what a copy would do (manifests_pushed, blobs_uploaded/mounted/skipped, bytes_moved, \"dry_run\": true)"),
        (status = 202, description = "queued (or the queued/running job for the same source and target); one target: the job, Location: /jobs/{id}; several: `request_id` and each target's job (`target_name`, `dedupe`) or refusal, Location: /requests/{id}"),
        (status = 400, description = "invalid reference, saying which part; an unknown target name (naming the known ones); both `target` and `targets`; a `platforms` entry that is not os/arch[/variant], naming it"),
        (status = 401, description = "missing or unknown bearer token"),
        (status = 403, description = "source not in MIRROR_ALLOWED_SOURCES, or target outside every target prefix"),
        (status = 409, description = "(every target's) target repository belongs to another source (it was used for it first, or it is where the default mapping puts that source)"),
        (status = 413, description = "body over 64 KiB"),
        (status = 415, description = "not JSON"),
        (status = 422, description = "JSON that does not fit the body: an unknown field, a wrong type, a missing `image`; with \"dry_run\": true, also: the copy would fail (the source does not exist, a manifest is refused), saying why"),
        (status = 503, description = "dry run: a registry could not be read now, or the plan took over 60 s")))]
pub async fn create(
    State(state): State<AppState>,
    Caller(who): Caller,
    ApiJson(req): ApiJson<MirrorRequest>,
) -> Result<Response, ApiError> {
    let mut request = plan(
        &state,
        &req.image,
        req.target.as_deref(),
        req.targets
            .as_ref()
            .map(|t| t.iter().map(|n| n.0.clone()).collect::<Vec<_>>())
            .as_deref(),
        json!({ "kind": "token", "name": who }),
    )?;
    let platforms = platforms("platforms", req.platforms.as_deref())?;
    for (_, new) in &mut request.jobs {
        new.referrers = req.referrers.unwrap_or(true);
        new.policy = req.policy.or(new.policy);
        new.platforms = platforms.clone();
    }
    if req.dry_run == Some(true) {
        let body = match request.jobs.as_slice() {
            [(_, new)] => dry_run(&state, new).await?,
            several => {
                let mut plans = Vec::new();
                for (target, new) in several {
                    let mut plan = dry_run(&state, new).await?;
                    plan["target_name"] = json!(target);
                    plans.push(plan);
                }
                json!({ "dry_run": true, "targets": plans })
            }
        };
        return Ok((StatusCode::OK, Json(body)).into_response());
    }
    let several = request.jobs.len() > 1;
    let queued = state.enqueuer.enqueue(request).await?;
    for (target, q) in queued
        .jobs
        .iter()
        .filter_map(|(t, q)| q.as_ref().ok().map(|q| (t, q)))
    {
        if q.created() {
            tracing::info!(
                job.id = q.job.id,
                request.id = queued.id,
                "job {} queued: {} → {} (target {target})",
                q.job.id,
                q.job.source,
                q.job.target_repo
            );
        }
    }
    let Some(request_id) = queued.id else {
        // Every target refused it: the first refusal says why.
        let refusal = queued
            .jobs
            .into_iter()
            .find_map(|(_, q)| q.err())
            .expect("a request with no job has a refusal");
        return Err(refusal.into());
    };
    if !several {
        let (target, answer) = &queued.jobs[0];
        let mut body = target_view(target, answer);
        body["request_id"] = json!(request_id);
        let id = body["id"].as_i64().unwrap_or_default();
        return Ok((
            StatusCode::ACCEPTED,
            [(header::LOCATION, format!("/jobs/{id}"))],
            Json(body),
        )
            .into_response());
    }
    let body = json!({
        "request_id": request_id,
        "request": format!("/requests/{request_id}"),
        "jobs": queued.jobs.iter().map(|(t, q)| target_view(t, q)).collect::<Vec<_>>(),
    });
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/requests/{request_id}"))],
        Json(body),
    )
        .into_response())
}
