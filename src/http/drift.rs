//! `GET /drift` and `POST /drift/check`: what drift watch found, and a round on demand (in the
//! background).

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, Caller};
use crate::rounds::Trigger;

pub use crate::drift::view;

/// Filters of `GET /drift`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// Resolved drift too (default: open only).
    all: Option<bool>,
    limit: Option<i64>,
    before: Option<i64>,
}

/// `GET /drift?all=…&limit=…&before=…`: drift newest first, the schedule, and the last round.
#[utoipa::path(get, path = "/drift", tag = "drift",
    params(("all" = Option<bool>, Query, description = "include resolved drift (default false)"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "1 to 500, default 100"),
        ("before" = Option<i64>, Query, description = "only ids below this: the `next` of the previous page")),
    responses((status = 200, description = "drift newest first, `next`, the policy, the interval, the running and queued rounds (or null) and the last round"),
        (status = 400, description = "bad filter")))]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    state.authenticate_read(&headers)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = super::page_limit(q.limit, 100)?;
    let rows = state
        .store
        .list_drift(q.all.unwrap_or(false), limit, q.before)
        .await?;
    let next = super::next_page(rows.iter().map(|r| r.id), limit);
    let config = state.drift.config();
    let (running, queued) = state.drift.current_rounds();
    Ok(Json(json!({
        "policy": config.policy,
        "interval_seconds": config.interval.map(|i| i.as_secs()),
        "running_round": running,
        "queued_round": queued,
        "last_round": state.drift.last_round().await,
        "drift": rows.iter().map(view).collect::<Vec<_>>(),
        "next": next,
    })))
}

/// `POST /drift/check`: asks for a drift round and answers at once (`202`) with its id and state;
/// the round runs in the background after a running one, and `GET /drift` shows it (while it runs
/// as `running_round`, then as `last_round` with the same id).
#[utoipa::path(post, path = "/drift/check", tag = "drift", security(("bearer" = [])),
    responses((status = 202, description = "the round asked for: `id`, `state` (`queued` or `running`), `trigger`, `requested_at`; `Location: /drift`"),
        (status = 401, description = "missing or unknown bearer token")))]
pub async fn check(State(state): State<AppState>, Caller(who): Caller) -> Response {
    let (round, _) = state.drift.request_round(Trigger::Request);
    tracing::info!(caller = %who, round.id = round.id, "drift round {} requested", round.id);
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, "/drift")],
        Json(serde_json::to_value(round).unwrap_or(Value::Null)),
    )
        .into_response()
}
