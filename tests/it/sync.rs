//! The declarative mirror list against real registries: tags listed page by page, selected by
//! explicit list, regex, semver and newest-N; synced at start and on demand through the queue.

use std::time::{Duration, Instant};

use mirror_mirror::reference::ImageRef;
use mirror_mirror::registry::credentials::CredentialStore;
use mirror_mirror::registry::{Client, ClientConfig, Repo};
use serde_json::{Value, json};

use crate::support::image::{Style, TestImage};
use crate::support::service::Service;
use crate::support::{Pusher, Registry, TokenIssuer, bin};

/// Pushes a small image to `repo` and tags it with each of `tags`.
async fn tagged(up: &Registry, repo: &str, seed: u64, tags: &[&str]) -> TestImage {
    let p = Pusher::new(up);
    let img = p
        .image(repo, seed, &[1_000 + seed as usize], false, Style::Compact)
        .await;
    for t in tags {
        p.manifest(repo, t, &img.media_type, &img.bytes).await;
    }
    img
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_are_listed_from_a_real_registry() {
    let up = Registry::anonymous().await;
    let tags: Vec<String> = (0..25).map(|i| format!("t{i:02}")).collect();
    let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    tagged(&up, "many/tags", 1, &refs).await;
    let client = Client::new(ClientConfig::default(), CredentialStore::empty()).unwrap();
    let repo = Repo::of(&ImageRef::parse(&format!("{}/many/tags", up.host())).unwrap());
    // distribution 2.8 answers in one page whatever `n` says (and sends no `Link`): paging is
    // exercised against `paging_registry` below.
    assert_eq!(client.list_tags(&repo, 10).await.unwrap(), tags);
    let none = Repo::of(&ImageRef::parse(&format!("{}/no/such", up.host())).unwrap());
    let err = client.list_tags(&none, 10).await.unwrap_err().to_string();
    assert!(err.contains("404") || err.contains("NAME_UNKNOWN"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tag_listing_authenticates_with_pull_on_the_repository() {
    let issuer = TokenIssuer::start("lena", "lena-password-1").await;
    let reg = Registry::token(&issuer).await;
    tagged(&reg, "auth/tags", 1, &["a", "b", "c"]).await;
    let repo = Repo::of(&ImageRef::parse(&format!("{}/auth/tags", reg.host())).unwrap());
    // Without credentials the registry refuses: the listing below really needs its token.
    let anonymous = Client::new(ClientConfig::default(), CredentialStore::empty()).unwrap();
    let err = anonymous
        .list_tags(&repo, 10)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("authentication") || err.contains("401"),
        "{err}"
    );
    let asked_before = issuer.scopes().len();
    let (user, pass) = issuer.creds();
    let creds = CredentialStore::from_json(
        &json!({ "auths": { reg.host(): { "username": user, "password": pass } } }).to_string(),
    )
    .unwrap();
    let client = Client::new(ClientConfig::default(), creds).unwrap();
    assert_eq!(client.list_tags(&repo, 10).await.unwrap(), ["a", "b", "c"]);
    let scopes = issuer.scopes()[asked_before..].to_vec();
    assert_eq!(
        scopes,
        ["repository:auth/tags:pull"],
        "one token, pull only"
    );
}

/// How [`paging_registry`] pages.
#[derive(Clone, Copy, PartialEq)]
enum Paging {
    /// As the spec says: `n`, `last`, and a relative `Link` to the next page.
    Honest,
    /// The second page's link points at another host.
    Foreign,
    /// The second page's link is on the same host and port, over another scheme.
    OtherScheme,
    /// The second page links back to the first.
    Loop,
    /// Every page is empty and links to a new one.
    EmptyForever,
    /// One page over 4 MiB.
    Huge,
}

/// A registry that pages its tag list as the spec allows (`n`, `last`, `Link`), which
/// distribution 2.8 does not, or misbehaves as `paging` says. Counts the pages asked for.
async fn paging_registry(
    tags: Vec<String>,
    paging: Paging,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let count = asked.clone();
    let app = axum::Router::new().route(
        "/v2/{*rest}",
        axum::routing::get(
            move |axum::extract::Query(q): axum::extract::Query<
                std::collections::HashMap<String, String>,
            >,
                  headers: axum::http::HeaderMap| {
                let (tags, count) = (tags.clone(), count.clone());
                async move {
                    let k = count.fetch_add(1, Ordering::SeqCst);
                    let host = headers["host"].to_str().unwrap().to_string();
                    let n: usize = q.get("n").and_then(|n| n.parse().ok()).unwrap_or(100);
                    let from = q
                        .get("last")
                        .and_then(|l| tags.iter().position(|t| t == l).map(|i| i + 1))
                        .unwrap_or(0);
                    let mut page: Vec<String> = tags.iter().skip(from).take(n).cloned().collect();
                    let mut link = (from + n < tags.len()).then(|| {
                        format!("/v2/paged/tags/list?n={n}&last={}", page.last().unwrap())
                    });
                    match paging {
                        Paging::Honest => {}
                        Paging::Foreign => {
                            link = link.map(|l| format!("http://127.0.0.2:9{l}"));
                        }
                        Paging::OtherScheme => link = link.map(|l| format!("https://{host}{l}")),
                        Paging::Loop if from > 0 => {
                            link = Some(format!("/v2/paged/tags/list?n={n}"));
                        }
                        Paging::Loop => {}
                        Paging::EmptyForever => {
                            page.clear();
                            link = Some(format!("/v2/paged/tags/list?n={n}&last=x{k}"));
                        }
                        Paging::Huge => page = vec!["a".repeat(5 << 20)],
                    }
                    let mut resp = axum::response::Response::builder()
                        .header("content-type", "application/json");
                    if let Some(l) = link {
                        resp = resp.header("link", format!("<{l}>; rel=\"next\""));
                    }
                    resp.body(axum::body::Body::from(
                        serde_json::to_vec(&json!({ "name": "paged", "tags": page })).unwrap(),
                    ))
                    .unwrap()
                }
            },
        ),
    );
    (crate::support::serve(app, "127.0.0.1").await, asked)
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_are_listed_page_by_page_on_the_registry_only() {
    use std::sync::atomic::Ordering::SeqCst;
    let tags: Vec<String> = (0..25).map(|i| format!("t{i:02}")).collect();
    let client = Client::new(ClientConfig::default(), CredentialStore::empty()).unwrap();
    let list = |paging: Paging, tags: Vec<String>| {
        let client = client.clone();
        async move {
            let (host, asked) = paging_registry(tags, paging).await;
            let repo = Repo::of(&ImageRef::parse(&format!("{host}/paged")).unwrap());
            let got = client.list_tags(&repo, 10).await.map_err(|e| e.to_string());
            (got, asked.load(SeqCst), host)
        }
    };
    let (got, asked, _) = list(Paging::Honest, tags.clone()).await;
    assert_eq!(got.unwrap(), tags);
    assert_eq!(asked, 3, "three pages of 10");

    let (got, asked, _) = list(Paging::Foreign, tags.clone()).await;
    let err = got.unwrap_err();
    assert!(
        err.contains("page 2 is at http://127.0.0.2:9, not on the registry"),
        "{err}"
    );
    assert_eq!(asked, 1);

    let (got, _, host) = list(Paging::OtherScheme, tags.clone()).await;
    let err = got.unwrap_err();
    assert!(
        err.contains(&format!(
            "page 2 is at https://{host}, not on the registry (http://{host})"
        )),
        "the scheme counts too: {err}"
    );

    let (got, asked, _) = list(Paging::Loop, tags.clone()).await;
    let err = got.unwrap_err();
    assert!(
        err.contains("page 3 links back to a page already read"),
        "{err}"
    );
    assert_eq!(asked, 2);

    let (got, asked, _) = list(Paging::EmptyForever, tags.clone()).await;
    let err = got.unwrap_err();
    assert!(
        err.contains("page 2 follows page 1, which was empty"),
        "{err}"
    );
    assert_eq!(asked, 1, "an empty page ends the chain");

    let (got, _, _) = list(Paging::Huge, tags).await;
    let err = got.unwrap_err();
    assert!(
        err.contains("page 1 of the tag list of") && err.contains("is larger than 4194304 bytes"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn names_that_are_not_tags_are_left_out_of_the_list() {
    // A registry may answer anything; what comes back must be usable in a reference (the sync
    // puts selected tags into references, and `1.2.3+build` is a version the semver filter
    // would select).
    let names: Vec<String> = [
        "1.2.3",
        "1.2.3+build",
        "bad tag",
        "../x",
        "-rc",
        ".hidden",
        "v1",
        "ok_2",
    ]
    .map(String::from)
    .to_vec();
    let long = "a".repeat(129);
    let mut all = names.clone();
    all.push(long);
    let (host, _) = paging_registry(all, Paging::Honest).await;
    let client = Client::new(ClientConfig::default(), CredentialStore::empty()).unwrap();
    let repo = Repo::of(&ImageRef::parse(&format!("{host}/paged")).unwrap());
    assert_eq!(
        client.list_tags(&repo, 100).await.unwrap(),
        ["1.2.3", "ok_2", "v1"]
    );
}

async fn wait_succeeded(svc: &Service, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, jobs) = svc.get("/jobs?limit=100").await;
        let jobs = jobs["jobs"].as_array().cloned().unwrap_or_default();
        let done = jobs.iter().filter(|j| j["state"] == "succeeded").count();
        let failed: Vec<&Value> = jobs.iter().filter(|j| j["state"] == "failed").collect();
        assert!(failed.is_empty(), "{failed:?}");
        if done == n && done == jobs.len() {
            return jobs;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {n} jobs succeeded: {jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tags_of(image: &Value) -> Vec<String> {
    let mut t: Vec<String> = image["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tag"].as_str().unwrap().to_string())
        .collect();
    t.sort();
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mirror_list_is_synced_at_start_and_on_demand() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let h = up.host();
    tagged(&up, "lib/pause", 1, &["3.9", "3.10", "3.8"]).await;
    tagged(
        &up,
        "lib/app",
        2,
        &["1.0.0", "1.1.0", "v1.2.3", "2.0.0", "1.3.0-rc.1", "latest"],
    )
    .await;
    tagged(
        &up,
        "lib/web",
        3,
        &["1.27.1-alpine", "1.27.2-alpine", "1.26.0-alpine", "1.27.2"],
    )
    .await;
    let tool = tagged(&up, "lib/tool", 4, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirrors.yaml");
    std::fs::write(
        &file,
        format!(
            "images:\n\
             \x20 - source: {h}/lib/pause\n    tags: [\"3.9\", \"3.10\"]\n\
             \x20 - source: {h}/lib/app\n    semver: \">=1.0.0, <2\"\n    latest: 2\n\
             \x20 - source: {h}/lib/web\n    tag_regex: '1\\.27\\.[0-9]+-alpine'\n    policy: pin\n\
             \x20 - source: {h}/lib/tool@{}\n",
            tool.digest
        ),
    )
    .unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &h,
        &[
            ("MIRROR_SYNC_FILE", file.to_str().unwrap()),
            ("MIRROR_SYNC_INTERVAL", "0"),
        ],
    )
    .await;
    // At start: 2 + 2 (1.1.0 and v1.2.3 are the newest in range) + 2 + 1 digest.
    let jobs = wait_succeeded(&svc, 7).await;
    assert!(
        jobs.iter().all(|j| j["requested_by"]["kind"] == "sync"),
        "{jobs:?}"
    );
    let (_, app) = svc.get(&format!("/images/{h}/lib/app")).await;
    assert_eq!(tags_of(&app), ["1.1.0", "v1.2.3"]);
    assert_eq!(app["tags"][0]["requested_by"]["line"], 4, "{app}");
    let (_, web) = svc.get(&format!("/images/{h}/lib/web")).await;
    assert_eq!(tags_of(&web), ["1.27.1-alpine", "1.27.2-alpine"]);
    assert_eq!(web["tags"][0]["policy"], "pin");
    let (_, tool_image) = svc.get(&format!("/images/{h}/lib/tool")).await;
    assert_eq!(
        tool_image["digests"][0]["digest"],
        json!(tool.digest),
        "{tool_image}"
    );
    let (_, state) = svc.get("/sync").await;
    assert_eq!(state["last_sync"]["queued"], 7, "{state}");

    // Nothing changed upstream: nothing to do.
    let again = svc.sync_round().await;
    assert_eq!(
        (
            again["selected"].clone(),
            again["up_to_date"].clone(),
            again["queued"].clone(),
            again["errors"].clone()
        ),
        (json!(7), json!(7), json!(0), json!([])),
        "{again}"
    );

    // Upstream: a new version in range, 3.9 moves, a pinned tag moves.
    tagged(&up, "lib/app", 5, &["1.4.0"]).await;
    let moved = tagged(&up, "lib/pause", 6, &["3.9"]).await;
    tagged(&up, "lib/web", 7, &["1.27.1-alpine"]).await;
    let third = svc.sync_round().await;
    assert_eq!(
        third["queued"], 2,
        "1.4.0 and the moved 3.9; the pinned tag stays: {third}"
    );
    wait_succeeded(&svc, 9).await;
    let (_, app) = svc.get(&format!("/images/{h}/lib/app")).await;
    assert_eq!(
        tags_of(&app),
        ["1.1.0", "1.4.0", "v1.2.3"],
        "nothing is deleted from the mirror"
    );
    let (_, pause) = svc.get(&format!("/images/{h}/lib/pause:3.9")).await;
    assert_eq!(pause["digest"], json!(moved.digest));

    // A list edited into a bad state is reported with its line; nothing is queued.
    std::fs::write(
        &file,
        format!("images:\n  - source: {h}/lib/app\n    semver: \"=>1\"\n"),
    )
    .unwrap();
    let bad = svc.sync_round().await;
    let errors = bad["errors"].to_string();
    assert!(errors.contains("mirrors.yaml:3:13: semver"), "{bad}");
    assert_eq!(bad["queued"], 0);
}

#[test]
fn a_bad_mirror_list_stops_start_up_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirrors.yaml");
    let run = |text: &str| {
        std::fs::write(&file, text).unwrap();
        let out = std::process::Command::new(bin())
            .arg("serve")
            .env_clear()
            .env("MIRROR_DATABASE", dir.path().join("x.db"))
            .env("MIRROR_LISTEN", "127.0.0.1:0")
            .env("MIRROR_TARGET", "127.0.0.1:1/mirror")
            .env("MIRROR_API_TOKENS", "ci=0123456789abcdef0123")
            .env("MIRROR_ALLOWED_SOURCES", "quay.io")
            .env("MIRROR_SYNC_FILE", &file)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text:?} should be refused");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run("images:\n  - source: quay.io/a/b\n    tags: [x]\n    colour: red\n");
    assert!(
        err.contains("MIRROR_SYNC_FILE")
            && err.contains("mirrors.yaml:4:5: unknown key \"colour\""),
        "{err}"
    );
    let err = run(
        "images:\n  - source: quay.io/a/b\n    tags: [x]\n  - source: ghcr.io/c/d\n    tags: [y]\n",
    );
    assert!(
        err.contains("mirrors.yaml:4: source ghcr.io/c/d is not in MIRROR_ALLOWED_SOURCES"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_syncs_the_edited_list_at_once_even_within_the_interval() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let h = up.host();
    tagged(&up, "lib/one", 11, &["1"]).await;
    tagged(&up, "lib/two", 12, &["2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirrors.yaml");
    let env = [
        ("MIRROR_SYNC_FILE", file.to_str().unwrap()),
        ("MIRROR_SYNC_INTERVAL", "3600"),
    ];
    let db = dir.path().join("m.db");
    let target = format!("{}/mirror", down.host());
    std::fs::write(&file, format!("images:\n  - source: {h}/lib/one:1\n")).unwrap();
    let mut svc = Service::start(&db, &target, &h, &env).await;
    wait_succeeded(&svc, 1).await;
    svc.terminate(Duration::from_secs(10));
    // Edited and restarted within the hour: the start syncs the new entry, not the next slot.
    std::fs::write(
        &file,
        format!("images:\n  - source: {h}/lib/one:1\n  - source: {h}/lib/two:2\n"),
    )
    .unwrap();
    let svc = Service::start(&db, &target, &h, &env).await;
    let jobs = wait_succeeded(&svc, 2).await;
    assert!(
        jobs.iter()
            .any(|j| j["source"] == json!(format!("{h}/lib/two:2"))),
        "{jobs:?}"
    );
}
