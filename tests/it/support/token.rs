//! A token issuer for the registry's `auth: token` mode: the Docker token protocol (GET with basic
//! auth, POST with OAuth2 form fields), ES256 JWTs carrying the certificate in `x5c`, granting exactly
//! the scopes asked for when the credentials match. Lifetime is configurable; requests are recorded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

struct Inner {
    addr: SocketAddr,
    key: EncodingKey,
    x5c: String,
    cert_path: PathBuf,
    _dir: tempfile::TempDir,
    user: String,
    pass: String,
    lifetime_secs: AtomicU64,
    requests: AtomicUsize,
    scopes: Mutex<Vec<String>>,
    /// Statuses to answer the next token requests with (throttling tests).
    faults: Mutex<Vec<u16>>,
    /// The realm registries are told to send clients to, when not `url()/token`.
    realm: Mutex<Option<String>>,
}

/// A running token issuer.
#[derive(Clone)]
pub struct TokenIssuer {
    inner: Arc<Inner>,
}

impl TokenIssuer {
    /// Starts an issuer that grants what `user`/`pass` ask for.
    pub async fn start(user: &str, pass: &str) -> TokenIssuer {
        super::require_tool("openssl");
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("key.pem");
        let cert_path = dir.path().join("cert.pem");
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
            ])
            .args(["-subj", "/CN=mirror-mirror-test-issuer", "-keyout"])
            .arg(&key_path)
            .arg("-out")
            .arg(&cert_path)
            .output()
            .expect("running openssl");
        assert!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = EncodingKey::from_ec_pem(&std::fs::read(&key_path).unwrap())
            .expect("reading the EC key");
        let pem = std::fs::read_to_string(&cert_path).unwrap();
        let x5c: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let issuer = TokenIssuer {
            inner: Arc::new(Inner {
                addr,
                key,
                x5c,
                cert_path,
                _dir: dir,
                user: user.into(),
                pass: pass.into(),
                lifetime_secs: AtomicU64::new(300),
                requests: AtomicUsize::new(0),
                scopes: Mutex::new(Vec::new()),
                faults: Mutex::new(Vec::new()),
                realm: Mutex::new(None),
            }),
        };
        let app = Router::new()
            .route("/token", axum::routing::get(get_token).post(post_token))
            .with_state(issuer.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        issuer
    }

    /// Tokens issued from now on live `secs` seconds.
    pub fn set_lifetime(&self, secs: u64) {
        self.inner.lifetime_secs.store(secs, Ordering::SeqCst);
    }

    /// Answers the next token requests with these statuses first.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.inner
            .faults
            .lock()
            .unwrap()
            .extend_from_slice(statuses);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }
    pub fn service(&self) -> &'static str {
        "mirror-mirror-test-registry"
    }
    pub fn issuer(&self) -> &'static str {
        "mirror-mirror-test-issuer"
    }
    /// Where registries send clients for tokens: `url()/token` unless [`TokenIssuer::set_realm`].
    pub fn realm(&self) -> String {
        self.inner
            .realm
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| format!("{}/token", self.url()))
    }

    /// Makes registries started afterwards name `realm` (say, the issuer by another name).
    pub fn set_realm(&self, realm: &str) {
        *self.inner.realm.lock().unwrap() = Some(realm.to_string());
    }

    pub fn cert_path(&self) -> PathBuf {
        self.inner.cert_path.clone()
    }
    pub fn creds(&self) -> (String, String) {
        (self.inner.user.clone(), self.inner.pass.clone())
    }
    /// Token requests served.
    pub fn requests(&self) -> usize {
        self.inner.requests.load(Ordering::SeqCst)
    }
    /// Every scope requested, in order.
    pub fn scopes(&self) -> Vec<String> {
        self.inner.scopes.lock().unwrap().clone()
    }

    /// A token granting `actions` (e.g. "pull,push") on `repo`, for seeding.
    pub fn mint(&self, repo: &str, actions: &str) -> String {
        self.sign("seeder", &[format!("repository:{repo}:{actions}")])
    }

    fn sign(&self, subject: &str, scopes: &[String]) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let access: Vec<_> = scopes
            .iter()
            .filter_map(|s| {
                let (kind, rest) = s.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                Some(json!({ "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>() }))
            })
            .collect();
        let claims = json!({
            "iss": self.issuer(),
            "sub": subject,
            "aud": self.service(),
            // distribution accepts tokens for 60 s past `exp` (clock-skew leeway): take it off, so
            // the registry refuses a token exactly when `expires_in` says it ends.
            "exp": now + self.inner.lifetime_secs.load(Ordering::SeqCst) - 60,
            "nbf": now - 5,
            "iat": now,
            "jti": format!("{now}-{}", rand::random::<u64>()),
            "access": access,
        });
        let mut header = Header::new(Algorithm::ES256);
        header.x5c = Some(vec![self.inner.x5c.clone()]);
        jsonwebtoken::encode(&header, &claims, &self.inner.key).unwrap()
    }

    fn answer(&self, authenticated: Option<bool>, subject: &str, scopes: Vec<String>) -> Response {
        self.inner.requests.fetch_add(1, Ordering::SeqCst);
        self.inner
            .scopes
            .lock()
            .unwrap()
            .extend(scopes.iter().cloned());
        let fault = {
            let mut f = self.inner.faults.lock().unwrap();
            if f.is_empty() {
                None
            } else {
                Some(f.remove(0))
            }
        };
        if let Some(status) = fault {
            let mut r = (StatusCode::from_u16(status).unwrap(), "injected").into_response();
            r.headers_mut().insert("retry-after", "1".parse().unwrap());
            return r;
        }
        let granted: Vec<String> = match authenticated {
            Some(false) => return (StatusCode::UNAUTHORIZED, "bad credentials").into_response(),
            Some(true) => scopes,
            None => Vec::new(),
        };
        let token = self.sign(subject, &granted);
        let lifetime = self.inner.lifetime_secs.load(Ordering::SeqCst);
        axum::Json(json!({ "token": token, "access_token": token, "expires_in": lifetime, "issued_at": "2026-01-01T00:00:00Z" }))
            .into_response()
    }
}

fn pairs(s: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(s.as_bytes())
        .into_owned()
        .collect()
}

async fn get_token(
    State(issuer): State<TokenIssuer>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let q = pairs(q.as_deref().unwrap_or(""));
    let scopes: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .collect();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .map(|b| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b)
                .unwrap_or_default();
            String::from_utf8_lossy(&raw) == format!("{}:{}", issuer.inner.user, issuer.inner.pass)
        });
    issuer.answer(auth, &issuer.inner.user.clone(), scopes)
}

async fn post_token(State(issuer): State<TokenIssuer>, body: Bytes) -> Response {
    let form = pairs(&String::from_utf8_lossy(&body));
    let get = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let scopes: Vec<String> = get("scope")
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let ok = match get("grant_type").as_str() {
        "password" => get("username") == issuer.inner.user && get("password") == issuer.inner.pass,
        "refresh_token" => get("refresh_token") == format!("refresh-{}", issuer.inner.pass),
        _ => false,
    };
    issuer.answer(Some(ok), &issuer.inner.user.clone(), scopes)
}
