//! `mirror-mirror import` (issue 14): a SQLite service's history moves into a new PostgreSQL
//! database — ledger, jobs, requests — and a service on PostgreSQL answers what the old one did,
//! its new jobs numbered after the imported ones. A second import into the same database refuses.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::image::Style;
use crate::support::service::{Launch, Service, free_port};
use crate::support::{Pusher, Registry, bin, postgres as pg};

/// Starts `serve` on `database` (whatever `MIRROR_TEST_DATABASE` says) and waits until ready.
async fn serve(dir: &std::path::Path, database: &str, down: &Registry, up: &Registry) -> Service {
    let (target, allowed) = (format!("{}/mirror", down.host()), up.host());
    let mut svc = Service::spawn(&Launch {
        database,
        dir,
        port: free_port(),
        log: dir.join(format!("serve-{}.log", free_port())),
        target: &target,
        allowed: &allowed,
        env: &[("MIRROR_DRIFT_INTERVAL", "0"), ("MIRROR_MAX_ATTEMPTS", "1")],
    });
    svc.wait_answering("/readyz", Duration::from_secs(30)).await;
    svc
}

async fn mirror(svc: &Service, image: &str) -> Value {
    let (status, job) = svc.mirror(&json!({ "image": image })).await;
    assert_eq!(status, 202, "{job}");
    svc.wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await
}

fn import(from: &str, to: &str) -> std::process::Output {
    Command::new(bin())
        .args(["import", "--from", from, "--to", to])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_history_moves_to_postgres_and_the_service_answers_the_same() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&up);
    let a = p
        .image("move/a", 31, &[3000, 5000], true, Style::Compact)
        .await;
    p.manifest("move/a", "v1", &a.media_type, &a.bytes).await;
    let b = p.image("move/b", 32, &[4000], true, Style::Compact).await;
    p.manifest("move/b", "v1", &b.media_type, &b.bytes).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("old.db");
    let file = file.to_str().unwrap();
    // The old service, on SQLite: two mirrored images and one job that failed for good.
    let mut old = serve(dir.path(), file, &down, &up).await;
    let ja = mirror(&old, &format!("{}/move/a:v1", up.host())).await;
    let jb = mirror(&old, &format!("{}/move/b:v1", up.host())).await;
    let gone = mirror(&old, &format!("{}/move/gone:v1", up.host())).await;
    assert_eq!(
        (
            ja["state"].as_str(),
            jb["state"].as_str(),
            gone["state"].as_str()
        ),
        (Some("succeeded"), Some("succeeded"), Some("failed"))
    );
    let image_path = format!("/images/{}/move/a:v1", up.host());
    let (_, before) = old.get(&image_path).await;
    let (_, by_digest_before) = old.get(&format!("/digests/{}", a.digest)).await;
    old.terminate(Duration::from_secs(30));

    let url = pg::shared().database().await;
    let out = import(file, &url);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("job 3,") && stdout.contains("mirror_record 2,"),
        "says what it moved: {stdout}"
    );
    // Into a database that holds something: refused, one line, nothing written.
    let again = import(file, &url);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert_eq!(
        stderr.trim(),
        "error: --to already holds 3 jobs and 2 ledger records; import into a new, empty database",
        "{stderr}"
    );
    let missing = import(&dir.path().join("nope.db").display().to_string(), &url);
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no such file"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // The new service, on PostgreSQL, answers what the old one did.
    let new = serve(dir.path(), &url, &down, &up).await;
    let (status, after) = new.get(&image_path).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after, before, "the same answer, verified time included");
    let (_, by_digest_after) = new.get(&format!("/digests/{}", a.digest)).await;
    assert_eq!(by_digest_after, by_digest_before);
    for old_job in [&ja, &jb, &gone] {
        let (status, job) = new.get(&format!("/jobs/{}", old_job["id"])).await;
        assert_eq!(status, 200, "{job}");
        assert_eq!(job["state"], old_job["state"], "{job}");
        assert_eq!(job["source_digest"], old_job["source_digest"], "{job}");
        assert_eq!(job["requested_by"], old_job["requested_by"], "{job}");
    }
    // New work goes on after the imported ids.
    let c = p.image("move/c", 33, &[2000], true, Style::Compact).await;
    p.manifest("move/c", "v1", &c.media_type, &c.bytes).await;
    let jc = mirror(&new, &format!("{}/move/c:v1", up.host())).await;
    assert_eq!(jc["state"], "succeeded", "{jc}");
    assert!(
        jc["id"].as_i64().unwrap() > gone["id"].as_i64().unwrap(),
        "{jc}"
    );
}
