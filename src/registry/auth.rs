//! Registry authentication: `WWW-Authenticate` challenges, basic credentials and bearer tokens cached
//! per registry and scope with their expiry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use super::budget::Budgets;
use super::credentials::{Credential, CredentialStore};
use super::error::{Error, Result};
use super::retry::RetryPolicy;
use super::trust::CredentialReach;

/// Token and error bodies are small; a larger one is refused rather than buffered.
pub const MAX_SMALL_BODY: usize = 64 * 1024;

/// The authentication a registry asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP basic auth with the stored credentials.
    Basic,
    /// A bearer token from `realm` (the Docker token protocol).
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

impl Challenge {
    /// Parses a `WWW-Authenticate` header value; `None` for schemes we do not speak.
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => Some(Challenge::Basic),
            "bearer" => {
                let params = parse_params(rest);
                let realm = params.get("realm")?.clone();
                Some(Challenge::Bearer {
                    realm,
                    service: params.get("service").cloned(),
                })
            }
            _ => None,
        }
    }
}

/// Parses `key="value", key2=value2` (values may be quoted and hold commas).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n)
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    out
}

/// A token in the cache.
#[derive(Clone)]
struct CachedToken {
    token: String,
    refresh_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// The registry's token lifetime when the token server does not say (the Docker token spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// When to fetch a fresh token: well before expiry so a request never leaves with a dying token.
fn refresh_after(lifetime: Duration) -> Duration {
    lifetime
        .saturating_sub(Duration::from_secs(30))
        .max(lifetime / 2)
}

type TokenSlot = Arc<tokio::sync::Mutex<Option<CachedToken>>>;

/// Remembers each registry's challenge and the tokens fetched for it.
pub struct Authenticator {
    credentials: CredentialStore,
    network: std::sync::Arc<super::guard::NetworkPolicy>,
    /// Token requests are made on the registry's behalf: they wait in its rate-limit budget.
    budgets: Arc<Budgets>,
    challenges: Mutex<HashMap<String, Challenge>>,
    tokens: Mutex<HashMap<(String, String), TokenSlot>>,
    /// Which repositories each registry's credentials may be used for.
    reach: CredentialReach,
}

impl Authenticator {
    /// An authenticator using `credentials`, its token requests waiting in `budgets`.
    pub fn new(
        credentials: CredentialStore,
        network: std::sync::Arc<super::guard::NetworkPolicy>,
        budgets: Arc<Budgets>,
    ) -> Self {
        Authenticator {
            credentials,
            network,
            budgets,
            challenges: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            reach: CredentialReach::unrestricted(),
        }
    }

    /// Uses stored credentials only where `reach` allows (see [`CredentialReach`]).
    pub fn with_reach(mut self, reach: CredentialReach) -> Self {
        self.reach = reach;
        self
    }

    /// The credential for a request to `registry` needing `scopes` (the first scope's
    /// repository decides): none where the reach does not allow it. A credential helper is
    /// asked the first time.
    async fn credential(&self, registry: &str, scopes: &[String]) -> Result<Option<Credential>> {
        if let Some(repo) = CredentialReach::repository_of(scopes)
            && !self.reach.allows(registry, repo)
        {
            return Ok(None);
        }
        self.credentials
            .resolve(registry)
            .await
            .map_err(|e| Error::Auth {
                registry: registry.to_string(),
                reason: e.to_string(),
                transient: false,
            })
    }

    /// Why a request to `registry` needing `scopes` goes without the stored credentials, when
    /// that is because of the reach (they exist but are the target's).
    pub fn refusal(&self, registry: &str, scopes: &[String]) -> Option<String> {
        let repo = CredentialReach::repository_of(scopes)?;
        if self.credentials.get(registry).is_none()
            && self.credentials.helper_for(registry).is_none()
        {
            return None;
        }
        self.reach.refusal(registry, repo)
    }

    /// Records the challenge a registry answered a 401 with.
    pub fn learn(&self, registry: &str, challenge: Challenge) {
        self.challenges
            .lock()
            .expect("challenge map poisoned")
            .insert(registry.to_string(), challenge);
    }

    /// Whether the registry has asked for authentication before.
    pub fn knows(&self, registry: &str) -> bool {
        self.challenges
            .lock()
            .expect("challenge map poisoned")
            .contains_key(registry)
    }

    fn slot(&self, registry: &str, scopes: &[String]) -> TokenSlot {
        let key = (registry.to_string(), scopes.join(" "));
        self.tokens
            .lock()
            .expect("token map poisoned")
            .entry(key)
            .or_default()
            .clone()
    }

    /// Forgets the token for these scopes (after a 401 that said it no longer works).
    pub async fn invalidate(&self, registry: &str, scopes: &[String]) {
        *self.slot(registry, scopes).lock().await = None;
    }

    /// The `Authorization` header value for a request to `registry` needing `scopes`, fetching or
    /// refreshing a token when needed; `None` when the registry has not asked for authentication.
    pub async fn authorization(
        &self,
        http: &reqwest::Client,
        retry: &RetryPolicy,
        registry: &str,
        scopes: &[String],
    ) -> Result<Option<String>> {
        let challenge = self
            .challenges
            .lock()
            .expect("challenge map poisoned")
            .get(registry)
            .cloned();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => match self.credential(registry, scopes).await? {
                Some(Credential::Basic { username, password }) => Ok(Some(basic(&username, &password))),
                Some(Credential::IdentityToken { .. }) => Err(Error::Auth {
                    registry: registry.to_string(),
                    reason: "the registry asks for basic auth but the stored credential is an identity token; store a username and password for it".into(),
                    transient: false,
                }),
                None => Err(Error::Auth {
                    registry: registry.to_string(),
                    reason: self.refusal(registry, scopes).unwrap_or_else(|| "the registry requires credentials and none are stored for it; add them to the Docker config (docker login / auths) or REGISTRY_AUTH_FILE".into()),
                    transient: false,
                }),
            },
            Some(Challenge::Bearer { realm, service }) => {
                let slot = self.slot(registry, scopes);
                let mut cached = slot.lock().await;
                if let Some(t) = cached.as_ref()
                    && Instant::now() < t.refresh_at
                {
                    return Ok(Some(format!("Bearer {}", t.token)));
                }
                let fetched = retry
                    .run(&format!("token for {registry}"), |_| {
                        self.fetch_token(http, registry, &realm, service.as_deref(), scopes)
                    })
                    .await?;
                let header = format!("Bearer {}", fetched.token);
                *cached = Some(fetched);
                Ok(Some(header))
            }
        }
    }

    async fn fetch_token(
        &self,
        http: &reqwest::Client,
        registry: &str,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<CachedToken> {
        let url = url::Url::parse(realm).map_err(|e| Error::Auth {
            registry: registry.to_string(),
            reason: format!("the token realm {realm:?} is not a URL: {e}"),
            transient: false,
        })?;
        self.network.check_before_sending(&url).await?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Auth {
                registry: registry.to_string(),
                reason: format!("the token realm {realm:?} is not an http(s) URL"),
                transient: false,
            });
        }
        let started = Instant::now();
        let cred = self.credential(registry, scopes).await?;
        let request = match cred.as_ref() {
            Some(Credential::IdentityToken { token, .. }) => {
                let mut form: Vec<(&str, &str)> = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token),
                    ("client_id", "mirror-mirror"),
                ];
                if let Some(s) = service {
                    form.push(("service", s));
                }
                let scope = scopes.join(" ");
                if !scope.is_empty() {
                    form.push(("scope", &scope));
                }
                let body = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form)
                    .finish();
                http.post(url)
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body)
            }
            cred => {
                let mut url = url;
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    for scope in scopes {
                        q.append_pair("scope", scope);
                    }
                }
                let req = http.get(url);
                match cred {
                    Some(Credential::Basic { username, password }) => {
                        req.header(reqwest::header::AUTHORIZATION, basic(username, password))
                    }
                    _ => req,
                }
            }
        };
        let ticket = self.budgets.acquire(registry, false).await?;
        let resp = request.send().await.map_err(|e| Error::Network {
            context: format!("requesting a token for {registry} from {realm}"),
            source: e,
        })?;
        if let Some(e) = ticket.observe_throttling(resp.status(), resp.headers()) {
            return Err(e);
        }
        let status = resp.status();
        if !status.is_success() {
            let transient = status.as_u16() == 429 || status.is_server_error();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| super::retry::parse_retry_after(v, std::time::SystemTime::now()));
            if transient {
                return Err(Error::Status {
                    method: "GET".into(),
                    url: realm.to_string(),
                    status: status.as_u16(),
                    code: None,
                    message: "token server".into(),
                    retry_after,
                });
            }
            let hint = if let Some(why) = self.refusal(registry, scopes) {
                why
            } else if cred.is_some() {
                "check the credentials stored for it".to_string()
            } else {
                "no credentials are stored for it; add them to the Docker config or REGISTRY_AUTH_FILE".to_string()
            };
            return Err(Error::Auth {
                registry: registry.to_string(),
                reason: format!("the token server {realm} answered HTTP {status}; {hint}"),
                transient: false,
            });
        }
        let body = read_small_body(resp, &format!("token from {realm}")).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| Error::Auth {
            registry: registry.to_string(),
            reason: format!("the token server {realm} sent an unreadable answer: {e}"),
            transient: false,
        })?;
        let token = parsed
            .token
            .filter(|t| !t.is_empty())
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Auth {
                registry: registry.to_string(),
                reason: format!("the token server {realm} answered without a token"),
                transient: false,
            })?;
        let lifetime = parsed
            .expires_in
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        tracing::debug!(
            registry,
            scopes = %scopes.join(" "),
            lifetime_s = lifetime.as_secs(),
            "fetched a registry token"
        );
        Ok(CachedToken {
            token,
            refresh_at: started + refresh_after(lifetime),
        })
    }
}

fn basic(username: &str, password: &str) -> String {
    let raw = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Reads a body expected to be small (tokens, errors), refusing one over [`MAX_SMALL_BODY`].
pub async fn read_small_body(mut resp: reqwest::Response, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| Error::Network {
        context: format!("reading {what}"),
        source: e,
    })? {
        if out.len() + chunk.len() > MAX_SMALL_BODY {
            return Err(Error::Invalid(format!(
                "{what}: the body is larger than {MAX_SMALL_BODY} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges_with_quoted_commas() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            Challenge::parse("bearer realm=http://x/token"),
            Some(Challenge::Bearer {
                realm: "http://x/token".into(),
                service: None
            })
        );
        assert_eq!(Challenge::parse("Bearer service=x"), None);
        assert_eq!(Challenge::parse("Negotiate abc"), None);
    }

    #[test]
    fn refreshes_well_before_expiry() {
        assert_eq!(
            refresh_after(Duration::from_secs(300)),
            Duration::from_secs(270)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(60)),
            Duration::from_secs(30)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
    }
}
