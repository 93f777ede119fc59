//! `GET /healthz` (the process answers), `GET /readyz` (ready for work), `GET /metrics`.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::metrics::METRICS;
use crate::store::{DriftKind, JobState, NoticeState, WriterState};

use super::{ApiError, AppState};

/// 200 while the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "alive")))]
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 when the database takes writes with every migration applied and every worker runs; 503 with
/// the failing checks otherwise. A writer busy with a write is ready (`"writer": "busy"`): the
/// answer never waits more than about a second for it.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "ready"), (status = 503, description = "not ready, with the failing checks")))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let mut failing = Vec::new();
    let mut writer = "idle";
    if state.stopping.is_cancelled() {
        failing.push("shutting down: finishing the requests and copies in hand".to_string());
    }
    match state.store.ready().await {
        Ok(WriterState::Idle) => {}
        Ok(WriterState::Busy) => writer = "busy",
        Err(e) => failing.push(format!("database: {e:#}")),
    }
    let alive = state.workers_alive.load(Ordering::SeqCst);
    if alive < state.workers_expected {
        failing.push(format!(
            "workers: {alive} of {} running (a worker that panicked is started again within 1 s; see mirror_worker_restarts_total)",
            state.workers_expected
        ));
    }
    if failing.is_empty() {
        (
            StatusCode::OK,
            Json(json!({ "status": "ready", "writer": writer })),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "failing": failing })),
        )
            .into_response()
    }
}

/// Prometheus text format: jobs by state, queue depth and age, and the process counters.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let stats = state.store.stats().await?;
    let oldest_ms = stats.oldest_queued_ms;
    let jobs: Vec<(crate::metrics::Labels, f64)> = JobState::ALL
        .iter()
        .map(|s| {
            let n = stats
                .by_state
                .iter()
                .find(|(st, _)| st == s)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            (vec![("state".to_string(), s.to_string())], n as f64)
        })
        .collect();
    let depth = jobs
        .iter()
        .find(|(l, _)| l[0].1 == "queued")
        .map(|(_, n)| *n)
        .unwrap_or(0.0);
    let open = state.store.open_drift_counts().await?;
    let drift_open: Vec<(crate::metrics::Labels, f64)> = DriftKind::ALL
        .iter()
        .map(|k| {
            let n = open.iter().find(|(kind, _)| kind == k).map(|(_, n)| *n);
            (
                vec![("kind".to_string(), k.as_str().to_string())],
                n.unwrap_or(0) as f64,
            )
        })
        .collect();
    let last_round = state
        .drift
        .last_round()
        .await
        .and_then(|r| chrono::DateTime::parse_from_rfc3339(&r.started_at).ok())
        .map(|t| t.timestamp_millis() as f64 / 1000.0)
        .unwrap_or(0.0);
    let notices = state.store.notice_counts().await?;
    let notices: Vec<(crate::metrics::Labels, f64)> = NoticeState::ALL
        .iter()
        .map(|s| {
            let n = notices.iter().find(|(st, _)| st == s).map(|(_, n)| *n);
            (
                vec![("state".to_string(), s.as_str().to_string())],
                n.unwrap_or(0) as f64,
            )
        })
        .collect();
    let body = METRICS.render(&[
        (
            "mirror_notices",
            "Notices in the outbox by state (failed: every attempt spent; see GET /notices?state=failed).",
            notices,
        ),
        ("mirror_drift_open", "Unresolved drift by kind.", drift_open),
        (
            "mirror_drift_last_round_timestamp_seconds",
            "Start of the last finished drift round (0: none yet).",
            vec![(vec![], last_round)],
        ),
        ("mirror_jobs", "Jobs by state.", jobs),
        (
            "mirror_queue_depth",
            "Jobs waiting to be copied.",
            vec![(vec![], depth)],
        ),
        (
            "mirror_queue_oldest_age_seconds",
            "Age of the oldest queued job.",
            vec![(vec![], oldest_ms.unwrap_or(0) as f64 / 1000.0)],
        ),
        (
            "mirror_workers_running",
            "Worker tasks running.",
            vec![(vec![], state.workers_alive.load(Ordering::SeqCst) as f64)],
        ),
    ]);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}
