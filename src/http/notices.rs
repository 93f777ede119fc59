//! `GET /notices`: the notice outbox — what is waiting to be sent, what was delivered, and what
//! could not be delivered after every attempt.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, rfc3339};
use crate::store::{Notice, NoticeState};

/// A notice as the API shows it.
fn view(n: &Notice) -> Value {
    json!({
        "id": n.id,
        "event": n.event,
        "state": n.state,
        "attempts": n.attempts,
        "last_error": n.last_error,
        "next_attempt_at": (n.state == NoticeState::Pending).then(|| rfc3339(n.next_attempt_at)),
        "created_at": rfc3339(n.created_at),
        "delivered_at": n.delivered_at.map(rfc3339),
        "body": serde_json::from_str::<Value>(&n.body).unwrap_or(Value::Null),
    })
}

/// Filters of `GET /notices`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    limit: Option<i64>,
    /// Only notices with ids below this (the `next` of the previous page).
    before: Option<i64>,
}

/// `GET /notices?state=…&limit=…&before=…`: notices newest first.
#[utoipa::path(get, path = "/notices", tag = "notices",
    params(("state" = Option<NoticeState>, Query, description = "pending, delivered or failed"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "1 to 500, default 50"),
        ("before" = Option<i64>, Query, description = "only ids below this: the `next` of the previous page")),
    responses((status = 200, description = "notices newest first (event, state, attempts, last error, body), and `next`"),
        (status = 400, description = "bad filter")))]
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
        .map(str::parse::<NoticeState>)
        .transpose()
        .map_err(ApiError::BadRequest)?;
    let limit = super::page_limit(q.limit, 50)?;
    let rows = state.store.notices(wanted, limit, q.before).await?;
    let next = super::next_page(rows.iter().map(|r| r.id), limit);
    Ok(Json(json!({
        "notices": rows.iter().map(view).collect::<Vec<_>>(),
        "next": next,
    })))
}
