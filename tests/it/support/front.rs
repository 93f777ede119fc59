//! An in-process fault front before a real registry: it passes every request through, streaming
//! bodies both ways, and misbehaves on cue (a status instead of the answer, a response cut after
//! some bytes, an answer lost after the registry acted, a rewritten answer), counting what it
//! served. For faults only: nginx (`support::nginx`) is the real front.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header, response};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt as _;

/// What the front does with one request.
pub enum Action {
    /// Pass it on and pass the answer back.
    Pass,
    /// Answer with this status and an OCI error body instead of passing it on.
    Answer(u16, &'static str),
    /// Pass it on, then cut the answer's body after this many bytes.
    CutAfter(u64),
    /// Pass it on (the registry acts on it), then answer this status instead of its answer, as a
    /// connection that broke after the registry acted would look.
    Lose(u16),
    /// Pass it on without this request header (a front that drops `Range`).
    Strip(header::HeaderName),
    /// Pass it on and rewrite the answer's head.
    Rewrite(Box<dyn FnOnce(&mut response::Parts) + Send>),
    /// Take this many bytes of the request's body (an upload), then answer this status without
    /// passing it on: a target that fails in the middle of a blob.
    FailAfter(u64, u16),
    /// Pass it on, but stop taking the request's body for this long after this many bytes: a
    /// target that stalls in the middle of a blob.
    StallAfter(u64, std::time::Duration),
    /// Hold the request until the value is `true`, then pass it on: an answer that is slow to
    /// come, for as long as the test wants.
    HoldUntil(tokio::sync::watch::Receiver<bool>),
}

/// A request as the rule sees it.
pub struct Seen<'a> {
    pub method: &'a Method,
    /// Path and query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

type Rule = dyn Fn(&Seen<'_>) -> Action + Send + Sync;

/// One request the front answered: method, path (without the query), what mattered of its
/// headers (`Range`, `Content-Range`), and the status it got.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: Method,
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
}

#[derive(Clone)]
struct Shared {
    upstream: String,
    http: reqwest::Client,
    rule: Arc<Rule>,
    blob_bytes: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Logged>>>,
}

/// A running fault front.
pub struct Front {
    host: String,
    blob_bytes: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Logged>>>,
}

impl Front {
    /// A front on a free loopback port before `upstream` (`host:port`), applying `rule` to each
    /// request.
    pub async fn start(
        upstream: &str,
        rule: impl Fn(&Seen<'_>) -> Action + Send + Sync + 'static,
    ) -> Front {
        let shared = Shared {
            upstream: upstream.to_string(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            rule: Arc::new(rule),
            blob_bytes: Arc::default(),
            log: Arc::default(),
        };
        let (blob_bytes, log) = (shared.blob_bytes.clone(), shared.log.clone());
        let app = axum::Router::new().fallback(handle).with_state(shared);
        // A fixed, small receive buffer: a stalled upload then holds the sender back within
        // about a MiB, as a remote registry that stops reading does, instead of the loopback
        // buffer growing (to 32 MiB here) and taking a whole layer while "stalled".
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(128 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1024).unwrap();
        let host = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Front {
            host,
            blob_bytes,
            log,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.host.clone()
    }

    /// Bytes of blob bodies (`GET /v2/…/blobs/<digest>`) the front sent.
    pub fn blob_bytes_served(&self) -> u64 {
        self.blob_bytes.load(Ordering::Relaxed)
    }

    /// Every request answered, in order.
    pub fn log(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }
}

fn is_blob_get(method: &Method, path: &str) -> bool {
    method == Method::GET && path.contains("/blobs/sha256:")
}

async fn handle(State(s): State<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let action = (s.rule)(&Seen {
        method: &parts.method,
        path: &path,
        headers: &parts.headers,
    });
    let range = parts
        .headers
        .get(header::RANGE)
        .or_else(|| parts.headers.get(header::CONTENT_RANGE))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let resp = respond(&s, &parts.method, &path, &parts.headers, body, action).await;
    s.log.lock().unwrap().push(Logged {
        method: parts.method.clone(),
        path: path.split('?').next().unwrap_or_default().to_string(),
        range,
        status: resp.status().as_u16(),
    });
    resp
}

/// `data`, paused for `pause` once `after` bytes went through.
fn stalled(
    data: axum::body::BodyDataStream,
    after: u64,
    pause: std::time::Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, axum::Error>> + Send + 'static {
    futures_util::stream::unfold(
        (data, 0u64, false),
        move |(mut data, seen, paused)| async move {
            let pause_now = !paused && seen >= after;
            if pause_now {
                tokio::time::sleep(pause).await;
            }
            let item = data.next().await?;
            let seen = seen + item.as_ref().map(|b| b.len() as u64).unwrap_or(0);
            Some((item, (data, seen, paused || pause_now)))
        },
    )
}

fn oci_error(status: u16, code: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"errors":[{{"code":"{code}","message":"injected by the fault front"}}]}}"#),
    )
        .into_response()
}

async fn respond(
    s: &Shared,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Body,
    action: Action,
) -> Response {
    if let Action::Answer(status, code) = action {
        return oci_error(status, code);
    }
    if let Action::HoldUntil(mut released) = action {
        let _ = released.wait_for(|r| *r).await;
        return Box::pin(respond(s, method, path, headers, body, Action::Pass)).await;
    }
    if let Action::FailAfter(limit, status) = action {
        let mut data = body.into_data_stream();
        let mut taken = 0u64;
        while taken < limit {
            match data.next().await {
                Some(Ok(c)) => taken += c.len() as u64,
                _ => break,
            }
        }
        return oci_error(status, "BLOB_UPLOAD_INVALID");
    }
    let mut out = s
        .http
        .request(method.clone(), format!("http://{}{path}", s.upstream));
    let stripped = match &action {
        Action::Strip(h) => Some(h.clone()),
        _ => None,
    };
    for (k, v) in headers {
        if k != header::CONNECTION && k != header::TRANSFER_ENCODING && Some(k) != stripped.as_ref()
        {
            out = out.header(k, v);
        }
    }
    let data = body.into_data_stream();
    let data = match action {
        Action::StallAfter(after, pause) => stalled(data, after, pause).boxed(),
        _ => data.boxed(),
    };
    let sent = out.body(reqwest::Body::wrap_stream(data)).send().await;
    let up = match sent {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("fault front: {e}")).into_response(),
    };
    if let Action::Lose(status) = action {
        let _ = up.bytes().await;
        return oci_error(status, "UNAVAILABLE");
    }
    let mut head = Response::new(());
    *head.status_mut() = up.status();
    for (k, v) in up.headers() {
        if k != header::CONNECTION && k != header::TRANSFER_ENCODING {
            head.headers_mut().append(k, v.clone());
        }
    }
    let (mut parts, ()) = head.into_parts();
    let cut = match action {
        Action::CutAfter(n) => Some(n),
        Action::Rewrite(f) => {
            f(&mut parts);
            None
        }
        _ => None,
    };
    let counter = is_blob_get(method, path).then(|| s.blob_bytes.clone());
    let mut sent = 0u64;
    let stream = up.bytes_stream().map(move |item| {
        let mut chunk: Bytes = item.map_err(std::io::Error::other)?;
        if let Some(limit) = cut {
            if sent >= limit {
                return Err(std::io::Error::other("cut by the fault front"));
            }
            if sent + chunk.len() as u64 > limit {
                chunk.truncate((limit - sent) as usize);
            }
        }
        sent += chunk.len() as u64;
        if let Some(c) = &counter {
            c.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        Ok(chunk)
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// A `Location` header made relative (path and query only), as GHCR answers.
pub fn relative_location(parts: &mut response::Parts) {
    if let Some(loc) = parts
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        && let Ok(u) = url::Url::parse(loc)
    {
        let rel = match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        };
        parts
            .headers
            .insert(header::LOCATION, HeaderValue::from_str(&rel).unwrap());
    }
}
