//! Rate-limit budgets: one per registry and credential, shared by every request of the process, so
//! that when a registry throttles (`429` with `Retry-After`) or says its allowance is spent
//! (`RateLimit-Remaining: 0`) every copy backs off together instead of each one finding out alone.
//!
//! Before each request a caller takes a [`Ticket`] ([`Budgets::acquire`]): it waits while the budget
//! is paused, up to a limit, and fails with [`Error::RateLimited`] beyond it so the caller can
//! reschedule. Metered requests (manifest GETs, which Docker Hub counts) reserve one of the
//! remaining allowance before they leave, so N workers do not all fire on `remaining = 1`. After
//! the answer the ticket is [`Ticket::observe`]d: the headers update the allowance, and a throttling
//! status pauses the whole budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use tokio::time::Instant;

use super::credentials::{Credential, CredentialStore};
use super::error::Error;
use super::retry::{backoff, parse_retry_after};

/// The longest pause a registry can impose (`Retry-After`, a reset time): Docker Hub's longest
/// window. A confused or hostile registry must not park the mirror for days.
pub const MAX_PAUSE: Duration = Duration::from_secs(6 * 3600);

/// How long a spent allowance waits when the registry did not say when its window ends.
pub const UNKNOWN_WINDOW: Duration = Duration::from_secs(60);

/// The identity recorded for requests sent without credentials.
pub const ANONYMOUS: &str = "anonymous";

/// How budgets wait.
#[derive(Debug, Clone)]
pub struct BudgetPolicy {
    /// The longest a request waits for a paused budget; beyond it [`Budgets::acquire`] fails with
    /// [`Error::RateLimited`].
    pub max_wait: Duration,
    /// First pause after a `429` without `Retry-After`; doubles per consecutive `429`.
    pub backoff: Duration,
    /// Ceiling of that pause.
    pub max_backoff: Duration,
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        BudgetPolicy {
            max_wait: Duration::from_secs(60),
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(15),
        }
    }
}

/// Every budget of the process, by (registry, identity).
pub struct Budgets {
    policy: BudgetPolicy,
    /// Registry → the identity its requests go out as: a username, or `identity token` for an
    /// identity token stored without one. Never a password or token.
    identities: HashMap<String, String>,
    budgets: Mutex<HashMap<(String, String), Arc<Budget>>>,
}

impl Budgets {
    /// Budgets waiting as `policy` says; `identities` names who the requests to each registry
    /// go out as (registries not named are [`ANONYMOUS`]).
    pub fn new(policy: BudgetPolicy, identities: HashMap<String, String>) -> Budgets {
        Budgets {
            policy,
            identities,
            budgets: Mutex::new(HashMap::new()),
        }
    }

    /// Budgets for requests authenticated from `credentials`: each registry's identity is the
    /// username stored for it (no secret is kept).
    pub fn for_credentials(policy: BudgetPolicy, credentials: &CredentialStore) -> Budgets {
        let identities = credentials
            .registries()
            .filter_map(|r| {
                let who = match credentials.get(r)? {
                    Credential::Basic { username, .. } => format!("user {username}"),
                    Credential::IdentityToken { username, .. } => {
                        format!("identity token of {username}")
                    }
                };
                Some((r.to_string(), who))
            })
            .collect();
        Budgets::new(policy, identities)
    }

    /// Whether manifest GETs to `registry` may count against an allowance: Docker Hub's do, and so
    /// may any registry's until one of them was answered without an allowance (`RateLimit-*`),
    /// and after any answer that told one.
    pub fn meters(&self, registry: &str) -> bool {
        if registry == "docker.io" {
            return true;
        }
        let b = self.budget(registry);
        let st = b.state.lock().expect("budget poisoned");
        !st.unmetered || st.limit.is_some() || st.remaining.is_some()
    }

    fn budget(&self, registry: &str) -> Arc<Budget> {
        let identity = self
            .identities
            .get(registry)
            .map(String::as_str)
            .unwrap_or(ANONYMOUS);
        self.budgets
            .lock()
            .expect("budgets poisoned")
            .entry((registry.to_string(), identity.to_string()))
            .or_insert_with(|| {
                Arc::new(Budget {
                    registry: registry.to_string(),
                    policy: self.policy.clone(),
                    state: Mutex::default(),
                })
            })
            .clone()
    }

    /// Waits until a request to `registry` may leave, and takes a ticket for it (reserving one of
    /// the allowance when `metered`). Fails with [`Error::RateLimited`] when the wait would be
    /// longer than [`BudgetPolicy::max_wait`].
    pub async fn acquire(&self, registry: &str, metered: bool) -> Result<Ticket, Error> {
        let budget = self.budget(registry);
        loop {
            match budget.try_take(metered, Instant::now()) {
                Ok(seq) => {
                    return Ok(Ticket {
                        budget,
                        metered,
                        seq,
                    });
                }
                Err((d, reason)) if d > self.policy.max_wait => {
                    return Err(Error::RateLimited {
                        registry: registry.to_string(),
                        retry_after: d,
                        reason,
                    });
                }
                Err((d, reason)) => {
                    crate::metrics::METRICS.rate_limit_waits.add(1);
                    tracing::debug!(
                        registry,
                        wait_ms = d.as_millis() as u64,
                        "waiting for {registry}'s rate limit ({reason})"
                    );
                    tokio::time::sleep(d).await;
                }
            }
        }
    }
}

/// One budget: a registry as one identity.
struct Budget {
    registry: String,
    policy: BudgetPolicy,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Every request waits until then (`Retry-After`, or a `429`'s backoff).
    paused_until: Option<Instant>,
    /// Why, for the error and the log.
    pause_reason: String,
    /// A manifest GET was answered without an allowance: this registry counts none.
    unmetered: bool,
    /// Consecutive `429`s without `Retry-After`; any answer below 500 resets it.
    throttled: u32,
    /// Metered requests left: what the registry last said, less what was sent since. `None` when
    /// the registry never said.
    remaining: Option<u64>,
    /// The allowance per window (`RateLimit-Limit`), when said.
    limit: Option<u64>,
    /// The remaining count the registry reported last (a higher one starts a new window).
    reported: Option<u64>,
    /// When the current window ends.
    window_end: Option<Instant>,
    /// Metered requests sent whose answer is not observed yet.
    in_flight: u64,
    /// Tickets handed out: each request's place in sending order.
    sent: u64,
    /// The latest ticket whose answer updated the allowance: answers to requests sent before it
    /// arrive late and are older news (a late `remaining: 2` must not look like a new window).
    applied: u64,
}

impl Budget {
    /// Takes the request's share (and its place in sending order), or says how long to wait and why.
    fn try_take(&self, metered: bool, now: Instant) -> Result<u64, (Duration, String)> {
        let mut st = self.state.lock().expect("budget poisoned");
        if let Some(until) = st.paused_until.filter(|u| *u > now) {
            return Err((until - now, st.pause_reason.clone()));
        }
        if metered && st.remaining == Some(0) {
            let end = *st.window_end.get_or_insert(now + UNKNOWN_WINDOW);
            if end > now {
                let reason = match st.limit {
                    Some(l) => format!("its allowance of {l} manifest requests is spent"),
                    None => "its allowance of manifest requests is spent".to_string(),
                };
                return Err((end - now, reason));
            }
            // The window is over: a new allowance, learned again from answers to later requests.
            st.remaining = st.limit;
            st.reported = None;
            st.window_end = None;
            st.applied = st.sent;
            if st.remaining == Some(0) {
                st.window_end = Some(now + UNKNOWN_WINDOW);
                return Err((UNKNOWN_WINDOW, "its allowance is 0".into()));
            }
        }
        if metered {
            if let Some(r) = st.remaining.as_mut() {
                *r -= 1;
            }
            st.in_flight += 1;
        }
        st.sent += 1;
        self.publish(&st, now);
        Ok(st.sent)
    }

    /// Applies an answer; returns the error to give instead when it paused the budget for longer
    /// than a request waits.
    fn observe(
        &self,
        metered: bool,
        seq: u64,
        status: StatusCode,
        headers: &HeaderMap,
        quota: bool,
    ) -> Option<Error> {
        let now = Instant::now();
        let mut st = self.state.lock().expect("budget poisoned");
        if metered {
            st.in_flight = st.in_flight.saturating_sub(1);
        }
        let told = match quota {
            true => parse_quota(headers, SystemTime::now()),
            false => None,
        };
        if metered && quota && status.is_success() && told.is_none() {
            st.unmetered = true;
        }
        if seq > st.applied
            && let Some(q) = told
        {
            st.applied = seq;
            let was = st.remaining;
            if q.limit.is_some() {
                st.limit = q.limit;
            }
            // Within a window whose end is known, a higher count is an answer the registry
            // counted before another one that reached us first (two connections reorder), not a
            // new window: only the window's end starts one. Without a known end, a higher count
            // is the only sign of a new window.
            let new_window = match (st.reported, st.window_end) {
                (None, _) => true,
                (Some(_), Some(end)) => end <= now,
                (Some(r), None) => q.remaining > r,
            };
            let left = q.remaining.saturating_sub(st.in_flight);
            st.remaining = match st.remaining {
                Some(local) if !new_window => Some(local.min(left)),
                _ => Some(left),
            };
            if let Some(reset) = q.reset {
                st.window_end = Some(now + reset.min(MAX_PAUSE));
            } else if new_window {
                st.window_end = q.window.map(|w| now + w.min(MAX_PAUSE));
            }
            st.reported = Some(q.remaining);
            if st.remaining == Some(0) && was != Some(0) {
                let secs = st
                    .window_end
                    .map(|e| e.saturating_duration_since(now).as_secs())
                    .unwrap_or(UNKNOWN_WINDOW.as_secs());
                tracing::warn!(
                    registry = %self.registry,
                    wait_s = secs,
                    "{}: the rate-limit allowance is spent; manifest requests wait about {secs} s for the window to end",
                    self.registry
                );
            }
        }
        let retry_after = header_retry_after(headers);
        let pause = match (status.as_u16(), retry_after) {
            (429 | 503, Some(after)) if !after.is_zero() => Some((
                after.min(MAX_PAUSE),
                format!(
                    "HTTP {}, Retry-After {} s",
                    status.as_u16(),
                    ceil_secs(after)
                ),
            )),
            (429, _) => {
                st.throttled += 1;
                let p = &self.policy;
                Some((
                    backoff(p.backoff, p.max_backoff, st.throttled),
                    "HTTP 429".to_string(),
                ))
            }
            (s, _) => {
                if s < 500 {
                    st.throttled = 0;
                }
                None
            }
        };
        let mut refused = None;
        if let Some((after, reason)) = pause {
            let until = now + after;
            if st.paused_until.is_none_or(|u| u < until) {
                st.paused_until = Some(until);
                st.pause_reason = reason.clone();
                tracing::warn!(
                    registry = %self.registry,
                    pause_ms = after.as_millis() as u64,
                    "{} is throttling ({reason}); every request to it waits {} ms",
                    self.registry,
                    after.as_millis()
                );
            }
            let left = st.paused_until.map(|u| u - now).unwrap_or_default();
            if left > self.policy.max_wait {
                refused = Some(Error::RateLimited {
                    registry: self.registry.clone(),
                    retry_after: left,
                    reason: st.pause_reason.clone(),
                });
            }
        }
        self.publish(&st, now);
        refused
    }

    /// Shows the budget in `/metrics`.
    fn publish(&self, st: &State, now: Instant) {
        let mut until = st.paused_until.filter(|u| *u > now);
        if st.remaining == Some(0)
            && let Some(end) = st.window_end.filter(|e| *e > now)
        {
            until = until.max(Some(end));
        }
        let wall = until.map(|u| SystemTime::now() + (u - now));
        crate::metrics::METRICS.rate_limit(&self.registry, st.remaining, wall);
    }
}

/// A request's place in a budget: [`Ticket::observe`] its answer (dropping it unobserved releases
/// its reservation without giving the allowance back, as the registry may have counted it).
pub struct Ticket {
    budget: Arc<Budget>,
    metered: bool,
    seq: u64,
}

impl Ticket {
    /// Applies the registry's answer to the budget. Returns [`Error::RateLimited`] when the answer
    /// paused the budget for longer than a request waits: give that error instead of the answer.
    pub fn observe(mut self, status: StatusCode, headers: &HeaderMap) -> Option<Error> {
        let metered = std::mem::take(&mut self.metered);
        self.budget
            .observe(metered, self.seq, status, headers, true)
    }

    /// As [`Ticket::observe`], for an answer from another server on the registry's behalf (its
    /// token server): only a throttling status counts, not allowance headers.
    pub fn observe_throttling(mut self, status: StatusCode, headers: &HeaderMap) -> Option<Error> {
        let metered = std::mem::take(&mut self.metered);
        self.budget
            .observe(metered, self.seq, status, headers, false)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.metered {
            let mut st = self.budget.state.lock().expect("budget poisoned");
            st.in_flight = st.in_flight.saturating_sub(1);
        }
    }
}

/// What a registry says about its allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests left in the window.
    pub remaining: u64,
    /// Requests per window.
    pub limit: Option<u64>,
    /// The window's length (`;w=`).
    pub window: Option<Duration>,
    /// Time until the window resets (`RateLimit-Reset`, `X-RateLimit-Reset`).
    pub reset: Option<Duration>,
}

/// Reads `RateLimit-Remaining`/`-Limit` (Docker Hub: `76;w=21600`, or a plain count), else
/// `X-RateLimit-Remaining`/`-Limit`, and a reset time (`RateLimit-Reset` in seconds,
/// `X-RateLimit-Reset` in seconds or as a Unix time). `None` without a readable remaining count.
pub fn parse_quota(headers: &HeaderMap, now: SystemTime) -> Option<Quota> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (prefix, (remaining, w1)) = ["ratelimit", "x-ratelimit"]
        .into_iter()
        .find_map(|p| Some((p, parse_count(get(&format!("{p}-remaining"))?)?)))?;
    let limit = get(&format!("{prefix}-limit")).and_then(parse_count);
    let reset = get(&format!("{prefix}-reset"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|n| {
            // A count this large is a Unix time (GitHub's form), not seconds to wait.
            if n > 1_000_000_000 {
                (SystemTime::UNIX_EPOCH + Duration::from_secs(n))
                    .duration_since(now)
                    .unwrap_or_default()
            } else {
                Duration::from_secs(n)
            }
        });
    Some(Quota {
        remaining,
        limit: limit.map(|(l, _)| l),
        window: w1.or(limit.and_then(|(_, w)| w)),
        reset,
    })
}

/// `76;w=21600` → (76, 21600 s); `76` → (76, none); anything else → none.
fn parse_count(v: &str) -> Option<(u64, Option<Duration>)> {
    let mut parts = v.split(';');
    let n = parts.next()?.trim().parse::<u64>().ok()?;
    let window = parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("w")
            .then(|| v.trim().parse::<u64>().ok())
            .flatten()
            .filter(|w| *w > 0)
            .map(Duration::from_secs)
    });
    Some((n, window))
}

fn header_retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn budgets(max_wait: u64) -> Budgets {
        Budgets::new(
            BudgetPolicy {
                max_wait: Duration::from_secs(max_wait),
                backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(8),
            },
            HashMap::from([("docker.io".to_string(), "alice".to_string())]),
        )
    }

    #[test]
    fn reads_docker_hub_and_plain_and_x_headers() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let hub = headers(&[
            ("ratelimit-limit", "100;w=21600"),
            ("ratelimit-remaining", "76;w=21600"),
        ]);
        assert_eq!(
            parse_quota(&hub, now),
            Some(Quota {
                remaining: 76,
                limit: Some(100),
                window: Some(Duration::from_secs(21600)),
                reset: None
            })
        );
        let plain = headers(&[
            ("ratelimit-remaining", " 5 "),
            ("ratelimit-limit", "10"),
            ("ratelimit-reset", "30"),
        ]);
        assert_eq!(
            parse_quota(&plain, now),
            Some(Quota {
                remaining: 5,
                limit: Some(10),
                window: None,
                reset: Some(Duration::from_secs(30))
            })
        );
        let x = headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1700000042"),
        ]);
        let q = parse_quota(&x, now).unwrap();
        assert_eq!(
            (q.remaining, q.reset),
            (0, Some(Duration::from_secs(42))),
            "a Unix reset time"
        );
        assert_eq!(
            parse_quota(
                &headers(&[("x-ratelimit-remaining", "3"), ("x-ratelimit-reset", "9")]),
                now
            )
            .unwrap()
            .reset,
            Some(Duration::from_secs(9)),
            "a reset in seconds"
        );
        // A window parameter that is not a number is dropped; the count stays.
        assert_eq!(
            parse_quota(&headers(&[("ratelimit-remaining", "7;w=soon")]), now)
                .map(|q| (q.remaining, q.window)),
            Some((7, None))
        );
    }

    #[test]
    fn garbage_quota_headers_are_ignored() {
        let now = SystemTime::now();
        for bad in [
            "",
            "many",
            "-1",
            "1e3",
            ";w=60",
            "76 ;",
            "99999999999999999999999",
        ] {
            let h = headers(&[("ratelimit-remaining", bad)]);
            let parsed = parse_quota(&h, now);
            assert!(parsed.is_none() || bad == "76 ;", "{bad:?} gave {parsed:?}");
        }
        assert_eq!(
            parse_quota(&headers(&[("ratelimit-remaining", "76 ;")]), now).map(|q| q.remaining),
            Some(76),
            "an empty parameter list is harmless"
        );
        assert_eq!(parse_quota(&HeaderMap::new(), now), None);
        // A garbage limit or reset does not lose the remaining count.
        let q = parse_quota(
            &headers(&[
                ("ratelimit-remaining", "4"),
                ("ratelimit-limit", "x"),
                ("ratelimit-reset", "later"),
            ]),
            now,
        )
        .unwrap();
        assert_eq!((q.remaining, q.limit, q.reset), (4, None, None));
    }

    #[tokio::test]
    async fn manifest_gets_count_as_free_only_once_one_was_answered_without_an_allowance() {
        let b = budgets(60);
        assert!(b.meters("r.example"), "unknown: it may count");
        // A HEAD, and a refused GET, say nothing about the allowance.
        let head = b.acquire("r.example", false).await.unwrap();
        assert!(head.observe(StatusCode::OK, &HeaderMap::new()).is_none());
        let missing = b.acquire("r.example", true).await.unwrap();
        assert!(
            missing
                .observe(StatusCode::NOT_FOUND, &HeaderMap::new())
                .is_none()
        );
        assert!(b.meters("r.example"));
        let get = b.acquire("r.example", true).await.unwrap();
        assert!(get.observe(StatusCode::OK, &HeaderMap::new()).is_none());
        assert!(
            !b.meters("r.example"),
            "a GET answered without an allowance"
        );
        // One that tells an allowance counts again, and Docker Hub always does.
        let told = b.acquire("r.example", true).await.unwrap();
        let limit = headers(&[
            ("ratelimit-limit", "100;w=21600"),
            ("ratelimit-remaining", "99;w=21600"),
        ]);
        assert!(told.observe(StatusCode::OK, &limit).is_none());
        assert!(b.meters("r.example"));
        let hub = b.acquire("docker.io", true).await.unwrap();
        assert!(hub.observe(StatusCode::OK, &HeaderMap::new()).is_none());
        assert!(b.meters("docker.io"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_with_retry_after_pauses_every_caller_of_the_budget() {
        let b = budgets(60);
        let first = b.acquire("docker.io", true).await.unwrap();
        let refused = first.observe(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "5")]),
        );
        assert!(refused.is_none(), "5 s is within the 60 s a request waits");
        // Another caller (another worker) of the same registry waits out the pause.
        let started = Instant::now();
        let other = tokio::spawn(async move {
            b.acquire("docker.io", false).await.unwrap();
            Instant::now()
        });
        let resumed = other.await.unwrap();
        assert!(
            resumed - started >= Duration::from_secs(5),
            "waited {:?}",
            resumed - started
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_longer_than_the_max_wait_is_an_error_naming_the_remaining_time() {
        let b = budgets(10);
        let t = b.acquire("docker.io", false).await.unwrap();
        let e = t
            .observe(
                StatusCode::TOO_MANY_REQUESTS,
                &headers(&[("retry-after", "3600")]),
            )
            .expect("an hour is longer than 10 s");
        assert!(matches!(e, Error::RateLimited { .. }), "{e}");
        assert!(e.is_transient());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3600)));
        tokio::time::advance(Duration::from_secs(600)).await;
        let e = b
            .acquire("docker.io", false)
            .await
            .err()
            .expect("still paused");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3000)));
        assert!(e.to_string().contains("Retry-After 3600 s"), "{e}");
        // Another registry has its own budget.
        assert!(b.acquire("ghcr.io", false).await.is_ok());
        // A 503 with Retry-After pauses too.
        let t = b.acquire("ghcr.io", false).await.unwrap();
        assert!(
            t.observe(
                StatusCode::SERVICE_UNAVAILABLE,
                &headers(&[("retry-after", "120")])
            )
            .is_some()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_known_allowance_lets_exactly_that_many_metered_requests_through() {
        let b = budgets(0);
        // A HEAD (not metered) tells the allowance.
        let head = b.acquire("docker.io", false).await.unwrap();
        assert!(
            head.observe(
                StatusCode::OK,
                &headers(&[("ratelimit-remaining", "3;w=30")])
            )
            .is_none()
        );
        // Ten workers race for manifest GETs: three leave, the rest are told to wait for the window.
        let mut ok = Vec::new();
        let mut refused = Vec::new();
        for _ in 0..10 {
            match b.acquire("docker.io", true).await {
                Ok(t) => ok.push(t),
                Err(e) => refused.push(e),
            }
        }
        assert_eq!(ok.len(), 3);
        assert_eq!(refused.len(), 7);
        assert_eq!(refused[0].retry_after(), Some(Duration::from_secs(30)));
        // HEADs and blobs are not metered: they still go.
        assert!(b.acquire("docker.io", false).await.is_ok());
        // The answers to the three arrive; the registry's count agrees.
        for (t, left) in ok.into_iter().zip(["2", "1", "0"]) {
            t.observe(StatusCode::OK, &headers(&[("ratelimit-remaining", left)]));
        }
        assert!(b.acquire("docker.io", true).await.is_err());
        // When the window has passed, metered requests go again.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(b.acquire("docker.io", true).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn answers_in_flight_do_not_hand_out_the_allowance_twice() {
        let b = budgets(0);
        let head = b.acquire("docker.io", false).await.unwrap();
        head.observe(StatusCode::OK, &headers(&[("ratelimit-remaining", "2")]));
        let a = b.acquire("docker.io", true).await.unwrap();
        let c = b.acquire("docker.io", true).await.unwrap();
        // The first answer says 1 left: that one is `c`, still in flight, so none is free.
        a.observe(StatusCode::OK, &headers(&[("ratelimit-remaining", "1")]));
        assert!(b.acquire("docker.io", true).await.is_err());
        drop(c);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_answer_to_an_earlier_request_is_not_a_new_window() {
        let b = budgets(0);
        let head = b.acquire("docker.io", false).await.unwrap();
        head.observe(
            StatusCode::OK,
            &headers(&[("ratelimit-remaining", "2;w=30")]),
        );
        // Copy B's HEAD leaves, then copy A's GET; A's answer comes back first.
        let late_head = b.acquire("docker.io", false).await.unwrap();
        let get = b.acquire("docker.io", true).await.unwrap();
        get.observe(
            StatusCode::OK,
            &headers(&[("ratelimit-remaining", "1;w=30")]),
        );
        // B's HEAD was answered before A's GET was counted: its 2 is old news.
        late_head.observe(
            StatusCode::OK,
            &headers(&[("ratelimit-remaining", "2;w=30")]),
        );
        assert!(b.acquire("docker.io", true).await.is_ok());
        assert!(
            b.acquire("docker.io", true).await.is_err(),
            "one was left, not two"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn answers_the_registry_counted_in_another_order_do_not_raise_the_allowance() {
        let b = budgets(0);
        // Two GETs leave at once on two connections; the registry counts the second one first,
        // so the first answer to arrive (to the first GET) says 0 and the second says 1.
        let first = b.acquire("docker.io", true).await.unwrap();
        let second = b.acquire("docker.io", true).await.unwrap();
        first.observe(
            StatusCode::OK,
            &headers(&[("ratelimit-remaining", "0;w=30")]),
        );
        second.observe(
            StatusCode::OK,
            &headers(&[("ratelimit-remaining", "1;w=30")]),
        );
        assert!(
            b.acquire("docker.io", true).await.is_err(),
            "the 1 was counted before the 0: the allowance is spent until the window ends"
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(b.acquire("docker.io", true).await.is_ok(), "a new window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_without_retry_after_backs_off_and_a_success_resets_it() {
        let b = budgets(60);
        let mut pauses = Vec::new();
        for _ in 0..3 {
            let t = b.acquire("docker.io", false).await.unwrap();
            let before = Instant::now();
            assert!(
                t.observe(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new())
                    .is_none()
            );
            b.acquire("docker.io", false).await.unwrap();
            pauses.push(Instant::now() - before);
        }
        assert!(pauses[0] >= Duration::from_millis(500), "{pauses:?}");
        assert!(pauses[2] >= Duration::from_secs(2), "grows: {pauses:?}");
        let t = b.acquire("docker.io", false).await.unwrap();
        t.observe(StatusCode::OK, &HeaderMap::new());
        let t = b.acquire("docker.io", false).await.unwrap();
        let before = Instant::now();
        t.observe(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new());
        b.acquire("docker.io", false).await.unwrap();
        assert!(Instant::now() - before <= Duration::from_secs(1), "reset");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hostile_retry_after_is_capped() {
        let b = budgets(0);
        let t = b.acquire("docker.io", false).await.unwrap();
        let e = t
            .observe(
                StatusCode::TOO_MANY_REQUESTS,
                &headers(&[("retry-after", "999999999")]),
            )
            .unwrap();
        assert_eq!(e.retry_after(), Some(MAX_PAUSE));
    }
}
