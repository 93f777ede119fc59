//! `GET /requests/{id}`: one request and the job of each of its targets, together.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::{ApiError, AppState, rfc3339};

/// `GET /requests/{id}`.
#[utoipa::path(get, path = "/requests/{id}", tag = "jobs", params(("id" = i64, Path, description = "request id")),
    responses((status = 200, description = "the request (source, the digest every target gets once resolved, who asked) with its state (queued, running, succeeded, partial, failed) and each target's job"),
        (status = 400, description = "not a request id"), (status = 404, description = "no such request")))]
pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.authenticate_read(&headers)?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("request id {id:?} is not a number")))?;
    let request = state
        .store
        .request(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("there is no request {id}")))?;
    Ok(Json(json!({
        "id": request.id,
        "state": request.state(),
        "source": request.source,
        "source_digest": request.source_digest,
        "requested_by": request.requested_by,
        "created_at": rfc3339(request.created_at),
        "targets": request.jobs.iter().map(|(target, job)| {
            let mut view = super::jobs::view(job);
            view["target_name"] = json!(target);
            view
        }).collect::<Vec<_>>(),
    })))
}
