//! Notices: when a job succeeds or fails, or drift watch finds a problem, a JSON notice signed like
//! GitHub's webhooks (`X-Mirror-Signature-256: sha256=<HMAC-SHA256 of the body>`, `X-Mirror-Event:
//! job` or `drift`) is POSTed to one URL. Notices are rows of the outbox (`outbox`), written with
//! what they announce; the sender here delivers them with backoff, across restarts, and marks those
//! whose attempts ran out `failed` for `GET /notices?state=failed` and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{Notice, Store};

/// Longest wait between two looks at the outbox (notices are also sent as soon as they are stored).
const POLL: Duration = Duration::from_secs(5);

/// How long a taken notice is left to its sender: longer than an attempt (10 s timeout) takes.
const CLAIM: Duration = Duration::from_secs(60);

/// Delivers the outbox's notices to one URL.
#[derive(Clone)]
pub struct Notifier {
    url: url::Url,
    secret: String,
    http: reqwest::Client,
    /// Attempts per notice before it is marked failed.
    max_attempts: u32,
    /// First wait after a failed attempt; doubles per attempt up to `max_backoff`.
    backoff: Duration,
    max_backoff: Duration,
    /// Rung after a notice is stored, so it leaves at once.
    wake: Arc<Notify>,
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
    /// A notifier posting to `url`, signing with `secret`, trying each notice `max_attempts` times.
    pub fn new(url: &str, secret: &str, max_attempts: u32) -> Result<Notifier, String> {
        let url = url::Url::parse(url)
            .map_err(|e| format!("MIRROR_NOTIFY_URL {url:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("MIRROR_NOTIFY_URL {url} must be http or https"));
        }
        if secret.is_empty() {
            return Err("MIRROR_NOTIFY_SECRET is not set: notices must be signed".into());
        }
        if max_attempts == 0 {
            return Err(
                "MIRROR_NOTIFY_MAX_ATTEMPTS is 0; give each notice at least 1 attempt".into(),
            );
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
            max_attempts,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(600),
            wake: Arc::new(Notify::new()),
        })
    }

    /// Tells the sender a notice was stored.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Sends the outbox's due notices until `stop` is cancelled; what is pending then is sent
    /// after the next start.
    pub fn spawn(&self, store: Store, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                // One at a time, under a lease longer than an attempt can take: a sender on
                // another replica skips it meanwhile; a sender that dies leaves it due again
                // when the lease ends.
                loop {
                    match store.claim_notices(1, CLAIM).await {
                        Ok(batch) if batch.is_empty() => break,
                        Ok(batch) => {
                            for n in batch {
                                tokio::select! {
                                    _ = this.attempt(&store, &n) => {}
                                    // Cut short: not counted, due again at once (after the restart).
                                    _ = stop.cancelled() => {
                                        if let Err(e) = store.release_notice(n.id).await {
                                            tracing::warn!(notice.id = n.id, "notice {}: giving it back at shutdown failed (due again in {} s): {e}", n.id, CLAIM.as_secs());
                                        }
                                        return;
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!("reading the notice outbox failed: {e}");
                            break;
                        }
                    }
                }
                let wait = match store.next_notice_in().await {
                    Ok(Some(due)) => due,
                    _ => POLL,
                }
                .min(POLL);
                tokio::select! {
                    _ = this.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => {}
                }
            }
        })
    }

    /// One delivery attempt of `n`, and its outcome written back.
    async fn attempt(&self, store: &Store, n: &Notice) {
        let attempt = n.attempts + 1;
        let written = match self.deliver(n).await {
            Ok(()) => {
                tracing::debug!(notice.id = n.id, "notice {} ({}) delivered", n.id, n.event);
                store.notice_delivered(n.id).await
            }
            Err(e) if attempt >= self.max_attempts as i64 => {
                tracing::error!(
                    notice.id = n.id,
                    attempts = attempt,
                    "notice {} ({}) not delivered after {attempt} attempts, marked failed (GET /notices?state=failed): {e}",
                    n.id,
                    n.event
                );
                store.notice_failed(n.id, &e, None).await
            }
            Err(e) => {
                let delay =
                    crate::registry::retry::backoff(self.backoff, self.max_backoff, attempt as u32);
                tracing::warn!(
                    notice.id = n.id,
                    attempt,
                    delay_ms = delay.as_millis() as u64,
                    "notice {} ({}) attempt {attempt} failed, will retry: {e}",
                    n.id,
                    n.event
                );
                store.notice_failed(n.id, &e, Some(delay)).await
            }
        };
        if let Err(e) = written {
            tracing::error!(
                notice.id = n.id,
                "recording notice {}'s attempt failed: {e}",
                n.id
            );
        }
    }

    async fn deliver(&self, n: &Notice) -> Result<(), String> {
        let signature = sign(&self.secret, n.body.as_bytes());
        let sent = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Mirror-Signature-256", &signature)
            .header("X-Mirror-Event", n.event.as_str())
            .header("X-Mirror-Notice-Id", n.id.to_string())
            .body(n.body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!(
                "the receiver answered HTTP {}",
                r.status().as_u16()
            )),
            Err(e) => Err(format!("sending failed: {e}")),
        }
    }
}
