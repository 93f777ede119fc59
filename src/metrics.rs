//! Process-wide counters and the Prometheus text rendering behind `/metrics`.
//!
//! Counters are plain atomics (and one map for labelled registry requests), cheap to bump on hot
//! paths; gauges that live in the database (jobs by state, queue depth) are read at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::SystemTime;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the job duration histogram buckets.
pub const DURATION_BUCKETS: [f64; 10] =
    [0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// A gauge read at scrape time: name, help, and samples as (`{label="…"}` or empty, value).
pub type Gauge<'a> = (&'a str, &'a str, Vec<(String, f64)>);

/// A registry's rate-limit budget as `/metrics` shows it: the allowance left, if the registry
/// says, and until when requests to it wait.
pub type RateLimitState = (Option<u64>, Option<SystemTime>);

/// Every counter the process keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Blob bytes that crossed the wire in copies.
    pub bytes_copied: Counter,
    pub blobs_uploaded: Counter,
    pub blobs_mounted: Counter,
    pub blobs_skipped: Counter,
    /// Retries of transient registry failures.
    pub retries: Counter,
    /// Waits for a registry's rate limit: retries after `Retry-After` or a 429, and requests held
    /// by a paused budget.
    pub rate_limit_waits: Counter,
    /// Rate-limit budgets by registry.
    pub rate_limits: Mutex<BTreeMap<String, RateLimitState>>,
    /// Registry requests by (registry, HTTP status).
    pub registry_requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Webhook deliveries by outcome.
    pub webhook_deliveries: Mutex<BTreeMap<&'static str, u64>>,
    /// Finished jobs' durations: bucket counts, sum, count.
    job_durations: Mutex<([u64; DURATION_BUCKETS.len()], f64, u64)>,
    /// Drift watch: mirrored tags checked, checks that failed, jobs queued to follow or repair.
    pub drift_checks: Counter,
    pub drift_check_errors: Counter,
    pub drift_jobs: Counter,
    /// Mirror list syncs run, entries (or whole files) that failed, jobs queued.
    pub sync_runs: Counter,
    pub sync_errors: Counter,
    pub sync_jobs: Counter,
    /// Worker tasks that panicked and were started again.
    pub worker_restarts: Counter,
    /// Drift watch: problems newly found, by kind.
    pub drift_found: Mutex<BTreeMap<&'static str, u64>>,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

impl Metrics {
    /// Counts one registry answer.
    pub fn registry_request(&self, registry: &str, status: u16) {
        *self
            .registry_requests
            .lock()
            .expect("metrics poisoned")
            .entry((registry.to_string(), status))
            .or_default() += 1;
    }

    /// Records a registry's rate-limit budget: the allowance left (if it says) and until when
    /// requests to it wait.
    pub fn rate_limit(
        &self,
        registry: &str,
        remaining: Option<u64>,
        paused_until: Option<SystemTime>,
    ) {
        self.rate_limits
            .lock()
            .expect("metrics poisoned")
            .insert(registry.to_string(), (remaining, paused_until));
    }

    /// Counts one webhook delivery.
    pub fn webhook(&self, outcome: &'static str) {
        *self
            .webhook_deliveries
            .lock()
            .expect("metrics poisoned")
            .entry(outcome)
            .or_default() += 1;
    }

    /// Records a finished job's duration.
    pub fn job_finished(&self, seconds: f64) {
        let mut h = self.job_durations.lock().expect("metrics poisoned");
        for (i, le) in DURATION_BUCKETS.iter().enumerate() {
            if seconds <= *le {
                h.0[i] += 1;
            }
        }
        h.1 += seconds;
        h.2 += 1;
    }

    /// Renders the counters (plus `gauges`, read by the caller) in the Prometheus text format.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut out = String::new();
        for (name, help, samples) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        }
        let counters: [(&str, &str, &Counter); 13] = [
            (
                "mirror_worker_restarts_total",
                "Worker tasks that panicked and were started again.",
                &self.worker_restarts,
            ),
            (
                "mirror_bytes_copied_total",
                "Blob bytes that crossed the wire.",
                &self.bytes_copied,
            ),
            (
                "mirror_blobs_uploaded_total",
                "Blobs streamed to a target.",
                &self.blobs_uploaded,
            ),
            (
                "mirror_blobs_mounted_total",
                "Blobs linked by cross-repository mount.",
                &self.blobs_mounted,
            ),
            (
                "mirror_blobs_skipped_total",
                "Blobs the target already had.",
                &self.blobs_skipped,
            ),
            (
                "mirror_registry_retries_total",
                "Retries of transient registry failures.",
                &self.retries,
            ),
            (
                "mirror_registry_rate_limit_waits_total",
                "Waits for a registry's rate limit (Retry-After, a 429, a paused or spent budget).",
                &self.rate_limit_waits,
            ),
            (
                "mirror_sync_runs_total",
                "Mirror list syncs run.",
                &self.sync_runs,
            ),
            (
                "mirror_sync_errors_total",
                "Mirror list entries (or unreadable files) that could not be synced.",
                &self.sync_errors,
            ),
            (
                "mirror_sync_jobs_total",
                "Jobs queued by the mirror list.",
                &self.sync_jobs,
            ),
            (
                "mirror_drift_checks_total",
                "Mirrored tags (or digests) re-checked by drift watch.",
                &self.drift_checks,
            ),
            (
                "mirror_drift_check_errors_total",
                "Drift checks that could not reach a registry.",
                &self.drift_check_errors,
            ),
            (
                "mirror_drift_jobs_total",
                "Jobs queued by drift watch to follow a moved tag or repair a mirror.",
                &self.drift_jobs,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP mirror_registry_requests_total Registry answers by registry and HTTP status.\n# TYPE mirror_registry_requests_total counter"
        );
        for ((registry, status), n) in self
            .registry_requests
            .lock()
            .expect("metrics poisoned")
            .iter()
        {
            let _ = writeln!(
                out,
                "mirror_registry_requests_total{{registry=\"{}\",status=\"{status}\"}} {n}",
                escape(registry)
            );
        }
        let limits = self.rate_limits.lock().expect("metrics poisoned");
        let _ = writeln!(
            out,
            "# HELP mirror_registry_rate_limit_remaining Requests the registry last said are left in its rate-limit window, less those sent since.\n# TYPE mirror_registry_rate_limit_remaining gauge"
        );
        for (registry, (remaining, _)) in limits.iter() {
            if let Some(n) = remaining {
                let _ = writeln!(
                    out,
                    "mirror_registry_rate_limit_remaining{{registry=\"{}\"}} {n}",
                    escape(registry)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP mirror_registry_rate_limit_paused_seconds Seconds until requests to the registry resume after a rate limit (0: not paused).\n# TYPE mirror_registry_rate_limit_paused_seconds gauge"
        );
        let now = SystemTime::now();
        for (registry, (_, until)) in limits.iter() {
            let left = until
                .and_then(|u| u.duration_since(now).ok())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "mirror_registry_rate_limit_paused_seconds{{registry=\"{}\"}} {}",
                escape(registry),
                left.as_secs_f64().ceil()
            );
        }
        drop(limits);
        let _ = writeln!(
            out,
            "# HELP mirror_webhook_deliveries_total GitHub webhook deliveries by outcome.\n# TYPE mirror_webhook_deliveries_total counter"
        );
        for (outcome, n) in self
            .webhook_deliveries
            .lock()
            .expect("metrics poisoned")
            .iter()
        {
            let _ = writeln!(
                out,
                "mirror_webhook_deliveries_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP mirror_drift_found_total Drift newly found, by kind.\n# TYPE mirror_drift_found_total counter"
        );
        for (kind, n) in self.drift_found.lock().expect("metrics poisoned").iter() {
            let _ = writeln!(out, "mirror_drift_found_total{{kind=\"{kind}\"}} {n}");
        }
        let h = self.job_durations.lock().expect("metrics poisoned");
        let _ = writeln!(
            out,
            "# HELP mirror_job_duration_seconds Time from claim to result of finished jobs.\n# TYPE mirror_job_duration_seconds histogram"
        );
        for (i, le) in DURATION_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "mirror_job_duration_seconds_bucket{{le=\"{le}\"}} {}",
                h.0[i]
            );
        }
        let _ = writeln!(
            out,
            "mirror_job_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            h.2
        );
        let _ = writeln!(
            out,
            "mirror_job_duration_seconds_sum {}\nmirror_job_duration_seconds_count {}",
            h.1, h.2
        );
        out
    }
}

/// Escapes a Prometheus label value.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
