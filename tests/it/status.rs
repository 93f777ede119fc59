//! The status pages of a real service: the page per image (tags, platforms with their digests,
//! signatures, history, drift), escaping, Chinese on `Accept-Language: zh`, and the page as
//! headless Chromium renders it (a screenshot taken, the text checked).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::image::{Style, TestImage, platform};
use crate::support::service::Service;
use crate::support::{Pusher, Registry, require_tool};

/// A 2-platform index at `repo:tag` on `up`, with a cosign-style `.sig` for it.
async fn signed_index(up: &Registry, repo: &str, tag: &str, seed: u64) -> (TestImage, String) {
    let p = Pusher::new(up);
    let a = p.image(repo, seed, &[3000], false, Style::Compact).await;
    let b = p
        .image(repo, seed + 1, &[4000], false, Style::Compact)
        .await;
    let idx = p
        .index(
            repo,
            Some(tag),
            &[
                (a.clone(), platform("linux", "amd64")),
                (b.clone(), platform("linux", "arm64")),
            ],
            false,
            Style::CrlfOdd,
        )
        .await;
    let sig = p
        .image_with(
            repo,
            format!(r#"{{"cosign":"sig","seed":{seed}}}"#).as_bytes(),
            &[format!("signature {seed}").into_bytes()],
            false,
            Style::Compact,
        )
        .await;
    let sig_tag = format!("sha256-{}.sig", idx.digest.trim_start_matches("sha256:"));
    p.manifest(repo, &sig_tag, &sig.media_type, &sig.bytes)
        .await;
    (
        TestImage {
            blobs: vec![a.digest, b.digest],
            ..idx
        },
        sig.digest,
    )
}

async fn mirror(svc: &Service, image: &str) -> Value {
    let (status, job) = svc
        .mirror(&json!({ "image": image, "policy": "pin" }))
        .await;
    assert_eq!(status, 202, "{job}");
    let job = svc
        .wait_job(job["id"].as_i64().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    job
}

async fn get_html(svc: &Service, path: &str, lang: Option<&str>) -> (u16, String, String) {
    let mut req = reqwest::Client::new().get(format!("{}{path}", svc.url));
    if let Some(l) = lang {
        req = req.header("accept-language", l);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let content_language = r
        .headers()
        .get("content-language")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, content_language, r.text().await.unwrap())
}

/// Runs headless Chromium on `url` with `lang`: (the DOM as text, screenshot PNG bytes).
fn chromium(url: &str, lang: &str, shot: &Path) -> String {
    require_tool("chromium");
    let profile = tempfile::tempdir().unwrap();
    let common = |cmd: &mut Command| {
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--lang={lang}"))
        .arg(format!("--accept-lang={lang}"))
        .env("LANGUAGE", lang.replace('-', "_"));
    };
    let mut cmd = Command::new("chromium");
    common(&mut cmd);
    let out = cmd
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1280,1600")
        .arg(url)
        .output()
        .expect("running chromium");
    assert!(
        out.status.success() && shot.is_file(),
        "chromium --screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = Command::new("chromium");
    common(&mut cmd);
    let out = cmd
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("running chromium");
    assert!(
        out.status.success(),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The width and height in a PNG's IHDR.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert_eq!(&png[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_per_image_shows_tags_platforms_signatures_history_and_drift_in_two_languages() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", down.host()),
        &up.host(),
        &[("MIRROR_DRIFT_INTERVAL", "0")],
    )
    .await;
    let src = format!("{}/team/app:1.0", up.host());
    let (first, _) = signed_index(&up, "team/app", "1.0", 10).await;
    mirror(&svc, &src).await;
    // The tag moves upstream and is mirrored again: two records in its history.
    let (second, sig) = signed_index(&up, "team/app", "1.0", 20).await;
    let job = mirror(&svc, &src).await;
    // It moves once more; pinned, drift watch records the move and leaves the mirror.
    let (third, _) = signed_index(&up, "team/app", "1.0", 30).await;
    let round = svc.drift_round().await;
    assert_eq!(round["upstream_moved"], 1, "{round}");

    let path = format!("/ui/images/{}/team/app", up.host());
    let (status, lang, en) = get_html(&svc, &path, Some("en-US,en;q=0.9")).await;
    assert_eq!(status, 200, "{en}");
    assert_eq!(lang, "en");
    assert!(en.contains("<html lang=\"en\">"));
    assert!(!en.contains("<script"), "no JavaScript");
    let mirror_repo = format!(
        "{}/mirror/{}/team/app",
        down.host(),
        up.host().replace(':', "_")
    );
    for want in [
        "tag <code>1.0</code>".to_string(),
        format!("docker pull {mirror_repo}:1.0@{}", second.digest),
        // The platforms of the current digest, each with its own pull line.
        format!("<td>linux/amd64</td><td><code>{}</code>", second.blobs[0]),
        format!("docker pull {mirror_repo}@{}", second.blobs[1]),
        // The signature copied with it.
        format!("<td>cosign signature</td><td><code>{sig}</code>"),
        // History: both mirrored digests, newest first, with their jobs.
        format!("<a href=\"/jobs/{}\">", job["id"]),
        // Drift: the move upstream not followed (pinned).
        format!("upstream moved to <code>{}</code>", third.digest),
    ] {
        assert!(en.contains(&want), "{want} missing from:\n{en}");
    }
    let h_second = en
        .find(&format!("<tr><td><code>{}", second.digest))
        .unwrap();
    let h_first = en.find(&format!("<tr><td><code>{}", first.digest)).unwrap();
    assert!(h_second < h_first, "history newest first");

    // Chinese when the browser asks for it.
    let (status, lang, zh) = get_html(&svc, &path, Some("zh-CN,zh;q=0.9,en;q=0.8")).await;
    assert_eq!(status, 200);
    assert_eq!(lang, "zh-CN");
    for want in [
        "<html lang=\"zh-CN\">",
        "标签 <code>1.0</code>",
        "<h3>平台</h3>",
        "cosign 签名",
        "<h3>历史</h3>",
        "上游标签已改指向",
        "可信摘要",
    ] {
        assert!(zh.contains(want), "{want} missing from:\n{zh}");
    }
    assert!(zh.contains(&second.digest));

    // The front page links to it; what a visitor types is escaped, never markup.
    let (status, _, front) = get_html(&svc, "/?q=<script>alert(1)</script>", None).await;
    assert_eq!(status, 200);
    assert!(
        front.contains("&#60;script&#62;alert(1)&#60;/script&#62;")
            || front.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{front}"
    );
    assert!(!front.contains("<script>"));
    let (_, _, front) = get_html(&svc, "/", Some("zh")).await;
    assert!(front.contains(&format!("<a href=\"{path}\">")), "{front}");
    assert!(front.contains("已镜像的镜像") && front.contains("最近的任务"));

    // Never mirrored: a 404 page saying so.
    let (status, _, nope) = get_html(&svc, "/ui/images/quay.io/nobody/nothing", Some("zh")).await;
    assert_eq!(status, 404);
    assert!(nope.contains("从未在此镜像过"), "{nope}");

    // In a real browser: the page renders, and its text is what a reader sees.
    let shot = dir.path().join("image-zh.png");
    let dom = chromium(&format!("{}{path}", svc.url), "zh-CN", &shot);
    assert!(dom.contains("<html lang=\"zh-CN\">"), "{dom}");
    for want in ["平台", "历史", "cosign 签名", "上游标签已改指向"] {
        assert!(dom.contains(want), "{want} missing from the DOM:\n{dom}");
    }
    assert!(dom.contains(&second.digest) && dom.contains(&third.digest));
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(png_size(&png), (1280, 1600));
    assert!(
        png.len() > 20_000,
        "a page, not a blank: {} bytes",
        png.len()
    );
    if let Ok(keep) = std::env::var("MIRROR_TEST_SCREENSHOTS") {
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::copy(&shot, Path::new(&keep).join("image-zh.png")).unwrap();
        let en_shot = Path::new(&keep).join("image-en.png");
        chromium(&format!("{}{path}", svc.url), "en-US", &en_shot);
        let front_shot = Path::new(&keep).join("front-zh.png");
        chromium(&format!("{}/", svc.url), "zh-CN", &front_shot);
    }
}
