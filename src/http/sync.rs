//! `GET /sync` and `POST /sync`: the mirror list's last sync, and a sync on demand.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use serde_json::{Value, json};

use super::{ApiError, AppState, Caller};
use crate::rounds::Trigger;

fn configured(state: &AppState) -> Result<&crate::sync::Sync, ApiError> {
    state.sync.as_ref().ok_or_else(|| {
        ApiError::NotFound(
            "no mirror list is configured; set MIRROR_SYNC_FILE to a YAML list (see deploy/mirrors.example.yaml)"
                .into(),
        )
    })
}

/// `GET /sync`: the mirror list's file, schedule and last sync.
#[utoipa::path(get, path = "/sync", tag = "sync",
    responses((status = 200, description = "file, interval, the running and queued syncs (or null), and the last sync: entries, tags selected, up to date, queued, errors by line"),
        (status = 404, description = "no MIRROR_SYNC_FILE")))]
pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    state.authenticate_read(&headers)?;
    let sync = configured(&state)?;
    let config = sync.config();
    let (running, queued) = sync.current_rounds();
    Ok(Json(json!({
        "file": config.file.display().to_string(),
        "interval_seconds": config.interval.map(|i| i.as_secs()),
        "running_sync": running,
        "queued_sync": queued,
        "last_sync": sync.last_report().await,
    })))
}

/// `POST /sync`: asks for a sync of the mirror list (read again) and answers at once (`202`) with
/// its id and state; it runs in the background after a running one, and `GET /sync` shows it
/// (while it runs as `running_sync`, then as `last_sync` with the same id).
#[utoipa::path(post, path = "/sync", tag = "sync", security(("bearer" = [])),
    responses((status = 202, description = "the sync asked for: `id`, `state` (`queued` or `running`), `trigger`, `requested_at`; `Location: /sync`"),
        (status = 401, description = "missing or unknown bearer token"),
        (status = 404, description = "no MIRROR_SYNC_FILE")))]
pub async fn run(State(state): State<AppState>, Caller(who): Caller) -> Result<Response, ApiError> {
    let sync = configured(&state)?;
    let (round, _) = sync.request(Trigger::Request);
    tracing::info!(caller = %who, round.id = round.id, "mirror list sync {} requested", round.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, "/sync")],
        Json(serde_json::to_value(round).unwrap_or(Value::Null)),
    )
        .into_response())
}
