//! The HTTP API: router, shared state, the one JSON error envelope, and bearer-token checks.

pub mod cache;
mod drift;
mod error;
mod health;
mod images;
mod jobs;
mod mirror;
mod notices;
mod requests;
mod status;
mod sync;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderMap;
use axum::http::HeaderName;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ApiJson};

use crate::mapping::{AllowList, Targets};
use crate::store::{Enqueuer, Store};

/// Largest request body accepted (a mirror request is a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A bearer token allowed to request mirrors, with the name the ledger records.
#[derive(Clone)]
pub struct ApiToken {
    /// Who this token is (`ci`, `alice`); `token-N` when configured without a name.
    pub name: String,
    digest: [u8; 32],
}

impl ApiToken {
    /// A token named `name`.
    pub fn new(name: &str, secret: &str) -> ApiToken {
        ApiToken {
            name: name.to_string(),
            digest: Sha256::digest(secret.as_bytes()).into(),
        }
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiToken({}, ***)", self.name)
    }
}

/// GitHub webhook settings.
#[derive(Clone, Default)]
pub struct GithubConfig {
    /// Webhook secrets; several so one can be rotated without downtime. Empty: the endpoint is off.
    pub secrets: Vec<String>,
    /// `repository_dispatch` event types that request mirrors.
    pub event_types: Vec<String>,
    /// `owner/repo` or `owner/*` allowed to trigger mirrors; `None`: any.
    pub repositories: Option<Vec<String>>,
}

impl std::fmt::Debug for GithubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubConfig")
            .field(
                "secrets",
                &format!("{} secret(s), redacted", self.secrets.len()),
            )
            .field("event_types", &self.event_types)
            .field("repositories", &self.repositories)
            .finish()
    }
}

/// What the service's handlers need.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub targets: Targets,
    pub tokens: Vec<ApiToken>,
    pub allowed_sources: AllowList,
    pub read_requires_token: bool,
    pub max_attempts: i64,
    pub github: GithubConfig,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<ApiConfig>,
    /// Durable enqueues, group-committed.
    pub enqueuer: Enqueuer,
    /// Worker tasks running, and how many should be.
    pub workers_alive: Arc<std::sync::atomic::AtomicUsize>,
    pub workers_expected: usize,
    /// Drift watch, for `/drift`.
    pub drift: crate::drift::Watch,
    /// The mirror list, for `/sync` (none without `MIRROR_SYNC_FILE`).
    pub sync: Option<crate::sync::Sync>,
    /// The registry client (the workers' network policy), for dry runs of `POST /mirror`.
    pub client: crate::registry::Client,
    /// Cancelled when shutdown begins: `/readyz` answers 503 from then on, so a load balancer
    /// stops sending traffic while the requests in hand finish.
    pub stopping: tokio_util::sync::CancellationToken,
    /// Answers of `/images` and `/digests`, kept while the ledger does not change.
    pub reads: Arc<cache::ReadCache>,
}

impl AppState {
    /// The name of the caller's token, or 401. Tokens are compared as SHA-256 digests in constant time.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "send Authorization: Bearer <token> with a token from MIRROR_API_TOKENS".into(),
                )
            })?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for t in &self.config.tokens {
            if bool::from(t.digest.ct_eq(&digest)) {
                found = Some(t.name.clone());
            }
        }
        found.ok_or_else(|| {
            ApiError::Unauthorized("the bearer token is not one of MIRROR_API_TOKENS".into())
        })
    }

    /// For read endpoints: a token only when the service is configured to require one.
    pub fn authenticate_read(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.config.read_requires_token {
            self.authenticate(headers)?;
        }
        Ok(())
    }
}

/// The name of an authenticated caller: extracting it answers 401 before the body is even read.
pub struct Caller(pub String);

impl axum::extract::FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        state.authenticate(&parts.headers).map(Caller)
    }
}

/// The API description, filled from the handlers' `#[utoipa::path]` attributes.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "mirror-mirror", description = "Mirror container images between registries without changing a digest, and look up the trusted digests."),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routes and their OpenAPI description, built together so neither can miss a route.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (schemas, paths, webhook) = routes!(webhook::github);
    let (router, mut api) = OpenApiRouter::with_openapi(<ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(status::page))
        .routes(routes!(status::image))
        .routes(routes!(mirror::create))
        .routes(routes!(jobs::list))
        .routes(routes!(jobs::show))
        .routes(routes!(requests::show))
        .routes(routes!(images::show))
        .routes(routes!(images::digest))
        .routes(routes!(drift::list))
        .routes(routes!(drift::check))
        .routes(routes!(sync::show))
        .routes(routes!(sync::run))
        .routes(routes!(notices::list))
        .routes(routes!(health::health))
        .routes(routes!(health::ready))
        .routes(routes!(health::metrics))
        .routes(routes!(openapi))
        .routes((
            schemas,
            paths,
            webhook.layer(DefaultBodyLimit::max(webhook::MAX_WEBHOOK_BYTES)),
        ))
        .split_for_parts();
    // axum's catch-all `{*name}` is OpenAPI's `{name}`.
    let wildcard: Vec<String> = api
        .paths
        .paths
        .keys()
        .filter(|k| k.contains("{*"))
        .cloned()
        .collect();
    for k in wildcard {
        if let Some(item) = api.paths.paths.remove(&k) {
            api.paths.paths.insert(k.replace("{*", "{"), item);
        }
    }
    (router, api)
}

/// `GET /openapi.json`: this API's description.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI 3.1 description")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(routes().1)
}

/// The router with its layers.
pub fn router(state: AppState) -> Router {
    routes()
        .0
        .fallback(|| async { ApiError::NotFound("no such endpoint; see /openapi.json".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(Duration::from_secs(10)))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &axum::http::Request<_>| {
                    let route = req
                        .extensions()
                        .get::<axum::extract::MatchedPath>()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_else(|| "unmatched".into());
                    let id = req
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string();
                    tracing::info_span!("http.request", method = %req.method(), route = %route, request_id = %id)
                })
                .on_response(tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::new(HeaderName::from_static(REQUEST_ID)))
        .layer(SetRequestIdLayer::new(HeaderName::from_static(REQUEST_ID), RequestIds::default()))
        .with_state(state)
}

/// The header carrying the request id (taken from the client when it sends one).
pub const REQUEST_ID: &str = "x-request-id";

/// Request ids: a random per-process prefix and a counter.
#[derive(Clone)]
struct RequestIds {
    prefix: Arc<str>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds {
            prefix: hex::encode(rand::random::<[u8; 4]>()).into(),
            next: Arc::default(),
        }
    }
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        axum::http::HeaderValue::from_str(&format!("{}-{n}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

/// The `limit` of a paged list: 1 to 500, `default` when absent.
pub fn page_limit(limit: Option<i64>, default: i64) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 500".into(),
        ));
    }
    Ok(limit)
}

/// The `next` of a page of `ids` (newest first): its last id when the page is full.
pub fn next_page(
    ids: impl DoubleEndedIterator<Item = i64> + ExactSizeIterator,
    limit: i64,
) -> Option<i64> {
    let full = ids.len() as i64 == limit;
    ids.last().filter(|_| full)
}

/// Renders unix milliseconds as RFC 3339.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}
