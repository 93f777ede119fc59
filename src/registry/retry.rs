//! Bounded retries with jittered exponential backoff that honour `Retry-After`.
//!
//! One budget per operation: the outermost [`RetryPolicy::run`] opens a budget of
//! `max_attempts - 1` retries that every retry inside it draws from (a blob's retry, the request
//! retries within it, the token retries within those), so `--retries` bounds the attempts of the
//! whole operation instead of multiplying per layer.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use rand::Rng;

use super::error::Error;

tokio::task_local! {
    /// Retries left to the operation being run (see the module documentation).
    static BUDGET: Arc<AtomicU32>;
}

/// Takes one retry from the budget of the operation in progress: `Some(false)` when it is spent,
/// `None` outside any [`RetryPolicy::run`].
pub fn take_retry() -> Option<bool> {
    BUDGET
        .try_with(|left| {
            left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        })
        .ok()
}

/// The retry budget of an operation, carried into work another task does for it (a request body
/// that the HTTP connection's task polls).
#[derive(Clone, Debug)]
pub struct Budget(Arc<AtomicU32>);

impl Budget {
    /// The budget of the operation in progress, if any.
    pub fn current() -> Option<Budget> {
        BUDGET.try_with(|b| Budget(b.clone())).ok()
    }

    /// Runs `fut` within this budget.
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        BUDGET.scope(self.0, fut).await
    }
}

/// A transfer that continues where a cut left it may do so without spending a retry when the
/// cut connection moved at least this many bytes (or all that was left).
pub const RESUME_PROGRESS: u64 = 1024 * 1024;

/// Takes one retry for a failure that made no progress: from the operation's budget or, outside
/// any operation, counting in `local` (the caller's failures in a row) against `max_attempts`.
pub fn take_retry_or(policy: &RetryPolicy, local: &mut u32) -> bool {
    *local += 1;
    take_retry().unwrap_or(*local < policy.max_attempts)
}

/// How often and how patiently to retry transient failures.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles after each further failure.
    pub base: Duration,
    /// Ceiling of the exponential backoff.
    pub max_backoff: Duration,
    /// Ceiling of a registry's `Retry-After` (a hostile or confused registry must not park us for hours).
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(250),
            max_backoff: Duration::from_secs(15),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` after `attempt` failed with `err`.
    pub fn delay(&self, attempt: u32, err: &Error) -> Duration {
        match err.retry_after() {
            Some(after) => after.min(self.max_retry_after),
            None => backoff(self.base, self.max_backoff, attempt),
        }
    }

    /// Runs `op` until it succeeds, fails permanently, or the operation's retries run out (the
    /// budget of an enclosing `run`, or `max_attempts` in all when there is none).
    /// `op` gets the attempt number, starting at 1.
    pub async fn run<T, F, Fut>(&self, what: &str, op: F) -> Result<T, Error>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        if BUDGET.try_with(|_| ()).is_ok() {
            self.run_within(what, op).await
        } else {
            let left = Arc::new(AtomicU32::new(self.max_attempts.saturating_sub(1)));
            BUDGET.scope(left, self.run_within(what, op)).await
        }
    }

    async fn run_within<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, Error>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut attempt = 1;
        loop {
            match op(attempt).await {
                Ok(v) => return Ok(v),
                // A rate-limited budget already waited as long as a request may: give it back.
                Err(err @ Error::RateLimited { .. }) => return Err(err),
                Err(err) if err.is_transient() && take_retry() == Some(true) => {
                    let delay = self.delay(attempt, &err);
                    let m = &crate::metrics::METRICS;
                    m.retries.add(1);
                    if err.retry_after().is_some() || err.status() == Some(429) {
                        m.rate_limit_waits.add(1);
                    }
                    tracing::warn!(
                        attempt,
                        max_attempts = self.max_attempts,
                        delay_ms = delay.as_millis() as u64,
                        "{what}: {err}; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// Exponential backoff after failed attempt `attempt` (from 1): `base` doubling per attempt, capped
/// at `max`, with "equal jitter" (half fixed, half random) so retries of many clients spread out.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(max);
    let half = exp / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

/// Parses a `Retry-After` value: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: attempts,
            base: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            max_retry_after: Duration::from_millis(1),
        }
    }

    fn unavailable() -> Error {
        Error::Status {
            method: "GET".into(),
            url: "u".into(),
            status: 503,
            code: None,
            message: String::new(),
            retry_after: None,
        }
    }

    #[tokio::test]
    async fn nested_runs_share_one_budget() {
        let policy = fast(5);
        let calls = AtomicU32::new(0);
        let innermost = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(unavailable())
        };
        // A blob's retry around request retries around token retries.
        let r = policy
            .run("blob", |_| async {
                policy
                    .run("request", |_| async {
                        policy.run("token", |_| innermost()).await
                    })
                    .await
            })
            .await;
        assert!(r.is_err());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            5,
            "5 attempts in all, not 5 × 5 × 5"
        );
    }

    #[tokio::test]
    async fn operations_side_by_side_have_their_own_budgets() {
        let policy = fast(3);
        let calls = AtomicU32::new(0);
        let op = || {
            policy.run("op", |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(unavailable())
            })
        };
        let (a, b) = futures_util::future::join(op(), op()).await;
        assert!(a.is_err() && b.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        assert_eq!(take_retry(), None, "no budget outside an operation");
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(7)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy::default();
        let err = Error::Invalid("x".into());
        for attempt in 1..20 {
            let d = policy.delay(attempt, &err);
            assert!(d <= policy.max_backoff, "attempt {attempt}: {d:?}");
        }
        assert!(policy.delay(1, &err) <= policy.base);
        let throttled = Error::Status {
            method: "GET".into(),
            url: "u".into(),
            status: 429,
            code: None,
            message: String::new(),
            retry_after: Some(Duration::from_secs(3600)),
        };
        assert_eq!(policy.delay(1, &throttled), policy.max_retry_after);
    }
}
