//! `GET /sync` and `POST /sync`: the mirror list's last sync, and a sync on demand.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::{ApiError, AppState, Caller};

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
    responses((status = 200, description = "file, interval, and the last sync: entries, tags selected, up to date, queued, errors by line"),
        (status = 404, description = "no MIRROR_SYNC_FILE")))]
pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    state.authenticate_read(&headers)?;
    let sync = configured(&state)?;
    let config = sync.config();
    Ok(Json(json!({
        "file": config.file.display().to_string(),
        "interval_seconds": config.interval.map(|i| i.as_secs()),
        "last_sync": sync.last_report(),
    })))
}

/// `POST /sync`: reads the mirror list again and queues what is not mirrored as upstream has it
/// (waits for a running sync to finish first).
#[utoipa::path(post, path = "/sync", tag = "sync", security(("bearer" = [])),
    responses((status = 200, description = "the sync: entries, tags selected, up to date, queued, errors by line"),
        (status = 401, description = "missing or unknown bearer token"),
        (status = 404, description = "no MIRROR_SYNC_FILE")))]
pub async fn run(
    State(state): State<AppState>,
    Caller(who): Caller,
) -> Result<Json<Value>, ApiError> {
    let sync = configured(&state)?;
    tracing::info!(caller = %who, "mirror list sync requested");
    let report = sync.run().await?;
    Ok(Json(serde_json::to_value(report).unwrap_or(Value::Null)))
}
