//! `mirror-mirror serve` end to end: real registries, a real SQLite file, the real binary.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::image::{Style, platform};
use crate::support::service::{Service, TOKEN};
use crate::support::{Pusher, Registry, bin, sha256, skopeo};

async fn two_platforms(
    up: &Registry,
    repo: &str,
    tag: &str,
    seed: u64,
    big: usize,
) -> crate::support::image::TestImage {
    let p = Pusher::new(up);
    let a = p
        .image(repo, seed, &[20_000, big], false, Style::Compact)
        .await;
    let b = p
        .image(repo, seed + 1, &[30_000], false, Style::Compact)
        .await;
    p.index(
        repo,
        Some(tag),
        &[
            (a, platform("linux", "amd64")),
            (b, platform("linux", "arm64")),
        ],
        false,
        Style::CrlfOdd,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn post_mirror_to_trusted_digest_lookup() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[],
    )
    .await;
    let idx = two_platforms(&up, "team/app", "1.0", 1, 1000).await;
    let (status, job) = svc
        .mirror(&json!({ "image": format!("{}/team/app:1.0", up.host()) }))
        .await;
    assert_eq!(status, 202, "{job}");
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["source_digest"], json!(idx.digest));
    assert_eq!(job["requested_by"], json!({"kind": "token", "name": "ci"}));
    let mirror_repo = format!(
        "{}/mirror/{}/team/app",
        down.host(),
        up.host().replace(':', "_")
    );
    assert_eq!(job["pull"], json!(format!("{mirror_repo}@{}", idx.digest)));

    // The lookup by source name answers the trusted digest and pull lines that really serve it.
    let (status, image) = svc.get(&format!("/images/{}/team/app", up.host())).await;
    assert_eq!(status, 200, "{image}");
    let tag = &image["tags"][0];
    assert_eq!(tag["digest"], json!(idx.digest));
    let by_tag = tag["pull"]["by_tag"].as_str().unwrap();
    assert_eq!(by_tag, format!("{mirror_repo}:1.0@{}", idx.digest));
    let raw = skopeo::inspect_raw(tag["pull"]["by_digest"].as_str().unwrap(), None);
    assert_eq!(
        sha256(&raw),
        idx.digest,
        "the pull line serves the source digest"
    );
    // By the mirror's name too, and the audit question by digest (a platform's manifest here).
    let (status, same) = svc.get(&format!("/images/{mirror_repo}:1.0")).await;
    assert_eq!((status, &same["digest"]), (200, &json!(idx.digest)));
    let child = image["tags"][0]["platforms"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, d) = svc.get(&format!("/digests/{child}")).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["records"][0]["as"], "platform manifest");

    // Upstream moves the tag: a new record, and the old one stays in the history.
    let idx2 = two_platforms(&up, "team/app", "1.0", 7, 1000).await;
    let (_, job2) = svc
        .mirror(&json!({ "image": format!("{}/team/app:1.0", up.host()) }))
        .await;
    let job2 = svc
        .wait_job(job2["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job2["source_digest"], json!(idx2.digest), "{job2}");
    let (_, hist) = svc
        .get(&format!("/images/{}/team/app:1.0", up.host()))
        .await;
    assert_eq!(hist["digest"], json!(idx2.digest));
    let digests: Vec<&Value> = hist["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["digest"])
        .collect();
    assert_eq!(digests, vec![&json!(idx2.digest), &json!(idx.digest)]);
    let (status, old) = svc.get(&format!("/digests/{}", idx.digest)).await;
    assert_eq!((status, &old["records"][0]["as"]), (200, &json!("image")));
    let (status, _) = svc.get("/images/quay.io/never/mirrored").await;
    assert_eq!(status, 404);
    let (status, list) = svc.get("/jobs?state=succeeded&limit=1").await;
    assert_eq!(status, 200);
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(list["jobs"][0]["id"], job2["id"], "newest first");
    assert_eq!(list["next"], job2["id"]);

    // The status page shows the image with its pull line, and the jobs.
    let html = reqwest::get(format!("{}/", svc.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.starts_with("<!doctype html>"));
    assert!(
        html.contains(&format!("docker pull {mirror_repo}:1.0@{}", idx2.digest)),
        "{html}"
    );
    assert!(html.contains("class=\"succeeded\""), "{html}");
    let none = reqwest::get(format!("{}/?q=%3Cscript%3Enothing", svc.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        none.contains("None yet")
            // askama escapes `<` as `&#60;`
            && none.contains("&#60;script&#62;nothing")
            && !none.contains("<script>"),
        "{none}"
    );
    let found = reqwest::get(format!("{}/?q=team/app", svc.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(found.contains(&idx2.digest));
}

#[tokio::test(flavor = "multi_thread")]
async fn kept_lookups_answer_the_next_copy_of_the_tag() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[("MIRROR_READ_CACHE_MAX_AGE", "600")],
    )
    .await;
    let p = Pusher::new(&up);
    let copy = |seed: u64| {
        let (p, svc, up) = (&p, &svc, &up);
        async move {
            let img = p
                .image("team/app", seed, &[1_000], false, Style::Compact)
                .await;
            p.manifest("team/app", "v1", &img.media_type, &img.bytes)
                .await;
            let (status, job) = svc
                .mirror(&json!({ "image": format!("{}/team/app:v1", up.host()) }))
                .await;
            assert_eq!(status, 202, "{job}");
            let job = svc
                .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(30))
                .await;
            assert_eq!(job["state"], "succeeded", "{job}");
            img.digest
        }
    };
    let first = copy(1).await;
    let lookups = [
        format!("/images/{}/team/app:v1", up.host()),
        format!("/images/{}/team/app", up.host()),
        format!("/digests/{first}"),
    ];
    let hits = crate::worker::metric(&svc, "mirror_read_cache_hits_total").await;
    for path in &lookups {
        let (status, answer) = svc.get(path).await;
        assert_eq!(status, 200, "{path}: {answer}");
        assert_eq!(svc.get(path).await.1, answer, "{path}");
    }
    assert_eq!(
        crate::worker::metric(&svc, "mirror_read_cache_hits_total").await,
        hits + 3.0,
        "each second lookup is answered from what the first kept"
    );

    // The tag moves and is copied again: every kept answer naming it is gone with the record.
    let second = copy(2).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (_, tag) = svc.get(&lookups[0]).await;
        let (_, repo) = svc.get(&lookups[1]).await;
        let (_, digest) = svc.get(&lookups[2]).await;
        let now = (
            &tag["digest"],
            &repo["tags"][0]["digest"],
            digest["records"].as_array().map(Vec::len),
        );
        if now == (&json!(second), &json!(second), Some(1)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "2 s after the copy, the lookups still answer {now:?} (the first digest was {first})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, answer) = svc.get(&format!("/digests/{second}")).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_mid_copy_the_job_completes_after_restart_with_one_record() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let target = format!("{}/mirror", down.host());
    // One small layer per platform plus a large one, so the kill lands while the large one streams.
    let idx = two_platforms(&up, "big/app", "v1", 3, 192 * 1024 * 1024).await;
    let env = [
        ("MIRROR_LEASE", "3"),
        ("MIRROR_WORKERS", "1"),
        ("MIRROR_COPY_JOBS", "1"),
    ];
    let mut svc = Service::start(&db, &target, &up.host(), &env).await;
    let (_, job) = svc
        .mirror(&json!({ "image": format!("{}/big/app:v1", up.host()) }))
        .await;
    let id = job["id"].as_i64().unwrap();
    // Wait until some blobs are on the target, then kill it hard.
    let mirror_path = format!("mirror/{}/big/app", up.host().replace(':', "_"));
    let committed = |log: &str, blob: &str| {
        let needle = format!("digest={}", blob.replace(':', "%3A"));
        log.lines()
            .filter(|l| l.contains("\"PUT /v2/") && l.contains(&needle) && l.contains("\" 201 "))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !idx.blobs.iter().any(|b| committed(&down.log(), b) > 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "no blob reached the target"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    svc.kill();
    let log = down.log();
    let landed: Vec<&String> = idx
        .blobs
        .iter()
        .filter(|b| committed(&log, b) > 0)
        .collect();
    assert!(!landed.is_empty());
    let svc = Service::start(&db, &target, &up.host(), &env).await;
    let job = svc.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{}", svc.log());
    assert_eq!(
        job["attempts"], 2,
        "the killed attempt counts, the second finishes"
    );
    let raw = skopeo::inspect_raw(&format!("{}/{mirror_path}:v1", down.host()), None);
    assert_eq!(sha256(&raw), idx.digest);
    let (_, hist) = svc.get(&format!("/images/{}/big/app:v1", up.host())).await;
    assert_eq!(
        hist["history"].as_array().unwrap().len(),
        1,
        "one ledger record: {hist}"
    );
    // Every blob was committed exactly once: those that landed before the kill were not sent again.
    let log = down.log();
    for blob in &idx.blobs {
        assert_eq!(
            committed(&log, blob),
            1,
            "blob {blob} (landed before the kill: {})",
            landed.contains(&blob)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_say_what_is_wrong() {
    let down = Registry::anonymous().await;
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        "gcr.io,127.0.0.1:1",
        &[],
    )
    .await;
    let http = reqwest::Client::new();
    let post = |auth: Option<&str>, ct: &str, body: Vec<u8>| {
        let mut r = http
            .post(format!("{}/mirror", svc.url))
            .header("content-type", ct)
            .body(body);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (
                status,
                v["error"]["message"].as_str().unwrap_or("").to_string(),
            )
        }
    };
    let good = format!("Bearer {TOKEN}");
    let body = |s: &str| json!({ "image": s }).to_string().into_bytes();
    type Case<'a> = (Option<&'a str>, &'a str, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            None,
            "application/json",
            body("gcr.io/a/b:1"),
            401,
            "Authorization: Bearer",
        ),
        (
            Some("Bearer wrong-token-xxxxxxxxxxxx"),
            "application/json",
            body("gcr.io/a/b:1"),
            401,
            "not one of MIRROR_API_TOKENS",
        ),
        (
            Some(&good),
            "application/json",
            body("gcr.io/A/b"),
            400,
            "uppercase",
        ),
        (
            Some(&good),
            "application/json",
            body("gcr.io/a/b@sha256:123"),
            400,
            "digest",
        ),
        (
            Some(&good),
            "application/json",
            body("quay.io/a/b:1"),
            403,
            "MIRROR_ALLOWED_SOURCES",
        ),
        (
            Some(&good),
            "text/plain",
            body("gcr.io/a/b:1"),
            415,
            "application/json",
        ),
        (
            Some(&good),
            "application/json",
            b"{not json".to_vec(),
            400,
            "",
        ),
        (
            Some(&good),
            "application/json",
            vec![b' '; 100_000],
            413,
            "larger than",
        ),
        (
            Some(&good),
            "application/json",
            json!({"image": "gcr.io/a/b", "target": "ghcr.io/elsewhere/x"})
                .to_string()
                .into_bytes(),
            403,
            "not under MIRROR_TARGET",
        ),
    ];
    for (auth, ct, b, want, msg) in cases {
        let (status, message) = post(auth, ct, b).await;
        assert_eq!(status, want, "{message}");
        assert!(
            message.contains(msg),
            "{want}: {message:?} should mention {msg:?}"
        );
    }
    let (status, v) = svc.get("/jobs/abc").await;
    assert_eq!(status, 400, "{v}");
    let (status, _) = svc.get("/jobs/999").await;
    assert_eq!(status, 404);
    let (status, v) = svc.get("/jobs?state=bogus").await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = svc.get("/digests/sha256:nope").await;
    assert_eq!(status, 400, "{v}");
    // Nothing above created a job.
    let (_, list) = svc.get("/jobs").await;
    assert_eq!(list["jobs"], json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_identical_requests_at_once_make_one_job() {
    // An upstream that accepts connections and never answers keeps the job running.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = hang.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let down = Registry::anonymous().await;
    let dir = tempfile::tempdir().unwrap();
    let svc = std::sync::Arc::new(
        Service::start(
            &dir.path().join("m.db"),
            &format!("{}/mirror", down.host()),
            &up,
            &[],
        )
        .await,
    );
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let svc = svc.clone();
            let up = up.clone();
            tokio::spawn(
                async move { svc.mirror(&json!({ "image": format!("{up}/x/y:1") })).await },
            )
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (status, job) = t.await.unwrap();
        assert_eq!(status, 202, "{job}");
        ids.insert(job["id"].as_i64().unwrap());
    }
    assert_eq!(ids.len(), 1, "one job for 50 identical requests: {ids:?}");
}

#[test]
fn serve_refuses_bad_configuration_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("x.db");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(bin());
        cmd.arg("serve")
            .env_clear()
            .env("MIRROR_DATABASE", &db)
            .env("MIRROR_LISTEN", "127.0.0.1:0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{env:?} should be refused");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let tokens = ("MIRROR_API_TOKENS", "ci=0123456789abcdef0123");
    let target = ("MIRROR_TARGET", "ghcr.io/acme/mirror");
    assert!(run(&[tokens]).contains("MIRROR_TARGET is not set"));
    assert!(run(&[tokens, ("MIRROR_TARGET", "ghcr.io/Acme:x")]).contains("MIRROR_TARGET"));
    assert!(run(&[target]).contains("MIRROR_API_TOKENS is not set"));
    assert!(run(&[target, ("MIRROR_API_TOKENS", "ci=short")]).contains("shorter than 16"));
    assert!(
        run(&[target, tokens, ("MIRROR_ALLOWED_SOURCES", " , ")])
            .contains("MIRROR_ALLOWED_SOURCES")
    );
    assert!(run(&[target, tokens, ("MIRROR_WORKERS", "0")]).contains("--workers"));
    assert!(run(&[target, tokens, ("MIRROR_NOTIFY_URL", "ftp://x")]).contains("MIRROR_NOTIFY_URL"));
    let policy = run(&[target, tokens, ("MIRROR_DRIFT_POLICY", "latest")]);
    assert!(
        policy.contains("--drift-policy") && policy.contains("\"follow\""),
        "{policy}"
    );
    assert!(
        !db.exists(),
        "nothing was created for a refused configuration"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_metrics_request_ids_and_json_logs() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[("MIRROR_LOG_FORMAT", "json")],
    )
    .await;
    let (status, ready) = svc.get("/readyz").await;
    assert_eq!(
        (status, &ready["status"]),
        (200, &json!("ready")),
        "{ready}"
    );
    two_platforms(&up, "met/app", "1", 11, 1000).await;
    let (_, job) = svc
        .mirror(&json!({ "image": format!("{}/met/app:1", up.host()) }))
        .await;
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded");
    let text = reqwest::get(format!("{}/metrics", svc.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("{line_start} missing from:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("mirror_jobs{state=\"succeeded\"}"), 1.0);
    assert_eq!(value("mirror_queue_depth"), 0.0);
    assert_eq!(
        value("mirror_blobs_uploaded_total"),
        5.0,
        "3 layers + 2 configs"
    );
    assert!(value("mirror_bytes_copied_total") > 50_000.0);
    assert!(
        value(&format!(
            "mirror_registry_requests_total{{registry=\"{}\",status=\"201\"}}",
            down.host()
        )) >= 5.0
    );
    assert_eq!(value("mirror_job_duration_seconds_count"), 1.0);
    // Request ids: made when absent, kept when the client sends one.
    let r = reqwest::get(format!("{}/healthz", svc.url)).await.unwrap();
    assert!(r.headers().get("x-request-id").is_some());
    let r = reqwest::Client::new()
        .get(format!("{}/jobs/1", svc.url))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");
    // The OpenAPI description has every route, and every documented route answers.
    let (status, api) = svc.get("/openapi.json").await;
    assert_eq!(status, 200);
    let paths = api["paths"].as_object().unwrap();
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    documented.sort();
    assert_eq!(
        documented,
        vec![
            "/",
            "/digests/{digest}",
            "/drift",
            "/drift/check",
            "/healthz",
            "/images/{name}",
            "/jobs",
            "/jobs/{id}",
            "/metrics",
            "/mirror",
            "/notices",
            "/openapi.json",
            "/readyz",
            "/requests/{id}",
            "/sync",
            "/ui/images/{name}",
            "/webhooks/github"
        ]
    );
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let http = reqwest::Client::new();
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path
                .replace(
                    "{digest}",
                    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                )
                .replace("{name}", "x/y")
                .replace("{id}", "1");
            let r = http
                .request(
                    method.to_uppercase().parse().unwrap(),
                    format!("{}{concrete}", svc.url),
                )
                .send()
                .await
                .unwrap();
            let body = r.text().await.unwrap();
            assert!(
                !body.contains("no such endpoint"),
                "{method} {path} is documented but not routed"
            );
            let bare = path.split('{').next().unwrap();
            assert!(
                readme.contains(&format!("`{} {bare}", method.to_uppercase()))
                    || path == "/"
                    || path == "/openapi.json",
                "{method} {path} is missing from the README's API table"
            );
        }
    }

    // JSON logs, one object per line, with the request id in the span.
    let log = svc.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l.to_string().contains("trace-me-42")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_claiming_and_gives_running_jobs_back() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let target = format!("{}/mirror", down.host());
    let idx = two_platforms(&up, "term/app", "v1", 61, 256 * 1024 * 1024).await;
    let env = [
        ("MIRROR_SHUTDOWN_GRACE", "1"),
        ("MIRROR_WORKERS", "1"),
        ("MIRROR_COPY_JOBS", "1"),
    ];
    let mut svc = Service::start(&db, &target, &up.host(), &env).await;
    let (_, job) = svc
        .mirror(&json!({ "image": format!("{}/term/app:v1", up.host()) }))
        .await;
    let id = job["id"].as_i64().unwrap();
    // A second job stays queued: after SIGTERM nothing new is claimed.
    let small = two_platforms(&up, "term/small", "v1", 71, 1000).await;
    let (_, queued) = svc
        .mirror(&json!({ "image": format!("{}/term/small:v1", up.host()) }))
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while svc.get(&format!("/jobs/{id}")).await.1["state"] != "running" {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = svc.terminate(Duration::from_secs(20));
    assert!(
        took < Duration::from_secs(12),
        "exited {took:?} after SIGTERM with a 1 s grace"
    );
    let log = svc.log();
    assert!(log.contains("shutting down"), "{log}");
    // The interrupted job went back to the queue without spending an attempt.
    let svc = Service::start(&db, &target, &up.host(), &[("MIRROR_WORKERS", "1")]).await;
    let job = svc.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        job["attempts"], 1,
        "released at shutdown, not counted: {job}"
    );
    assert_eq!(job["source_digest"], json!(idx.digest));
    let other = svc
        .wait_job(queued["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(other["source_digest"], json!(small.digest));
}

/// `MIRROR_SHUTDOWN_DRAIN`: after SIGTERM the replica says it is not ready but keeps serving for
/// the drain, so a load balancer without a `preStop` pause stops sending traffic before the port
/// closes; a request it still sends is answered and durable.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_a_drain_keeps_serving_while_readyz_says_503() {
    let up = Registry::anonymous().await;
    let down = Registry::anonymous().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let target = format!("{}/mirror", down.host());
    let drain = Duration::from_secs(5);
    let env = [
        ("MIRROR_SHUTDOWN_DRAIN", "5"),
        ("MIRROR_SHUTDOWN_GRACE", "1"),
    ];
    let mut svc = Service::start(&db, &target, &up.host(), &env).await;
    svc.wait_answering("/readyz", Duration::from_secs(20)).await;
    let signalled = Instant::now();
    svc.send_term();
    // Not ready at once...
    let deadline = Instant::now() + Duration::from_secs(2);
    let ready = loop {
        let (status, body) = svc.get("/readyz").await;
        if status == 503 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {status} 2 s after SIGTERM: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        ready["failing"].to_string().contains("shutting down"),
        "{ready}"
    );
    // ...but still serving: a request that arrives during the drain is queued.
    let image = format!("{}/drain/app:v1", up.host());
    let (status, job) = svc.mirror(&json!({ "image": image })).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_i64().unwrap();
    assert!(
        signalled.elapsed() < drain,
        "the POST was answered {:?} after SIGTERM, after the drain: the test proves nothing",
        signalled.elapsed()
    );
    let (status, body) = svc.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    // Then the listener closes and the process exits cleanly, not before the drain is over.
    let status = svc.wait_exit(drain + Duration::from_secs(20)).await;
    assert!(status.success(), "exit {status}:\n{}", svc.log());
    assert!(
        signalled.elapsed() >= drain,
        "exited {:?} after SIGTERM, before the {drain:?} drain",
        signalled.elapsed()
    );
    // The 202 was durable: the next process finds the job.
    let svc = Service::start(&db, &target, &up.host(), &[]).await;
    let (status, stored) = svc.get(&format!("/jobs/{id}")).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored["source"], json!(image), "{stored}");
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_the_log() {
    let up = Registry::basic("reg-user", "registry-password-xyz").await;
    let down = Registry::anonymous().await;
    let dir = tempfile::tempdir().unwrap();
    crate::support::write_docker_config(
        dir.path(),
        &[(&up.host(), "reg-user", "registry-password-xyz")],
    );
    let webhook_secret = "webhook-secret-abcdef123";
    let notify_secret = "notify-secret-987654321";
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[
            ("MIRROR_LOG", "debug"),
            ("MIRROR_GITHUB_WEBHOOK_SECRETS", webhook_secret),
            ("MIRROR_NOTIFY_URL", "http://127.0.0.1:9/notice"),
            ("MIRROR_NOTIFY_SECRET", notify_secret),
        ],
    )
    .await;
    two_platforms(&up, "sec/app", "1", 81, 1000).await;
    let (_, job) = svc
        .mirror(&json!({ "image": format!("{}/sec/app:1", up.host()) }))
        .await;
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    // A wrong token and a webhook delivery also pass through the logs.
    let _ = reqwest::Client::new()
        .post(format!("{}/mirror", svc.url))
        .bearer_auth("not-the-token-but-long-enough")
        .json(&json!({"image": "x"}))
        .send()
        .await;
    let body = br#"{"action":"mirror","client_payload":{"image":"nope"}}"#;
    let _ = reqwest::Client::new()
        .post(format!("{}/webhooks/github", svc.url))
        .header("x-github-event", "repository_dispatch")
        .header("x-github-delivery", "s-1")
        .header("x-hub-signature-256", "sha256=00")
        .body(body.to_vec())
        .send()
        .await;
    let log = svc.log();
    assert!(log.contains("DEBUG"), "the log ran at debug level");
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode("reg-user:registry-password-xyz");
    for secret in [
        TOKEN,
        webhook_secret,
        notify_secret,
        "registry-password-xyz",
        basic.as_str(),
        "not-the-token-but-long-enough",
    ] {
        assert!(!log.contains(secret), "{secret} appears in the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_bodies_time_out_and_concurrent_load_never_shows_database_locked() {
    let down = Registry::anonymous().await;
    let dir = tempfile::tempdir().unwrap();
    let svc = std::sync::Arc::new(
        Service::start(
            &dir.path().join("m.db"),
            &format!("{}/mirror", down.host()),
            "127.0.0.1:1",
            &[("MIRROR_WORKERS", "1")],
        )
        .await,
    );
    // A body that trickles in slower than the read timeout is cut off, not waited for forever.
    let addr = svc.url.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    s.write_all(format!("POST /mirror HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"ima").as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the slow body was cut off"
    );
    assert!(
        answer.starts_with("HTTP/1.1 408")
            || answer.starts_with("HTTP/1.1 400")
            || answer.is_empty(),
        "{answer}"
    );
    // 200 distinct requests from 20 clients at once: every one is a durable 202.
    let tasks: Vec<_> = (0..20)
        .map(|c| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for i in 0..10 {
                    let (status, body) = svc
                        .mirror(&json!({ "image": format!("127.0.0.1:1/load/img{c}:{i}") }))
                        .await;
                    statuses.push((status, body));
                }
                statuses
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        for (status, body) in t.await.unwrap() {
            assert_eq!(status, 202, "{body}");
            ok += 1;
        }
    }
    assert_eq!(ok, 200);
    let (_, list) = svc.get("/jobs?limit=500").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 200);
    assert!(!svc.log().contains("database is locked"), "no lock errors");
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_can_be_closed_to_tokens() {
    let down = Registry::anonymous().await;
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        "127.0.0.1:1",
        &[("MIRROR_READ_REQUIRES_TOKEN", "true")],
    )
    .await;
    for path in [
        "/images/x/y",
        "/digests/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "/jobs",
        "/",
    ] {
        let (status, _) = svc.get(path).await;
        assert_eq!(status, 401, "{path} without a token");
        let r = reqwest::Client::new()
            .get(format!("{}{path}", svc.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_ne!(r.status().as_u16(), 401, "{path} with a token");
    }
    assert_eq!(svc.get("/healthz").await.0, 200, "probes stay open");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_records_the_signatures_copied_with_the_image() {
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
    let img = p
        .image("sig/app", 111, &[1500], false, Style::Compact)
        .await;
    p.manifest("sig/app", "1", &img.media_type, &img.bytes)
        .await;
    let sig = p
        .image_with(
            "sig/app",
            br#"{"cosign":1}"#,
            &[b"sig".to_vec()],
            false,
            Style::Compact,
        )
        .await;
    let sig_tag = format!("sha256-{}.sig", img.digest.trim_start_matches("sha256:"));
    p.manifest("sig/app", &sig_tag, &sig.media_type, &sig.bytes)
        .await;
    let (_, job) = svc
        .mirror(&json!({ "image": format!("{}/sig/app:1", up.host()) }))
        .await;
    assert_eq!(job["referrers"], true);
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (_, entry) = svc.get(&format!("/images/{}/sig/app:1", up.host())).await;
    assert_eq!(
        entry["referrers"],
        json!([{ "digest": sig.digest, "referrer_of": img.digest, "tag": sig_tag, "state": "copied" }]),
        "{entry}"
    );
    // A request may leave them behind.
    let (_, job) = svc
        .mirror(&json!({ "image": format!("{}/sig/app:1", up.host()), "referrers": false }))
        .await;
    assert_eq!(job["referrers"], false, "{job}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_mounts_what_another_replica_uploaded() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    // The same image (same seed: same config and layers) under two source names.
    let p = Pusher::new(&up);
    for repo in ["app", "other"] {
        let img = p
            .image(repo, 77, &[150_000, 250_000], true, Style::Compact)
            .await;
        p.manifest(repo, "v1", &img.media_type, &img.bytes).await;
    }
    let database = crate::support::postgres::shared().database().await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("{}/mirror", down.host());
    let env = [("MIRROR_DATABASE", database.as_str())];
    let mut a = Service::start(&dir.path().join("a.db"), &target, &up.host(), &env).await;
    let (status, job) = a
        .mirror(&json!({ "image": format!("{}/app:v1", up.host()) }))
        .await;
    assert_eq!(status, 202, "{job}");
    let done = a
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let (a_uploaded, a_mounted) = (
        crate::worker::metric(&a, "mirror_blobs_uploaded_total").await,
        crate::worker::metric(&a, "mirror_blobs_mounted_total").await,
    );
    a.terminate(Duration::from_secs(10));
    // Replica B never saw those blobs (and A is gone): only the shared record says where they are.
    let b = Service::start(&dir.path().join("b.db"), &target, &up.host(), &env).await;
    let (status, job) = b
        .mirror(&json!({ "image": format!("{}/other:v1", up.host()) }))
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_i64().unwrap();
    let done = b.wait_job(id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let mounted = a_mounted + crate::worker::metric(&b, "mirror_blobs_mounted_total").await;
    let uploaded = a_uploaded + crate::worker::metric(&b, "mirror_blobs_uploaded_total").await;
    assert_eq!(
        (uploaded, mounted),
        (3.0, 3.0),
        "config and 2 layers uploaded once, then mounted into the second repository\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    let raw = skopeo::inspect_raw(done["target"].as_str().unwrap(), None);
    assert_eq!(
        sha256(&raw),
        done["source_digest"].as_str().unwrap(),
        "skopeo reads the mirror under the official digest"
    );
}
