//! `GET /healthz`: the service is up and its database answers.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{ApiError, AppState};

/// 200 when the database answers a query.
pub async fn health(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    sqlx::query("select 1").execute(&state.db.read).await?;
    Ok(Json(json!({ "status": "ok" })))
}
