//! `/metrics` through prometheus-client: the exposition parses under a strict parser of the text
//! format, hostile label values included, and a real service's `/metrics` after a job has every
//! family the README lists, under the names it always had.

use std::time::{Duration, SystemTime};

use mirror_mirror::metrics::Metrics;
use serde_json::json;

use crate::support::image::{Style, platform};
use crate::support::prom::{parse, value};
use crate::support::service::Service;
use crate::support::{Pusher, Registry};

#[test]
fn the_exposition_parses_strictly_with_every_metric_and_hostile_labels() {
    let m = Metrics::default();
    let evil = "evil\"host\\\n:5000";
    m.registry_request(evil, 429);
    m.registry_request("127.0.0.1:5000", 201);
    m.registry_request("127.0.0.1:5000", 201);
    m.webhook("accepted");
    m.job_finished(0.7);
    m.bytes_copied.add(42);
    m.rate_limit(
        "docker.io",
        Some(3),
        Some(SystemTime::now() + std::time::Duration::from_secs(10)),
    );
    m.drift_found.lock().unwrap().insert("upstream_moved", 2);
    let text = m.render(&[
        (
            "mirror_jobs",
            "Jobs by state.",
            vec![
                (vec![("state".into(), "queued".into())], 2.0),
                (vec![("state".into(), "failed".into())], 0.0),
            ],
        ),
        ("mirror_queue_depth", "Jobs waiting.", vec![(vec![], 2.0)]),
    ]);
    let s = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(
        !text.contains(".."),
        "help ends with one full stop:\n{text}"
    );
    assert_eq!(
        value(
            &s,
            "mirror_registry_requests_total",
            &[("registry", evil), ("status", "429")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &s,
            "mirror_registry_requests_total",
            &[("registry", "127.0.0.1:5000"), ("status", "201")]
        ),
        Some(2.0)
    );
    assert_eq!(value(&s, "mirror_bytes_copied_total", &[]), Some(42.0));
    assert_eq!(value(&s, "mirror_jobs", &[("state", "queued")]), Some(2.0));
    assert_eq!(value(&s, "mirror_queue_depth", &[]), Some(2.0));
    assert_eq!(
        value(
            &s,
            "mirror_registry_rate_limit_remaining",
            &[("registry", "docker.io")]
        ),
        Some(3.0)
    );
    let paused = value(
        &s,
        "mirror_registry_rate_limit_paused_seconds",
        &[("registry", "docker.io")],
    )
    .unwrap();
    assert!((9.0..=10.0).contains(&paused), "{paused}");
    assert_eq!(
        value(
            &s,
            "mirror_webhook_deliveries_total",
            &[("outcome", "accepted")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "mirror_drift_found_total",
            &[("kind", "upstream_moved")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "mirror_job_duration_seconds_bucket", &[("le", "0.5")]),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "mirror_job_duration_seconds_bucket", &[("le", "1")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "mirror_job_duration_seconds_bucket", &[("le", "+Inf")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "mirror_job_duration_seconds_count", &[]),
        Some(1.0)
    );
    assert_eq!(value(&s, "mirror_job_duration_seconds_sum", &[]), Some(0.7));
    // Every counter the README lists is there, under its old name.
    for name in [
        "mirror_blobs_uploaded_total",
        "mirror_blobs_mounted_total",
        "mirror_blobs_skipped_total",
        "mirror_registry_retries_total",
        "mirror_registry_rate_limit_waits_total",
        "mirror_sync_runs_total",
        "mirror_sync_errors_total",
        "mirror_sync_jobs_total",
        "mirror_drift_checks_total",
        "mirror_drift_check_errors_total",
        "mirror_drift_jobs_total",
        "mirror_worker_restarts_total",
    ] {
        assert_eq!(value(&s, name, &[]), Some(0.0), "{name}:\n{text}");
    }
    // The parser is strict: it refuses what is not the format.
    assert!(parse("mirror_x 1").is_err());
    assert!(parse("# HELP a b\n# TYPE a gauge\na{l=\"x} 1").is_err());
    assert!(parse("# HELP a b\n# TYPE a gauge\na{l=\"\\t\"} 1").is_err());
    assert!(parse("# HELP a b\n# TYPE a gauge\na one").is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_services_metrics_parse_strictly_with_every_family() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[],
    )
    .await;
    let p = Pusher::new(&up);
    let a = p.image("team/app", 1, &[3000], false, Style::Compact).await;
    let b = p.image("team/app", 2, &[4000], false, Style::Compact).await;
    p.index(
        "team/app",
        Some("1.0"),
        &[
            (a, platform("linux", "amd64")),
            (b, platform("linux", "arm64")),
        ],
        false,
        Style::Compact,
    )
    .await;
    let (status, job) = svc
        .mirror(&json!({ "image": format!("{}/team/app:1.0", up.host()) }))
        .await;
    assert_eq!(status, 202);
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded");
    let (status, text) = svc.get_text("/metrics").await;
    assert_eq!(status, 200);
    let s = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        value(&s, "mirror_jobs", &[("state", "succeeded")]),
        Some(1.0)
    );
    assert_eq!(value(&s, "mirror_queue_depth", &[]), Some(0.0));
    assert_eq!(value(&s, "mirror_blobs_uploaded_total", &[]), Some(4.0));
    assert_eq!(
        value(&s, "mirror_job_duration_seconds_count", &[]),
        Some(1.0)
    );
    assert!(
        value(
            &s,
            "mirror_registry_requests_total",
            &[("registry", &down.host()), ("status", "201")]
        )
        .unwrap()
            >= 4.0
    );
    let families: std::collections::BTreeSet<&str> = s.iter().map(|x| x.0.as_str()).collect();
    for name in [
        "mirror_jobs",
        "mirror_queue_depth",
        "mirror_queue_oldest_age_seconds",
        "mirror_workers_running",
        "mirror_drift_open",
        "mirror_drift_last_round_timestamp_seconds",
        "mirror_bytes_copied_total",
        "mirror_blobs_mounted_total",
        "mirror_blobs_skipped_total",
        "mirror_registry_retries_total",
        "mirror_registry_rate_limit_waits_total",
        "mirror_sync_runs_total",
        "mirror_drift_checks_total",
        "mirror_worker_restarts_total",
        "mirror_job_duration_seconds_bucket",
        "mirror_job_duration_seconds_sum",
    ] {
        assert!(families.contains(name), "{name} missing:\n{text}");
    }
}
