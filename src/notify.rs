//! Completion notices: when a job succeeds or fails, POST a JSON notice signed like GitHub's
//! webhooks (`X-Mirror-Signature-256: sha256=<HMAC-SHA256 of the body>`), retried with backoff in
//! the background so the worker never waits for the receiver.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// Delivers notices to one URL.
#[derive(Clone)]
pub struct Notifier {
    url: url::Url,
    secret: String,
    http: reqwest::Client,
    attempts: u32,
    backoff: Duration,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Notifier({}, secret redacted)", self.url)
    }
}

/// `sha256=<hex HMAC-SHA256 of body under secret>`, the value of `X-Mirror-Signature-256`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Notifier {
    /// A notifier posting to `url`, signing with `secret`.
    pub fn new(url: &str, secret: &str) -> Result<Notifier, String> {
        let url = url::Url::parse(url)
            .map_err(|e| format!("MIRROR_NOTIFY_URL {url:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("MIRROR_NOTIFY_URL {url} must be http or https"));
        }
        if secret.is_empty() {
            return Err("MIRROR_NOTIFY_SECRET is not set: notices must be signed".into());
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("building the notice client: {e}"))?;
        Ok(Notifier {
            url,
            secret: secret.to_string(),
            http,
            attempts: 6,
            backoff: Duration::from_millis(500),
        })
    }

    /// Sends `notice` in the background; returns at once.
    pub fn send(&self, notice: Value) {
        let this = self.clone();
        tokio::spawn(async move { this.deliver(notice).await });
    }

    async fn deliver(&self, notice: Value) {
        let body = notice.to_string();
        let signature = sign(&self.secret, body.as_bytes());
        let mut delay = self.backoff;
        for attempt in 1..=self.attempts {
            let sent = self
                .http
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Mirror-Signature-256", &signature)
                .header("X-Mirror-Event", "job")
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    tracing::debug!(job.id = %notice["job_id"], "notice delivered");
                    return;
                }
                Ok(r) => tracing::warn!(
                    attempt,
                    "notice for job {} answered HTTP {}",
                    notice["job_id"],
                    r.status()
                ),
                Err(e) => {
                    tracing::warn!(attempt, "notice for job {} failed: {e}", notice["job_id"])
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
        tracing::error!(
            "notice for job {} not delivered after {} attempts",
            notice["job_id"],
            self.attempts
        );
    }
}
