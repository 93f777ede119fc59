//! `POST /webhooks/github`: `repository_dispatch` deliveries from a GitHub App, verified by
//! `X-Hub-Signature-256` before anything is parsed, idempotent per `X-GitHub-Delivery`.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use super::{ApiError, AppState};

/// Largest webhook body accepted.
pub const MAX_WEBHOOK_BYTES: usize = 1024 * 1024;
/// Most images one delivery may ask for.
pub const MAX_IMAGES: usize = 100;

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under one of `secrets`.
/// The comparison is constant-time.
pub fn signature_valid(secrets: &[String], body: &[u8], signature: Option<&str>) -> bool {
    let Some(hex_sig) = signature.and_then(|s| s.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    secrets.iter().any(|secret| {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(body);
        mac.verify_slice(&sig).is_ok()
    })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether `repo` (`owner/name`) matches one of the patterns (`owner/name` or `owner/*`).
fn repo_allowed(patterns: &[String], repo: &str) -> bool {
    let repo = repo.to_ascii_lowercase();
    patterns.iter().any(|p| {
        let p = p.to_ascii_lowercase();
        match p.strip_suffix("/*") {
            Some(owner) => repo.split_once('/').is_some_and(|(o, _)| o == owner),
            None => p == repo,
        }
    })
}

/// `POST /webhooks/github`, counted by outcome in the metrics.
#[utoipa::path(post, path = "/webhooks/github", tag = "github",
    request_body(content = String, content_type = "application/json", description = "a GitHub delivery: ping or repository_dispatch with client_payload.image or .images"),
    params(("X-Hub-Signature-256" = String, Header, description = "sha256=<HMAC-SHA256 of the body>"),
        ("X-GitHub-Event" = String, Header, description = "ping, repository_dispatch, …"),
        ("X-GitHub-Delivery" = String, Header, description = "delivery id; redeliveries reuse it")),
    responses((status = 200, description = "ping"), (status = 202, description = "jobs queued (a redelivery answers as the first time)"),
        (status = 204, description = "event or type ignored"), (status = 401, description = "X-Hub-Signature-256 missing or wrong"),
        (status = 403, description = "repository not allowed"), (status = 413, description = "over 1 MiB"),
        (status = 422, description = "bad payload"), (status = 503, description = "no webhook secret configured")))]
pub async fn github(
    state: State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let response = handle(state, headers, body).await.into_response();
    crate::metrics::METRICS.webhook(match response.status().as_u16() {
        200 => "ping",
        202 => "queued",
        204 => "ignored",
        401 => "bad_signature",
        403 => "forbidden",
        503 => "disabled",
        400..=499 => "invalid",
        _ => "error",
    });
    response
}

async fn handle(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let config = &state.config;
    if config.github.secrets.is_empty() {
        return Err(ApiError::Unavailable(
            "GitHub webhooks are off: set MIRROR_GITHUB_WEBHOOK_SECRETS to the App's webhook secret".into(),
        ));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the webhook body is larger than {MAX_WEBHOOK_BYTES} bytes"
            ))
        } else {
            ApiError::BadRequest(e.body_text())
        }
    })?;
    if !signature_valid(
        &config.github.secrets,
        &body,
        header(&headers, "x-hub-signature-256"),
    ) {
        return Err(ApiError::Unauthorized(
            "X-Hub-Signature-256 is missing or does not match any of MIRROR_GITHUB_WEBHOOK_SECRETS"
                .into(),
        ));
    }
    let event = header(&headers, "x-github-event").unwrap_or("");
    match event {
        "ping" => return Ok((StatusCode::OK, axum::Json(json!({ "ok": true }))).into_response()),
        "repository_dispatch" => {}
        other => {
            tracing::debug!(event = other, "ignoring GitHub event {other}");
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
    let delivery = header(&headers, "x-github-delivery")
        .filter(|d| !d.is_empty() && d.len() <= 100)
        .ok_or_else(|| ApiError::BadRequest("X-GitHub-Delivery is missing".into()))?
        .to_string();
    let payload: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not JSON: {e}")))?;
    let event_type = payload["action"].as_str().unwrap_or("");
    if !config.github.event_types.iter().any(|t| t == event_type) {
        tracing::debug!(
            event_type,
            "ignoring repository_dispatch of type {event_type:?}"
        );
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let repository = payload["repository"]["full_name"]
        .as_str()
        .unwrap_or("")
        .to_string();
    if let Some(allowed) = &config.github.repositories
        && !repo_allowed(allowed, &repository)
    {
        return Err(ApiError::Forbidden(format!(
            "repository {repository:?} is not in MIRROR_GITHUB_REPOSITORIES"
        )));
    }
    let client_payload = &payload["client_payload"];
    let images: Vec<String> = match (&client_payload["image"], &client_payload["images"]) {
        (Value::String(s), Value::Null) => vec![s.clone()],
        (Value::Null, Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::Unprocessable("client_payload.images must be a list of strings".into())
            })?,
        (Value::Null, Value::Null) => {
            return Err(ApiError::Unprocessable(
                "client_payload needs \"image\" (a string) or \"images\" (a list of strings)"
                    .into(),
            ));
        }
        _ => {
            return Err(ApiError::Unprocessable(
                "client_payload must have exactly one of \"image\" (a string) or \"images\" (a list of strings)".into(),
            ));
        }
    };
    if images.is_empty() || images.len() > MAX_IMAGES {
        return Err(ApiError::Unprocessable(format!(
            "client_payload.images has {} entries; send 1 to {MAX_IMAGES}",
            images.len()
        )));
    }
    let who = json!({
        "kind": "github",
        "repository": repository,
        "sender": payload["sender"]["login"],
        "installation": payload["installation"]["id"],
        "delivery": delivery,
    });
    let targets: Option<Vec<String>> = match &client_payload["targets"] {
        Value::Null => None,
        Value::Array(list) => Some(
            list.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::Unprocessable(
                        "client_payload.targets must be a list of target names".into(),
                    )
                })?,
        ),
        _ => {
            return Err(ApiError::Unprocessable(
                "client_payload.targets must be a list of target names".into(),
            ));
        }
    };
    // Validate everything before storing anything: a delivery is all or nothing.
    let plans = images
        .iter()
        .map(|image| {
            super::mirror::plan(&state, image, None, targets.as_deref(), who.clone()).map_err(|e| {
                match e {
                    ApiError::BadRequest(m) => ApiError::Unprocessable(m),
                    other => other,
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (names, plans): (Vec<String>, Vec<crate::store::NewJob>) =
        plans.into_iter().flat_map(|r| r.jobs).unzip();
    let respond = |queued: &[crate::store::Enqueued]| {
        let jobs: Vec<Value> = queued
            .iter()
            .zip(&names)
            .map(|(q, target)| {
                let mut view = super::jobs::view(&q.job);
                view["target_name"] = json!(target);
                view["dedupe"] = json!(q.dedupe.as_str());
                view
            })
            .collect();
        json!({ "delivery": delivery, "jobs": jobs })
    };
    let (jobs, response) = match state.store.deliver(&delivery, &plans, &respond).await? {
        crate::store::Delivery::Before { status, response } => {
            tracing::info!(delivery = %delivery, "redelivery of GitHub delivery {delivery}: answering as before");
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED);
            return Ok((status, axum::Json(response)).into_response());
        }
        crate::store::Delivery::New { enqueued, response } => (enqueued, response),
    };
    tracing::info!(delivery = %delivery, repository = %repository, jobs = jobs.len(), "GitHub delivery {delivery} from {repository}: {} job(s) queued", jobs.len());
    Ok((StatusCode::ACCEPTED, axum::Json(response)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_and_repository_patterns() {
        let secrets = vec!["old".to_string(), "new".to_string()];
        let mut mac = Hmac::<Sha256>::new_from_slice(b"new").unwrap();
        mac.update(b"body");
        let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert!(signature_valid(&secrets, b"body", Some(&sig)));
        assert!(!signature_valid(&secrets, b"body2", Some(&sig)));
        assert!(!signature_valid(&secrets, b"body", None));
        assert!(!signature_valid(&secrets, b"body", Some("sha1=00")));
        assert!(!signature_valid(&["other".into()], b"body", Some(&sig)));
        let pats = vec!["acme/*".to_string(), "bob/tools".to_string()];
        assert!(repo_allowed(&pats, "acme/x"));
        assert!(repo_allowed(&pats, "Bob/Tools"));
        assert!(!repo_allowed(&pats, "bob/other"));
        assert!(!repo_allowed(&pats, "acmex/y"));
    }
}
