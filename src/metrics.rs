//! Process-wide counters, exposed at `/metrics` through `prometheus-client` (the Prometheus
//! project's Rust client) in the Prometheus text format.
//!
//! Counters are the client's atomics, cheap to bump on hot paths; gauges that live in the database
//! (jobs by state, queue depth) or in the rate-limit budgets are read at scrape time.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge as PromGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A monotonically increasing counter.
#[derive(Debug, Default, Clone)]
pub struct Counter(PromCounter<u64, AtomicU64>);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// Upper bounds (seconds) of the job duration histogram buckets.
pub const DURATION_BUCKETS: [f64; 10] =
    [0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// Label pairs of one sample.
pub type Labels = Vec<(String, String)>;

type CounterFamily = Family<Labels, PromCounter<u64, AtomicU64>>;
type GaugeFamily = Family<Labels, PromGauge<f64, AtomicU64>>;

/// A gauge read at scrape time: name, help, and samples as (label pairs, possibly none; value).
pub type Gauge<'a> = (&'a str, &'a str, Vec<(Labels, f64)>);

/// A registry's rate-limit budget as `/metrics` shows it: the allowance left, if the registry
/// says, and until when requests to it wait.
pub type RateLimitState = (Option<u64>, Option<SystemTime>);

/// Every counter the process keeps.
#[derive(Debug)]
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
    registry_requests: CounterFamily,
    /// Webhook deliveries by outcome.
    webhook_deliveries: CounterFamily,
    /// Finished jobs' durations.
    job_durations: Histogram,
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
    /// Ledger lookups (`/images`, `/digests`) answered from the read cache, and ones that read
    /// the database.
    pub read_cache_hits: Counter,
    pub read_cache_misses: Counter,
    /// Drift watch: problems newly found, by kind.
    pub drift_found: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            bytes_copied: Counter::default(),
            blobs_uploaded: Counter::default(),
            blobs_mounted: Counter::default(),
            blobs_skipped: Counter::default(),
            retries: Counter::default(),
            rate_limit_waits: Counter::default(),
            rate_limits: Mutex::default(),
            registry_requests: CounterFamily::default(),
            webhook_deliveries: CounterFamily::default(),
            job_durations: Histogram::new(DURATION_BUCKETS),
            drift_checks: Counter::default(),
            drift_check_errors: Counter::default(),
            drift_jobs: Counter::default(),
            sync_runs: Counter::default(),
            sync_errors: Counter::default(),
            sync_jobs: Counter::default(),
            worker_restarts: Counter::default(),
            read_cache_hits: Counter::default(),
            read_cache_misses: Counter::default(),
            drift_found: Mutex::default(),
        }
    }
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

fn label(k: &str, v: impl Into<String>) -> Labels {
    vec![(k.to_string(), v.into())]
}

impl Metrics {
    /// Counts one registry answer.
    pub fn registry_request(&self, registry: &str, status: u16) {
        self.registry_requests
            .get_or_create(&vec![
                ("registry".to_string(), registry.to_string()),
                ("status".to_string(), status.to_string()),
            ])
            .inc();
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
        self.webhook_deliveries
            .get_or_create(&label("outcome", outcome))
            .inc();
    }

    /// Records a finished job's duration.
    pub fn job_finished(&self, seconds: f64) {
        self.job_durations.observe(seconds);
    }

    /// Renders the counters (plus `gauges`, read by the caller) in the Prometheus text format
    /// (version 0.0.4), through `prometheus-client`'s encoder.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut reg = Registry::default();
        for (name, help, samples) in gauges {
            register_gauges(&mut reg, name, help, samples);
        }
        let counters: [(&str, &str, &Counter); 15] = [
            (
                "mirror_worker_restarts",
                "Worker tasks that panicked and were started again",
                &self.worker_restarts,
            ),
            (
                "mirror_bytes_copied",
                "Blob bytes that crossed the wire",
                &self.bytes_copied,
            ),
            (
                "mirror_blobs_uploaded",
                "Blobs streamed to a target",
                &self.blobs_uploaded,
            ),
            (
                "mirror_blobs_mounted",
                "Blobs linked by cross-repository mount",
                &self.blobs_mounted,
            ),
            (
                "mirror_blobs_skipped",
                "Blobs the target already had",
                &self.blobs_skipped,
            ),
            (
                "mirror_registry_retries",
                "Retries of transient registry failures",
                &self.retries,
            ),
            (
                "mirror_registry_rate_limit_waits",
                "Waits for a registry's rate limit (Retry-After, a 429, a paused or spent budget)",
                &self.rate_limit_waits,
            ),
            ("mirror_sync_runs", "Mirror list syncs run", &self.sync_runs),
            (
                "mirror_sync_errors",
                "Mirror list entries (or unreadable files) that could not be synced",
                &self.sync_errors,
            ),
            (
                "mirror_sync_jobs",
                "Jobs queued by the mirror list",
                &self.sync_jobs,
            ),
            (
                "mirror_drift_checks",
                "Mirrored tags (or digests) re-checked by drift watch",
                &self.drift_checks,
            ),
            (
                "mirror_drift_check_errors",
                "Drift checks that could not reach a registry",
                &self.drift_check_errors,
            ),
            (
                "mirror_drift_jobs",
                "Jobs queued by drift watch to follow a moved tag or repair a mirror",
                &self.drift_jobs,
            ),
            (
                "mirror_read_cache_hits",
                "Ledger lookups (/images, /digests) answered from the read cache",
                &self.read_cache_hits,
            ),
            (
                "mirror_read_cache_misses",
                "Ledger lookups (/images, /digests) that read the database",
                &self.read_cache_misses,
            ),
        ];
        for (name, help, c) in counters {
            reg.register(name, help, c.0.clone());
        }
        reg.register(
            "mirror_registry_requests",
            "Registry answers by registry and HTTP status",
            self.registry_requests.clone(),
        );
        let (remaining, paused) = (GaugeFamily::default(), GaugeFamily::default());
        let now = SystemTime::now();
        for (registry, (left, until)) in self.rate_limits.lock().expect("metrics poisoned").iter() {
            if let Some(n) = left {
                remaining
                    .get_or_create(&label("registry", registry.as_str()))
                    .set(*n as f64);
            }
            let wait = until
                .and_then(|u| u.duration_since(now).ok())
                .unwrap_or_default();
            paused
                .get_or_create(&label("registry", registry.as_str()))
                .set(wait.as_secs_f64().ceil());
        }
        reg.register(
            "mirror_registry_rate_limit_remaining",
            "Requests the registry last said are left in its rate-limit window, less those sent since",
            remaining,
        );
        reg.register(
            "mirror_registry_rate_limit_paused_seconds",
            "Seconds until requests to the registry resume after a rate limit (0: not paused)",
            paused,
        );
        reg.register(
            "mirror_webhook_deliveries",
            "GitHub webhook deliveries by outcome",
            self.webhook_deliveries.clone(),
        );
        let found = CounterFamily::default();
        for (kind, n) in self.drift_found.lock().expect("metrics poisoned").iter() {
            found.get_or_create(&label("kind", *kind)).inc_by(*n);
        }
        reg.register("mirror_drift_found", "Drift newly found, by kind", found);
        reg.register(
            "mirror_job_duration_seconds",
            "Time from claim to result of finished jobs",
            self.job_durations.clone(),
        );
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Registers a gauge read at scrape time: unlabelled when its one sample has no labels.
fn register_gauges(reg: &mut Registry, name: &str, help: &str, samples: &[(Labels, f64)]) {
    let help = help.trim_end_matches('.');
    if let [(labels, v)] = samples
        && labels.is_empty()
    {
        let g = PromGauge::<f64, AtomicU64>::default();
        g.set(*v);
        reg.register(name, help, g);
        return;
    }
    let family = GaugeFamily::default();
    for (labels, v) in samples {
        family.get_or_create(labels).set(*v);
    }
    reg.register(name, help, family);
}
