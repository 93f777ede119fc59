//! Issue 14: N `serve` replicas on one PostgreSQL database (the harness's server, a fresh database
//! per test), behind a real nginx front. A replica killed mid-copy loses and duplicates nothing; a
//! rolling restart under a stream of signed webhooks loses and duplicates no delivery; periodic
//! rounds run once per interval across the replicas; replicas starting at once on an empty
//! database migrate it once; a layer shared by images copied at once on three replicas goes up
//! once; a lease running out during a rescue does not buy a spent job another attempt.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::github::{dispatch, sign};
use crate::support::image::{OCI_MANIFEST, Style};
use crate::support::nginx::Nginx;
use crate::support::postgres;
use crate::support::replicas::Replicas;
use crate::support::{Pusher, Registry};

const MIB: u64 = 1 << 20;

async fn pg(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// Completed blob uploads at a registry front, per (repository, digest): a `PUT` of an upload
/// session with `digest=` answered `201` (a mount moves no bytes and is not counted).
fn completed_uploads(front: &Nginx) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for r in front.requests() {
        if r.method != "PUT" || r.status != 201 {
            continue;
        }
        let Some((repo, rest)) = r
            .target
            .strip_prefix("/v2/")
            .and_then(|t| t.split_once("/blobs/uploads/"))
        else {
            continue;
        };
        let Some(digest) = rest
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix("digest="))
        else {
            continue;
        };
        let digest = digest.replace("%3A", ":").replace("%3a", ":");
        *out.entry((repo.to_string(), digest)).or_default() += 1;
    }
    out
}

/// Pushes `{repo}:v1` with the given layers; returns its digest.
async fn push(p: &Pusher, repo: &str, config: &str, layers: &[Vec<u8>]) -> String {
    let img = p
        .image_with(repo, config.as_bytes(), layers, false, Style::Compact)
        .await;
    p.manifest(repo, "v1", OCI_MANIFEST, &img.bytes).await;
    img.digest
}

/// A layer of `len` deterministic bytes for `seed`, pushed in pieces by the harness.
async fn big_layer(p: &Pusher, repo: &str, seed: u64, len: u64) -> (String, u64) {
    (p.generated_blob(repo, seed, len).await, len)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_lose_nothing_when_one_is_killed_mid_copy() {
    let src = Registry::anonymous().await;
    let dst = Registry::anonymous().await;
    // The big image's blobs leave the source at 4 MiB/s each, so its copy takes seconds and a
    // replica can be killed in the middle of it.
    let slow_src = Nginx::front(
        &src.host(),
        &format!(
            r#"location ~ "^/v2/big/.*/blobs/sha256:" {{
            proxy_pass http://{};
            proxy_set_header Host $http_host;
            proxy_buffering on;
            limit_rate 4m;
        }}"#,
            src.host()
        ),
    );
    let target = Nginx::front(&dst.host(), "");
    let p = Pusher::new(&src);

    // The big image: a 16 MiB and a 32 MiB layer. When the first is on the target (progress
    // says so), the second is about halfway.
    let (l1, n1) = big_layer(&p, "big/app", 1, 16 * MIB).await;
    let (l2, n2) = big_layer(&p, "big/app", 2, 32 * MIB).await;
    let config = r#"{"architecture":"amd64","os":"linux","seed":"big"}"#;
    let c = p.blob("big/app", config.as_bytes()).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l1, "size": n1},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l2, "size": n2},
        ],
    }))
    .unwrap();
    let big_digest = p.manifest("big/app", "v1", OCI_MANIFEST, &manifest).await;
    // 59 small images sharing a base layer.
    let base = crate::support::image::bytes(7, 40_000);
    let mut digests = BTreeMap::new();
    digests.insert("big/app".to_string(), big_digest.clone());
    for i in 0..59 {
        let repo = format!("fleet/app-{i:02}");
        let own = crate::support::image::bytes(100 + i, 3_000);
        let config = format!(r#"{{"architecture":"amd64","os":"linux","n":{i}}}"#);
        let d = push(&p, &repo, &config, &[base.clone(), own]).await;
        digests.insert(repo, d);
    }

    let url = postgres::shared().database().await;
    let mut r = Replicas::start(
        3,
        &url,
        &format!("{}/mirror", target.host()),
        &slow_src.host(),
        &[
            ("MIRROR_WORKERS", "2"),
            ("MIRROR_LEASE", "3"),
            ("MIRROR_DRIFT_INTERVAL", "0"),
        ],
    )
    .await;

    // The big job first, then the small ones round-robin over the replicas.
    let image = |repo: &str| format!("{}/{repo}:v1", slow_src.host());
    let mut ids: BTreeMap<i64, String> = BTreeMap::new();
    let (status, job) = r
        .replica(0)
        .mirror(&json!({ "image": image("big/app") }))
        .await;
    assert_eq!(status, 202, "{job}");
    let big = job["id"].as_i64().unwrap();
    ids.insert(big, "big/app".into());
    let small: Vec<String> = digests
        .keys()
        .filter(|k| *k != "big/app")
        .cloned()
        .collect();
    /// Posts `repo`'s image to the `n`th live replica, round-robin.
    async fn post(r: &Replicas, n: usize, image: String) -> (u16, Value) {
        let live: Vec<usize> = r.running().map(|(i, _)| i).collect();
        r.replica(live[n % live.len()])
            .mirror(&json!({ "image": image }))
            .await
    }
    for (n, repo) in small[..29].iter().enumerate() {
        let (status, job) = post(&r, n + 1, image(repo)).await;
        assert_eq!(status, 202, "{job}");
        ids.insert(job["id"].as_i64().unwrap(), repo.clone());
    }

    // Kill the replica copying the big image once its first layer is on the target.
    let deadline = Instant::now() + Duration::from_secs(30);
    let victim = loop {
        let (_, job) = r.replica(0).get(&format!("/jobs/{big}")).await;
        if job["state"] == "running"
            && job["progress"]["bytes_done"].as_u64() >= Some(n1)
            && let Some(v) = r.running_job(big)
        {
            break v;
        }
        assert!(
            job["state"] != "succeeded" && Instant::now() < deadline,
            "the big copy was not seen halfway: {job}\n{}",
            r.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (_, before) = r.replica(victim).get(&format!("/jobs/{big}")).await;
    r.kill(victim);
    eprintln!(
        "figure: replica {victim} SIGKILLed copying job {big} at {} of {} bytes",
        before["progress"]["bytes_done"], before["progress"]["bytes_total"]
    );

    for (n, repo) in small[29..].iter().enumerate() {
        let (status, job) = post(&r, n, image(repo)).await;
        assert_eq!(status, 202, "{job}");
        ids.insert(job["id"].as_i64().unwrap(), repo.clone());
    }
    assert_eq!(ids.len(), 60, "60 jobs, none joined another");

    // Every job succeeds, the big one after its lease ran out on another replica.
    let started = Instant::now();
    let alive = r.running().next().unwrap().0;
    for (&id, repo) in &ids {
        let job = r.replica(alive).wait_job(id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{repo}: {job}\n{}", r.logs());
        assert_eq!(job["mirror_digest"], json!(digests[repo]), "{job}");
    }
    eprintln!(
        "figure: all 60 jobs succeeded {:?} after the kill",
        started.elapsed()
    );

    // Exactly once: one "succeeded" per job in all the logs, one ledger record each.
    let logs: String = (0..3).map(|i| r.log_of(i)).collect();
    for id in ids.keys() {
        let said = logs.matches(&format!("job {id} succeeded")).count();
        assert_eq!(said, 1, "job {id} succeeded {said} times");
    }
    let db = pg(&url).await;
    let mut recorded: Vec<i64> = sqlx::query_scalar("select job_id from mirror_record")
        .fetch_all(&db)
        .await
        .unwrap();
    recorded.sort();
    assert_eq!(recorded, ids.keys().copied().collect::<Vec<_>>());
    let jobs: i64 = sqlx::query_scalar("select count(*) from job")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(jobs, 60);
    let (big_attempts,): (i64,) = sqlx::query_as("select attempts from job where id = $1")
        .bind(big)
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(
        big_attempts >= 2,
        "the big job was claimed again after the kill"
    );

    // No blob completed twice into the same repository: the rescuer skipped what the killed
    // replica had finished (the 16 MiB layer) and uploaded only what it had not.
    let uploads = completed_uploads(&target);
    let twice: Vec<_> = uploads.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "uploaded more than once: {twice:?}");
    let big_repo = uploads
        .keys()
        .find(|(repo, d)| repo.ends_with("big/app") && *d == l2)
        .map(|(repo, _)| repo.clone())
        .expect("the 32 MiB layer was uploaded");
    assert_eq!(uploads.get(&(big_repo.clone(), l1)), Some(&1));
    assert!(uploads.len() >= 60, "{} uploads", uploads.len());
    db.close().await;
}

/// What one delivery got back through the front.
struct Delivered {
    id: String,
    status: u16,
    body: Value,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_under_webhooks_at_10_per_second_loses_and_duplicates_none() {
    const SECRET: &str = "roll-webhook-secret";
    let url = postgres::shared().database().await;
    // Sources on a port where nothing listens: the jobs fail later, which does not matter here;
    // what is checked is that every delivery became exactly one job.
    let mut r = Replicas::start(
        3,
        &url,
        "127.0.0.1:9/mirror",
        "127.0.0.1:9",
        &[
            ("MIRROR_GITHUB_WEBHOOK_SECRETS", SECRET),
            ("MIRROR_WORKERS", "1"),
            ("MIRROR_MAX_ATTEMPTS", "1"),
            ("MIRROR_SHUTDOWN_GRACE", "5"),
            ("MIRROR_DRIFT_INTERVAL", "0"),
        ],
    )
    .await;

    // 10 deliveries a second through the front, each on its own task, until told to stop.
    let sent: Arc<Mutex<Vec<tokio::task::JoinHandle<Delivered>>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = {
        let (sent, stop, front) = (sent.clone(), stop.clone(), r.url());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut n = 0;
            while !stop.is_cancelled() {
                tick.tick().await;
                n += 1;
                let id = format!("roll-{n}");
                let body = dispatch(
                    json!({ "image": format!("127.0.0.1:9/roll/app-{n}:1") }),
                    "acme/tools",
                );
                let req = http
                    .post(format!("{front}/webhooks/github"))
                    .header("x-github-event", "repository_dispatch")
                    .header("x-github-delivery", &id)
                    .header("x-hub-signature-256", sign(SECRET, &body))
                    .header("content-type", "application/json")
                    .timeout(Duration::from_secs(10))
                    .body(body);
                sent.lock().unwrap().push(tokio::spawn(async move {
                    match req.send().await {
                        Ok(resp) => Delivered {
                            id,
                            status: resp.status().as_u16(),
                            body: resp.json().await.unwrap_or(Value::Null),
                        },
                        Err(e) => Delivered {
                            id,
                            status: 0,
                            body: json!(e.to_string()),
                        },
                    }
                }));
            }
        })
    };

    // Let deliveries flow, then restart each replica in turn: SIGTERM, wait for the exit, start
    // it again, wait until it is ready.
    let count = || sent.lock().unwrap().len();
    r.wait_until("deliveries flowing", Duration::from_secs(10), || {
        let n = count();
        async move { n >= 10 }
    })
    .await;
    for i in 0..r.len() {
        let took = r.stop(i, Duration::from_secs(20)).await;
        let at = count();
        r.restart(i).await;
        eprintln!(
            "figure: replica {i} stopped in {took:?} and was ready again by delivery {}",
            count()
        );
        // Some deliveries went to the others meanwhile.
        r.wait_until(
            "deliveries after a restart",
            Duration::from_secs(10),
            || {
                let n = count();
                async move { n >= at + 5 }
            },
        )
        .await;
    }
    stop.cancel();
    sender.await.unwrap();
    let handles: Vec<_> = std::mem::take(&mut *sent.lock().unwrap());
    let mut delivered = Vec::new();
    for h in handles {
        delivered.push(h.await.unwrap());
    }

    // Every delivery got a 2xx naming its one job; no two deliveries share a job.
    let lost: Vec<_> = delivered
        .iter()
        .filter(|d| !(200..300).contains(&d.status))
        .map(|d| format!("{}: {} {}", d.id, d.status, d.body))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} deliveries lost: {lost:#?}\n{}",
        lost.len(),
        delivered.len(),
        r.front.log()
    );
    let mut job_of = BTreeMap::new();
    for d in &delivered {
        let jobs = d.body["jobs"].as_array().expect("jobs in the answer");
        assert_eq!(jobs.len(), 1, "{}: {}", d.id, d.body);
        job_of.insert(d.id.clone(), jobs[0]["id"].as_i64().unwrap());
    }
    let distinct: BTreeSet<i64> = job_of.values().copied().collect();
    assert_eq!(distinct.len(), delivered.len(), "deliveries sharing a job");

    // The database agrees: one job per delivery, each the one its answer named, one delivery row each.
    let db = pg(&url).await;
    let jobs: Vec<(i64, String)> =
        sqlx::query_as("select id, requested_by->>'delivery' from job order by id")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(jobs.len(), delivered.len(), "jobs in the database");
    for (id, delivery) in &jobs {
        assert_eq!(job_of.get(delivery), Some(id), "job {id} of {delivery}");
    }
    let rows: i64 = sqlx::query_scalar("select count(*) from github_delivery")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(rows as usize, delivered.len());

    let retried = r
        .front
        .requests()
        .iter()
        .filter(|l| l.upstream.contains(','))
        .count();
    let per_replica: BTreeMap<String, usize> =
        r.front.requests().iter().fold(BTreeMap::new(), |mut m, l| {
            *m.entry(l.upstream.rsplit(", ").next().unwrap().to_string())
                .or_default() += 1;
            m
        });
    eprintln!(
        "figure: {} deliveries during 3 restarts, 0 lost, 0 duplicated; {retried} retried on another replica by the front; answered by {per_replica:?}",
        delivered.len()
    );
    db.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_rounds_run_once_per_interval_across_three_replicas() {
    let src = Registry::anonymous().await;
    let dst = Registry::anonymous().await;
    let p = Pusher::new(&src);
    push(&p, "watched/app", r#"{"os":"linux"}"#, &[vec![1; 1000]]).await;
    let url = postgres::shared().database().await;
    let mut r = Replicas::start(
        3,
        &url,
        &format!("{}/mirror", dst.host()),
        &src.host(),
        &[("MIRROR_DRIFT_INTERVAL", "1"), ("MIRROR_WORKERS", "1")],
    )
    .await;
    // Something to watch.
    let (status, job) = r
        .replica(0)
        .mirror(&json!({ "image": format!("{}/watched/app:v1", src.host()) }))
        .await;
    assert_eq!(status, 202, "{job}");
    let job = r
        .replica(1)
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");

    // Watch several intervals go by.
    let db = pg(&url).await;
    let rounds = || {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from round_slot where kind = 'drift' and finished_at is not null",
            )
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    let first = rounds().await;
    let watched = Instant::now();
    r.wait_until(
        "five more drift rounds",
        Duration::from_secs(20),
        || async move { rounds().await >= first + 5 },
    )
    .await;
    let elapsed = watched.elapsed();
    for i in 0..r.len() {
        r.stop(i, Duration::from_secs(20)).await;
    }

    // One row per slot (the key), consecutive slots, and every round a replica started is one of
    // them: 3 replicas ran about one round a second in all, not three.
    let slots: Vec<(i64, String)> =
        sqlx::query_as("select slot, replica from round_slot where kind = 'drift' order by slot")
            .fetch_all(&db)
            .await
            .unwrap();
    let round_started = regex::Regex::new(r"drift round \d+ started").unwrap();
    let started: usize = (0..r.len())
        .map(|i| round_started.find_iter(&r.log_of(i)).count())
        .sum();
    // No round ran without its slot; a slot claimed just before a replica stopped may have no
    // "started" line (the round is cancelled at SIGTERM), at most one per replica.
    assert!(
        started <= slots.len() && slots.len() <= started + r.len(),
        "{started} rounds started in the logs, {} slots claimed: {slots:?}",
        slots.len()
    );
    let span = slots.last().unwrap().0 - slots.first().unwrap().0 + 1;
    assert!(
        slots.len() as i64 <= span,
        "two rounds in one slot: {slots:?}"
    );
    let per_second = (rounds().await - first) as f64 / elapsed.as_secs_f64();
    let by: BTreeSet<&str> = slots.iter().map(|(_, r)| r.as_str()).collect();
    eprintln!(
        "figure: {} drift rounds over {span} slots of 1 s, {per_second:.2} finished per second while watched, run by {by:?}",
        slots.len()
    );
    assert!(
        per_second < 1.6,
        "{per_second:.2} rounds a second: more than one per interval"
    );
    db.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_starting_at_once_on_an_empty_database_migrate_it_once() {
    let url = postgres::shared().database().await;
    // Start returns once all three answer /readyz: every migration applied, workers running.
    let r = Replicas::start(3, &url, "127.0.0.1:9/mirror", "127.0.0.1:9", &[]).await;
    let db = pg(&url).await;
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("select version, success from _sqlx_migrations order by version")
            .fetch_all(&db)
            .await
            .unwrap();
    let files: BTreeSet<i64> = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres"),
    )
    .unwrap()
    .filter_map(|e| {
        let name = e.unwrap().file_name().into_string().unwrap();
        name.strip_suffix(".sql")?.split('_').next()?.parse().ok()
    })
    .collect();
    assert_eq!(
        applied.iter().map(|(v, _)| *v).collect::<BTreeSet<_>>(),
        files,
        "each migration recorded once"
    );
    assert!(applied.iter().all(|(_, ok)| *ok), "{applied:?}");
    for i in 0..r.len() {
        let log = r.log_of(i);
        assert!(
            !log.contains("applying migrations failed"),
            "replica {i}:\n{log}"
        );
        let (status, ready) = r.replica(i).get("/readyz").await;
        assert_eq!(status, 200, "replica {i}: {ready}");
    }
    // They share one queue: a job posted to one is seen by the others.
    let (status, job) = r
        .replica(0)
        .mirror(&json!({ "image": "127.0.0.1:9/once/app:1" }))
        .await;
    assert_eq!(status, 202, "{job}");
    for i in 1..r.len() {
        let (status, seen) = r.replica(i).get(&format!("/jobs/{}", job["id"])).await;
        assert_eq!(status, 200, "replica {i}: {seen}");
    }
    db.close().await;
}

/// The single-replica SQLite mode through the same harness: while its one replica is down the front
/// has nowhere to send a request (`502`, the gap PostgreSQL mode closes); started again on its port,
/// it answers there with its queue as it was.
#[tokio::test(flavor = "multi_thread")]
async fn one_sqlite_replica_restarted_behind_the_front_answers_again_with_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let mut r = Replicas::start(
        1,
        db.to_str().unwrap(),
        "127.0.0.1:9/mirror",
        "127.0.0.1:9",
        &[("MIRROR_SHUTDOWN_GRACE", "3"), ("MIRROR_MAX_ATTEMPTS", "1")],
    )
    .await;
    let http = reqwest::Client::new();
    let (status, job) = r
        .replica(0)
        .mirror(&json!({ "image": "127.0.0.1:9/one/app:1" }))
        .await;
    assert_eq!(status, 202, "{job}");
    r.stop(0, Duration::from_secs(20)).await;
    let down = http
        .get(format!("{}/readyz", r.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(down.status(), 502, "no replica to answer");
    r.restart(0).await;
    let up = http
        .get(format!("{}/jobs/{}", r.url(), job["id"]))
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 200);
    let seen: Value = up.json().await.unwrap();
    assert_eq!(seen["source"], job["source"], "{seen}");
    let upstreams: BTreeSet<String> = r.front.requests().into_iter().map(|l| l.upstream).collect();
    assert_eq!(upstreams.len(), 1, "one replica, one port: {upstreams:?}");
}

/// Issue 14's d) target across replicas: a layer shared by images that three replicas copy at the
/// same moment goes up to the target registry once, and the others mount it (the copy engine's
/// `blob_claim`: a replica moving a blob into a registry holds a renewed claim, the others wait for
/// it and mount). Failed before that claim (each replica uploaded the layer once: 3 uploads).
#[tokio::test(flavor = "multi_thread")]
async fn a_layer_shared_by_images_copied_at_once_on_three_replicas_is_uploaded_once() {
    let src = Registry::anonymous().await;
    let dst = Registry::anonymous().await;
    let target = Nginx::front(&dst.host(), "");
    let p = Pusher::new(&src);
    let base = crate::support::image::bytes(11, 4 * MIB as usize);
    let base_digest = crate::support::sha256(&base);
    let mut digests = Vec::new();
    for i in 0..3 {
        let own = crate::support::image::bytes(200 + i, 2_000);
        let config = format!(r#"{{"architecture":"amd64","os":"linux","n":{i}}}"#);
        digests.push(
            push(
                &p,
                &format!("shared/app-{i}"),
                &config,
                &[base.clone(), own],
            )
            .await,
        );
    }
    let url = postgres::shared().database().await;
    let r = Replicas::start(
        3,
        &url,
        &format!("{}/mirror", target.host()),
        &src.host(),
        // One worker each: every replica copies one of the three.
        &[("MIRROR_DRIFT_INTERVAL", "0"), ("MIRROR_WORKERS", "1")],
    )
    .await;
    // One image per replica, at once.
    let bodies: Vec<Value> = (0..3)
        .map(|i| json!({ "image": format!("{}/shared/app-{i}:v1", src.host()) }))
        .collect();
    let posts = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| r.replica(i).mirror(b));
    let answers = futures_util::future::join_all(posts).await;
    for (i, (status, job)) in answers.iter().enumerate() {
        assert_eq!(*status, 202, "{job}");
        let done = r
            .replica(i)
            .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
            .await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["mirror_digest"], json!(digests[i]));
    }
    let uploads: usize = completed_uploads(&target)
        .iter()
        .filter(|((_, d), _)| *d == base_digest)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        uploads, 1,
        "the shared 4 MiB layer went up {uploads} times to one registry"
    );
}

/// A job with no attempts left whose worker stopped renewing its lease must fail, not run again
/// (`MIRROR_MAX_ATTEMPTS`). The store's rescue on PostgreSQL is two statements, each with its own
/// `now()` — "fail the expired ones with no attempts left", then "requeue the expired ones" — and
/// a lease that expired between the two was requeued with its attempts spent and claimed once more
/// (fixed in 05f1d38: the requeue takes only jobs with attempts left). Here the first statement is
/// held up on another job's row while the lease runs out. Seen first as a flake of
/// `worker::a_worker_that_cannot_renew_its_lease_stops_copying_within_the_lease` (the job
/// `succeeded` with `attempts: 2` of `max_attempts: 1`).
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_expiring_during_the_rescue_does_not_buy_a_spent_job_another_attempt() {
    use mirror_mirror::store::{JobState, NewJob, Store};
    use sqlx::Connection as _;
    let url = postgres::shared().database().await;
    let (a, b) = (
        Store::open(&url).await.unwrap(),
        Store::open(&url).await.unwrap(),
    );
    let new = |name: &str| NewJob {
        source: format!("127.0.0.1:9/spent/{name}:1"),
        target_repo: format!("127.0.0.1:9/mirror/spent/{name}"),
        target_tag: Some("1".into()),
        requested_by: json!({"kind": "token", "name": "t"}),
        max_attempts: 1,
        referrers: false,
        policy: None,
        repair: false,
        platforms: None,
    };
    a.enqueue(&new("x")).await.unwrap();
    a.enqueue(&new("y")).await.unwrap();
    // Replica A claims both (each its one attempt) and hangs: x's lease runs 2 s, y's is over.
    let x = a.claim(Duration::from_secs(2)).await.unwrap().unwrap();
    let y = a.claim(Duration::ZERO).await.unwrap().unwrap();
    assert_eq!((x.job.attempts, x.job.max_attempts), (1, 1));

    // Another session holds y's row, so B's rescue, failing y, waits there — its clock read while
    // x's lease still ran.
    let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("begin").execute(&mut holder).await.unwrap();
    sqlx::query("select id from job where id = $1 for update")
        .bind(y.job.id)
        .execute(&mut holder)
        .await
        .unwrap();
    let claim = tokio::spawn(async move { b.claim(Duration::from_secs(30)).await.unwrap() });
    let db = pg(&url).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock'
               and query like 'update job set state = ''failed''%'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B's rescue never waited on y's row"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // x's lease runs out (by the database's clock) meanwhile; then y's row is let go.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let expired: bool =
            sqlx::query_scalar("select mm_now_ms() > lease_expires_at from job where id = $1")
                .bind(x.job.id)
                .fetch_one(&db)
                .await
                .unwrap();
        if expired {
            break;
        }
        assert!(Instant::now() < deadline, "x's lease did not expire");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("commit").execute(&mut holder).await.unwrap();

    let again = claim.await.unwrap();
    assert!(
        again.is_none(),
        "job {} was claimed again with its attempts spent: attempt {} of {}",
        x.job.id,
        again.as_ref().unwrap().job.attempts,
        again.as_ref().unwrap().job.max_attempts
    );
    // x is left for the next rescue (any replica's next claim), which fails it for good.
    assert!(a.claim(Duration::from_secs(30)).await.unwrap().is_none());
    for id in [x.job.id, y.job.id] {
        let job = a.get(id).await.unwrap().unwrap();
        assert_eq!(
            job.state,
            JobState::Failed,
            "job {id}: {:?}",
            job.last_error
        );
    }
    db.close().await;
}

/// Two replicas on one database that keep lookups for up to 10 minutes; drift rounds only when
/// asked; `src`'s `team/app` is allowed.
async fn two_replicas_keeping_lookups(src: &Registry, dst: &Registry) -> Replicas {
    let url = postgres::shared().database().await;
    Replicas::start(
        2,
        &url,
        &format!("{}/mirror", dst.host()),
        &src.host(),
        &[
            ("MIRROR_DRIFT_INTERVAL", "0"),
            ("MIRROR_READ_CACHE_MAX_AGE", "600"),
        ],
    )
    .await
}

/// Mirrors `src`'s `team/app:v1` through replica 0 and waits for the job to succeed; returns
/// the replica that ran it.
async fn mirror_v1(r: &Replicas, src: &Registry) -> usize {
    let body = json!({ "image": format!("{}/team/app:v1", src.host()) });
    let (status, job) = r.replica(0).mirror(&body).await;
    assert_eq!(status, 202, "{job}");
    let job = r
        .replica(0)
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    r.running_job(job["id"].as_i64().unwrap())
        .expect("a replica's log says it started the job")
}

/// Polls `GET path` on `svc` until `done` holds for its answer (bounded by `limit`); returns the
/// answer and how long it took.
async fn lookup_until(
    svc: &crate::support::service::Service,
    path: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let started = Instant::now();
    loop {
        let (status, body) = svc.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        if done(&body) {
            return (body, started.elapsed());
        }
        assert!(
            started.elapsed() < limit,
            "GET {path} still answers, after {limit:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lookup_kept_by_one_replica_follows_a_copy_landed_on_another() {
    let src = Registry::anonymous().await;
    let dst = Registry::anonymous().await;
    let p = Pusher::new(&src);
    let first = push(&p, "team/app", r#"{"os":"linux"}"#, &[vec![1; 1000]]).await;
    let r = two_replicas_keeping_lookups(&src, &dst).await;
    mirror_v1(&r, &src).await;
    let path = format!("/images/{}/team/app:v1", src.host());
    let mut kept = Vec::new();
    for i in 0..r.len() {
        let svc = r.replica(i);
        let hits = crate::worker::metric(svc, "mirror_read_cache_hits_total").await;
        let (_, answer) = svc.get(&path).await;
        assert_eq!(answer["digest"], json!(first), "{answer}");
        let (_, again) = svc.get(&path).await;
        assert_eq!(again, answer);
        assert_eq!(
            crate::worker::metric(svc, "mirror_read_cache_hits_total").await,
            hits + 1.0,
            "the second lookup is answered from what the first kept"
        );
        kept.push(answer);
    }
    let misses = crate::worker::metric(r.replica(0), "mirror_read_cache_misses_total").await;
    let (_, fresh) = r.replica(0).get_fresh(&path).await;
    assert_eq!(fresh, kept[0]);
    assert_eq!(
        crate::worker::metric(r.replica(0), "mirror_read_cache_misses_total").await,
        misses + 1.0,
        "Cache-Control: no-cache reads the database"
    );

    // The tag moves upstream and is mirrored again: the replica that did not run the job hears of
    // the new record and answers it, though what it kept could be served for 10 minutes more.
    let moved = push(&p, "team/app", r#"{"os":"linux","v":2}"#, &[vec![2; 1000]]).await;
    assert_ne!(moved, first);
    let ran = mirror_v1(&r, &src).await;
    let other = 1 - ran;
    let (answer, after) = lookup_until(r.replica(other), &path, Duration::from_secs(10), |b| {
        b["digest"] == json!(moved)
    })
    .await;
    assert_eq!(
        answer["history"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
    eprintln!(
        "figure: replica {other} answered the record replica {ran} wrote {after:?} after its job ended"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_found_on_one_replica_shows_in_the_others_lookups() {
    let src = Registry::anonymous().await;
    let dst = Registry::anonymous().await;
    let p = Pusher::new(&src);
    let first = push(&p, "team/app", r#"{"os":"linux"}"#, &[vec![1; 1000]]).await;
    let r = two_replicas_keeping_lookups(&src, &dst).await;
    let (status, job) = r
        .replica(0)
        .mirror(&json!({ "image": format!("{}/team/app:v1", src.host()), "policy": "pin" }))
        .await;
    assert_eq!(status, 202, "{job}");
    let job = r
        .replica(0)
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let path = format!("/images/{}/team/app:v1", src.host());
    let (_, answer) = r.replica(1).get(&path).await;
    assert_eq!(answer["drift"], json!([]), "{answer}");

    // The tag moves upstream; a round on replica 0 finds it (pinned: the mirror keeps its digest).
    let moved = push(&p, "team/app", r#"{"os":"linux","v":2}"#, &[vec![2; 1000]]).await;
    let round = r.replica(0).drift_round().await;
    assert_eq!(round["upstream_moved"], 1, "{round}");
    let (answer, after) = lookup_until(r.replica(1), &path, Duration::from_secs(10), |b| {
        b["drift"].as_array().is_some_and(|d| !d.is_empty())
    })
    .await;
    assert_eq!(answer["drift"][0]["kind"], "upstream_moved", "{answer}");
    assert_eq!(answer["drift"][0]["observed_digest"], json!(moved));
    assert_eq!(answer["digest"], json!(first), "pinned");
    eprintln!("figure: replica 1 showed the drift replica 0 found {after:?} after its round");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_lookup_follows_a_change_made_with_sql_and_survives_a_lost_listen_connection() {
    let src = Registry::anonymous().await;
    let dst = Registry::anonymous().await;
    let p = Pusher::new(&src);
    push(&p, "team/app", r#"{"os":"linux"}"#, &[vec![1; 1000]]).await;
    let r = two_replicas_keeping_lookups(&src, &dst).await;
    mirror_v1(&r, &src).await;
    let path = format!("/images/{}/team/app:v1", src.host());
    let svc = r.replica(1);
    let (_, kept) = svc.get(&path).await;
    assert_eq!(svc.get(&path).await.1, kept, "kept");
    let db = pg(r.database()).await;
    let set_size = |n: i64| {
        let db = db.clone();
        async move {
            sqlx::query("update mirror_record set size_bytes = $1")
                .bind(n)
                .execute(&db)
                .await
                .unwrap();
        }
    };

    // A change no replica made (psql, a script): its row trigger's notification reaches both.
    set_size(12_345).await;
    let (_, after) = lookup_until(svc, &path, Duration::from_secs(10), |b| {
        b["size_bytes"] == 12_345
    })
    .await;
    eprintln!("figure: a change made with SQL was answered {after:?} later");

    // Every replica's LISTEN connection is cut, and the ledger changes at once: whether that
    // change's notification is lost in the gap or not, no replica keeps answering the old record.
    let cut: Vec<i32> = sqlx::query_scalar(
        "select pg_terminate_backend(pid)::int from pg_stat_activity
         where datname = current_database() and query ilike 'listen%'",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(cut.len(), 2, "one LISTEN connection per replica: {cut:?}");
    set_size(67_890).await;
    for i in 0..r.len() {
        let (_, after) = lookup_until(r.replica(i), &path, Duration::from_secs(10), |b| {
            b["size_bytes"] == 67_890
        })
        .await;
        eprintln!(
            "figure: replica {i} answered the change made while LISTEN was cut {after:?} later"
        );
    }
    db.close().await;
}
