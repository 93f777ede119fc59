//! `GET /jobs/{id}` and `GET /jobs`: the state and progress of mirror jobs.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, rfc3339};
use crate::store::{Job, JobState};

/// A job as the API shows it.
pub fn view(job: &Job) -> Value {
    let target = match &job.target_tag {
        Some(t) => format!("{}:{t}", job.target_repo),
        None => job.target_repo.clone(),
    };
    let pull = (job.state == JobState::Succeeded)
        .then(|| {
            job.source_digest
                .as_ref()
                .map(|d| format!("{}@{d}", job.target_repo))
        })
        .flatten();
    json!({
        "id": job.id,
        "state": job.state,
        "source": job.source,
        "source_digest": job.source_digest,
        "target": target,
        "mirror_digest": if job.state == JobState::Succeeded { job.source_digest.clone() } else { None },
        "pull": pull,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "referrers": job.referrers,
        "referrers_state": job.referrers_state,
        "referrers_failed": job.referrers_failed,
        "policy": job.policy,
        "repair": job.repair,
        "last_error": job.last_error,
        "requested_by": job.requested_by,
        "progress": {
            "bytes_done": job.bytes_done,
            "bytes_total": job.bytes_total,
            "blobs_done": job.blobs_done,
            "blobs_total": job.blobs_total,
        },
        "created_at": rfc3339(job.created_at),
        "updated_at": rfc3339(job.updated_at),
        "started_at": job.started_at.map(rfc3339),
        "finished_at": job.finished_at.map(rfc3339),
        "next_attempt_at": (job.state == JobState::Queued).then(|| rfc3339(job.run_at)),
    })
}

/// `GET /jobs/{id}`.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", params(("id" = i64, Path, description = "job id")),
    responses((status = 200, description = "state, source and mirror digests, attempts, last error, progress, timestamps"),
        (status = 400, description = "not a job id"), (status = 404, description = "no such job")))]
pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.authenticate_read(&headers)?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("job id {id:?} is not a number")))?;
    let job = state
        .store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("there is no job {id}")))?;
    Ok(Json(view(&job)))
}

/// The values `GET /jobs?state=` takes, for the API description (the filter is checked against
/// `JobState::ALL`).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
enum StateFilter {
    Queued,
    Running,
    Succeeded,
    Failed,
}

/// Filters of `GET /jobs`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    limit: Option<i64>,
    /// Only jobs with ids below this (the `next` of the previous page).
    before: Option<i64>,
}

/// `GET /jobs?state=…&limit=…&before=…`: newest first.
#[utoipa::path(get, path = "/jobs", tag = "jobs",
    params(("state" = Option<StateFilter>, Query, description = "queued, running, succeeded or failed"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "1 to 500, default 50"),
        ("before" = Option<i64>, Query, description = "only ids below this: the `next` of the previous page")),
    responses((status = 200, description = "jobs newest first, and `next`"), (status = 400, description = "bad filter")))]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    state.authenticate_read(&headers)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let wanted = q
        .state
        .as_deref()
        .map(|s| {
            s.parse::<JobState>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "state {s:?} is not one of {}",
                    JobState::ALL.map(JobState::as_str).join(", ")
                ))
            })
        })
        .transpose()?;
    let limit = super::page_limit(q.limit, 50)?;
    let jobs = state.store.list(wanted, limit, q.before).await?;
    let next = super::next_page(jobs.iter().map(|r| r.id), limit);
    Ok(Json(json!({
        "jobs": jobs.iter().map(view).collect::<Vec<_>>(),
        "next": next,
    })))
}
