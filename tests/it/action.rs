//! The GitHub Action: its YAML (and the workflows') parse and name only inputs that exist, and
//! its script, run here with the variables Actions sets, mirrors real images, writes the summary
//! and the `result` output with the real digests, fails with the one-line reason, and installs
//! only a binary matching its published sha256.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use serde_norway::Value as Yaml;

use crate::support::image::{Style, platform};
use crate::support::{Pusher, Registry, bin, sha256, skopeo};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[track_caller]
fn yaml(path: &str) -> Yaml {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path} does not parse: {e}"))
}

/// Every `${{ <prefix>.NAME }}` (NAME of letters, digits, `-`, `_`) in `text`.
fn refs(text: &str, prefix: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(&format!(
        r"\$\{{\{{[^}}]*?\b{}\.([A-Za-z0-9_-]+)",
        regex::escape(prefix)
    ))
    .unwrap();
    re.captures_iter(text).map(|c| c[1].to_string()).collect()
}

fn keys(v: &Yaml) -> BTreeSet<String> {
    v.as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn action_and_workflows_parse_and_name_only_inputs_that_exist() {
    let action = yaml("action.yml");
    let inputs = keys(&action["inputs"]);
    let want: BTreeSet<String> = [
        "images",
        "target",
        "layout",
        "platforms",
        "registry-username",
        "registry-password",
        "version",
    ]
    .map(String::from)
    .into();
    assert_eq!(inputs, want, "the inputs issue 17 names");
    assert_eq!(action["runs"]["using"].as_str(), Some("composite"));
    assert!(keys(&action["outputs"]).contains("result"));

    // Every inputs.X the action uses is declared, and every declared one is used.
    let text = std::fs::read_to_string(root().join("action.yml")).unwrap();
    assert_eq!(refs(&text, "inputs"), inputs, "inputs used vs declared");
    // The output comes from a step that exists.
    let steps = action["runs"]["steps"].as_sequence().unwrap();
    let ids: BTreeSet<String> = steps
        .iter()
        .filter_map(|s| s["id"].as_str().map(String::from))
        .collect();
    assert!(refs(&text, "steps").is_subset(&ids), "{ids:?}");
    // Every INPUT_* the script reads is set by the action (and nothing else is invented).
    let script = std::fs::read_to_string(root().join("scripts/action.sh")).unwrap();
    let read: BTreeSet<String> = regex::Regex::new(r"\$\{?(INPUT_[A-Z_]+)")
        .unwrap()
        .captures_iter(&script)
        .map(|c| c[1].to_string())
        .collect();
    let set: BTreeSet<String> = steps
        .iter()
        .flat_map(|s| keys(&s["env"]))
        .filter(|k| k.starts_with("INPUT_"))
        .collect();
    assert_eq!(read, set, "INPUT_* read by the script vs set by action.yml");
    for s in steps {
        let run = s["run"].as_str().unwrap();
        assert!(run.contains("scripts/action.sh"), "{run}");
        assert_eq!(s["shell"].as_str(), Some("bash"));
    }

    // The documented workflow: both triggers, and `with:` names only the action's inputs.
    let wf = yaml("deploy/github/action-workflow.yml");
    let on = keys(&wf["on"]);
    assert!(
        on.contains("workflow_dispatch") && on.contains("repository_dispatch"),
        "{on:?}"
    );
    let mut used_action = false;
    for job in wf["jobs"].as_mapping().unwrap().values() {
        for step in job["steps"].as_sequence().unwrap() {
            if step["uses"]
                .as_str()
                .is_some_and(|u| u.contains("/mirror-mirror@"))
            {
                used_action = true;
                let with = keys(&step["with"]);
                assert!(with.is_subset(&inputs), "unknown inputs: {with:?}");
                for required in ["images", "target"] {
                    assert!(with.contains(required), "{required} is required");
                }
            }
        }
    }
    assert!(used_action, "the workflow uses the action");

    // ci.yml runs .ci/run; release.yml builds both musl targets with sha256 files and pushes by digest.
    let ci = std::fs::read_to_string(root().join(".github/workflows/ci.yml")).unwrap();
    yaml(".github/workflows/ci.yml");
    assert!(ci.contains("run: .ci/run") && root().join(".ci/run").is_file());
    let release = yaml(".github/workflows/release.yml");
    let text = std::fs::read_to_string(root().join(".github/workflows/release.yml")).unwrap();
    let matrix = &release["jobs"]["binaries"]["strategy"]["matrix"]["include"];
    let arches: Vec<&str> = matrix
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["arch"].as_str().unwrap())
        .collect();
    assert_eq!(arches, ["x86_64", "aarch64"]);
    let matrix_keys: BTreeSet<String> = matrix
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(keys)
        .collect();
    assert!(
        refs(&text, "matrix").is_subset(&matrix_keys),
        "matrix.* used but not defined"
    );
    assert!(text.contains("-unknown-linux-musl") && text.contains("sha256sum"));
    assert!(text.contains("push-by-digest=true"));
    // The release names binaries the way the action's installer downloads them.
    assert!(text.contains(r#"name="mirror-mirror-$GITHUB_REF_NAME-$TARGET""#));
    assert!(script.contains(r#"name="mirror-mirror-$version-$arch-unknown-linux-musl""#));
}

/// Runs `scripts/action.sh <args>` with `env` and a fresh HOME and Docker config.
fn script(args: &[&str], env: &[(&str, &str)], home: &Path) -> Output {
    let mut cmd = std::process::Command::new(root().join("scripts/action.sh"));
    cmd.args(args)
        .env("HOME", home)
        .env("DOCKER_CONFIG", home.join(".docker"))
        .env("RUNNER_TEMP", home.join("runner-temp"))
        .env_remove("REGISTRY_AUTH_FILE")
        .env("MIRROR_LOG", "warn");
    for k in [
        "INPUT_IMAGES",
        "INPUT_TARGET",
        "INPUT_LAYOUT",
        "INPUT_PLATFORMS",
        "INPUT_REGISTRY_USERNAME",
        "INPUT_REGISTRY_PASSWORD",
        "INPUT_VERSION",
        "GITHUB_OUTPUT",
        "GITHUB_STEP_SUMMARY",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running scripts/action.sh")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_layout_input_names_mirrors_as_the_service_does() {
    use mirror_mirror::mapping::{Layout, TargetPrefix};
    use mirror_mirror::reference::ImageRef;
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let img = Pusher::new(&up)
        .image("deep/team/app", 5, &[2000], false, Style::Compact)
        .await;
    Pusher::new(&up)
        .manifest("deep/team/app", "v1", &img.media_type, &img.bytes)
        .await;
    let home = tempfile::tempdir().unwrap();
    let src = format!("{}/deep/team/app:v1", up.host());
    let target = format!("{}/acme", down.host());
    for layout in [Layout::Nested, Layout::Flat] {
        let out = script(
            &["run"],
            &[
                ("INPUT_IMAGES", &src),
                ("INPUT_TARGET", &target),
                ("INPUT_LAYOUT", layout.as_str()),
                ("MIRROR_MIRROR_BIN", bin()),
            ],
            home.path(),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result: Value = serde_json::from_slice(&out.stdout).unwrap();
        let want = TargetPrefix::parse(&target)
            .unwrap()
            .with_layout(layout)
            .repo_for(&ImageRef::parse_source(&src).unwrap())
            .unwrap();
        assert_eq!(
            result["images"][0]["pull"],
            Value::from(format!("{want}@{}", img.digest)),
            "{layout:?}"
        );
        let raw = skopeo::inspect_raw(&format!("{want}:v1"), None);
        assert_eq!(sha256(&raw), img.digest);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_action_mirrors_and_reports_the_real_digests() {
    let up = Registry::anonymous().await;
    let down = Registry::basic("ci-bot", "s3cret-pass").await;
    let p = Pusher::new(&up);
    let a = p.image("team/app", 1, &[5000], false, Style::Compact).await;
    let b = p.image("team/app", 2, &[6000], false, Style::Compact).await;
    let idx = p
        .index(
            "team/app",
            Some("1.0"),
            &[
                (a, platform("linux", "amd64")),
                (b, platform("linux", "arm64")),
            ],
            false,
            Style::CrlfOdd,
        )
        .await;
    let single = p.image("tools/cli", 3, &[7000], true, Style::CrlfOdd).await;
    p.manifest("tools/cli", "v2", &single.media_type, &single.bytes)
        .await;

    let home = tempfile::tempdir().unwrap();
    let summary = home.path().join("summary.md");
    let output = home.path().join("output");
    std::fs::write(&summary, "").unwrap();
    std::fs::write(&output, "").unwrap();
    let images = format!(
        "{up}/team/app:1.0\n\n  # a comment\n{up}/tools/cli:v2  \n",
        up = up.host()
    );
    let target = format!("{}/mirror", down.host());
    let out = script(
        &["run"],
        &[
            ("INPUT_IMAGES", &images),
            ("INPUT_TARGET", &target),
            ("INPUT_REGISTRY_USERNAME", "ci-bot"),
            ("INPUT_REGISTRY_PASSWORD", "s3cret-pass"),
            ("MIRROR_MIRROR_BIN", bin()),
            ("GITHUB_STEP_SUMMARY", summary.to_str().unwrap()),
            ("GITHUB_OUTPUT", output.to_str().unwrap()),
        ],
        home.path(),
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let out_text = std::fs::read_to_string(&output).unwrap();
    let line = out_text
        .lines()
        .find_map(|l| l.strip_prefix("result="))
        .expect("a result= line");
    let result: Value = serde_json::from_str(line).unwrap();
    assert_eq!(result["failed"], 0);
    let rows = result["images"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{result:#}");
    let mapped = |repo: &str| format!("{target}/{}/{repo}", up.host().replace(':', "_"));
    for (row, (repo, digest)) in rows
        .iter()
        .zip([("team/app", &idx.digest), ("tools/cli", &single.digest)])
    {
        assert_eq!(row["ok"], true);
        assert_eq!(row["digest"], Value::from(digest.clone()));
        let pull = format!("{}@{digest}", mapped(repo));
        assert_eq!(row["pull"], Value::from(pull.clone()));
        // The pull line really serves the official digest (skopeo, with the target's login).
        let raw = skopeo::inspect_raw(&pull, down.creds());
        assert_eq!(sha256(&raw), *digest);
    }

    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(
        md.contains("| source | official digest | mirror pull line |"),
        "{md}"
    );
    assert!(
        md.contains(&format!(
            "| `{}/team/app:1.0` | `{}` | `docker pull {}@{}` |",
            up.host(),
            idx.digest,
            mapped("team/app"),
            idx.digest
        )),
        "{md}"
    );
    assert!(md.contains(&single.digest), "{md}");
    // The password went into a Docker config of the runner's temp dir, not into the summary or output.
    assert!(!md.contains("s3cret-pass") && !out_text.contains("s3cret-pass"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_copy_fails_the_step_with_the_one_line_reason() {
    let (up, down) = (Registry::anonymous().await, Registry::anonymous().await);
    let good = Pusher::new(&up)
        .image("team/app", 4, &[1000], false, Style::Compact)
        .await;
    Pusher::new(&up)
        .manifest("team/app", "ok", &good.media_type, &good.bytes)
        .await;
    let home = tempfile::tempdir().unwrap();
    let summary = home.path().join("summary.md");
    let output = home.path().join("output");
    let images = format!("{up}/team/absent:1.0\n{up}/team/app:ok", up = up.host());
    let target = format!("{}/mirror", down.host());
    let out = script(
        &["run"],
        &[
            ("INPUT_IMAGES", &images),
            ("INPUT_TARGET", &target),
            ("MIRROR_MIRROR_BIN", bin()),
            ("GITHUB_STEP_SUMMARY", summary.to_str().unwrap()),
            ("GITHUB_OUTPUT", output.to_str().unwrap()),
        ],
        home.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let annotation = stdout
        .lines()
        .find(|l| l.starts_with("::error title=mirror-mirror copy "))
        .unwrap_or_else(|| panic!("no error annotation: {stdout}"));
    assert!(
        annotation.contains("team/absent:1.0") && annotation.contains("does not exist"),
        "{annotation}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap();
    assert!(
        last.starts_with("error: 1 of 2 copies failed; first: ") && last.contains("does not exist"),
        "{last}"
    );
    // The good image was still mirrored and reported.
    let out_text = std::fs::read_to_string(&output).unwrap();
    let result: Value =
        serde_json::from_str(out_text.trim().strip_prefix("result=").unwrap()).unwrap();
    assert_eq!(result["failed"], 1);
    assert_eq!(result["images"][0]["ok"], false);
    assert!(
        result["images"][0]["error"]
            .as_str()
            .unwrap()
            .contains("does not exist")
    );
    assert_eq!(result["images"][1]["digest"], Value::from(good.digest));
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(md.contains("| failed |"), "{md}");

    // Platforms: each passed as `copy --platform`. One platform of an index: that child, under
    // its official digest, is what the summary and the result name.
    let amd = Pusher::new(&up)
        .image("team/multi", 5, &[1100], false, Style::Compact)
        .await;
    let arm = Pusher::new(&up)
        .image("team/multi", 6, &[1200], false, Style::Compact)
        .await;
    let idx = Pusher::new(&up)
        .index(
            "team/multi",
            Some("2.0"),
            &[
                (amd.clone(), platform("linux", "amd64")),
                (arm.clone(), platform("linux", "arm64")),
            ],
            false,
            Style::Compact,
        )
        .await;
    std::fs::write(&summary, "").unwrap();
    std::fs::write(&output, "").unwrap();
    let out = script(
        &["run"],
        &[
            ("INPUT_IMAGES", &format!("{}/team/multi:2.0", up.host())),
            ("INPUT_TARGET", &target),
            ("INPUT_PLATFORMS", "linux/arm64"),
            ("MIRROR_MIRROR_BIN", bin()),
            ("GITHUB_STEP_SUMMARY", summary.to_str().unwrap()),
            ("GITHUB_OUTPUT", output.to_str().unwrap()),
        ],
        home.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&output).unwrap();
    let result: Value = serde_json::from_str(text.trim().strip_prefix("result=").unwrap()).unwrap();
    let image = &result["images"][0];
    assert_eq!(image["digest"], Value::from(arm.digest.clone()), "{result}");
    assert_eq!(image["subset"], true);
    assert_eq!(
        image["source_index_digest"],
        Value::from(idx.digest.clone())
    );
    assert_eq!(image["platforms"], serde_json::json!(["linux/arm64"]));
    assert!(
        image["pull"]
            .as_str()
            .unwrap()
            .ends_with(&format!("@{}", arm.digest)),
        "{result}"
    );
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(
        md.contains(&format!("(platform linux/arm64 of {})", idx.digest)),
        "{md}"
    );

    // Several platforms: a rebuilt index, and the summary says it is not an official digest.
    let out = script(
        &["run"],
        &[
            ("INPUT_IMAGES", &format!("{}/team/multi:2.0", up.host())),
            ("INPUT_TARGET", &target),
            ("INPUT_PLATFORMS", "linux/amd64, linux/arm64"),
            ("MIRROR_MIRROR_BIN", bin()),
            ("GITHUB_STEP_SUMMARY", summary.to_str().unwrap()),
        ],
        home.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(
        md.contains("a rebuilt index, NOT an official digest"),
        "{md}"
    );
    assert!(md.contains(&format!("linux/amd64 {}", amd.digest)), "{md}");

    // A platform the image does not have: one line saying which it has, before any copy.
    let out = script(
        &["run"],
        &[
            ("INPUT_IMAGES", &format!("{}/team/app:ok", up.host())),
            ("INPUT_TARGET", &target),
            ("INPUT_PLATFORMS", "linux/arm64"),
            ("MIRROR_MIRROR_BIN", bin()),
        ],
        home.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "is a single image for linux/amd64, not an index: it has no platform linux/arm64"
        ),
        "{err}"
    );

    // Bad inputs: one line saying what to give.
    let out = script(
        &["run"],
        &[("INPUT_IMAGES", "nginx"), ("INPUT_TARGET", "")],
        home.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the input target is empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn install_takes_only_a_binary_matching_its_published_sha256() {
    use axum::routing::get;
    let binary = std::fs::read(bin()).unwrap();
    let arch = std::env::consts::ARCH;
    let name = format!("mirror-mirror-v9.9.9-{arch}-unknown-linux-musl");
    let good_sum = format!(
        "{}  {name}\n",
        sha256(&binary).trim_start_matches("sha256:")
    );
    let bad_sum = format!("{}  {name}\n", "0".repeat(64));
    let app = axum::Router::new()
        .route(
            &format!("/good/v9.9.9/{name}"),
            get({
                let b = binary.clone();
                move || async move { b }
            }),
        )
        .route(
            &format!("/good/v9.9.9/{name}.sha256"),
            get(move || async move { good_sum }),
        )
        .route(
            &format!("/bad/v9.9.9/{name}"),
            get(move || async move { binary }),
        )
        .route(
            &format!("/bad/v9.9.9/{name}.sha256"),
            get(move || async move { bad_sum }),
        );
    let addr = crate::support::serve(app, "127.0.0.1").await;

    let home = tempfile::tempdir().unwrap();
    let path_file = home.path().join("path");
    let out = script(
        &["install"],
        &[
            ("INPUT_VERSION", "v9.9.9"),
            ("MIRROR_RELEASE_BASE", &format!("http://{addr}/good")),
            ("GITHUB_PATH", path_file.to_str().unwrap()),
        ],
        home.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let version = std::process::Command::new(&installed)
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("mirror-mirror "));
    assert_eq!(
        std::fs::read_to_string(&path_file).unwrap().trim(),
        installed.parent().unwrap().to_str().unwrap()
    );

    let home = tempfile::tempdir().unwrap();
    let out = script(
        &["install"],
        &[
            ("INPUT_VERSION", "v9.9.9"),
            ("MIRROR_RELEASE_BASE", &format!("http://{addr}/bad")),
        ],
        home.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("published .sha256 says 000"), "{err}");
    assert!(
        !home
            .path()
            .join("runner-temp/mirror-mirror-bin/mirror-mirror")
            .exists(),
        "nothing installed"
    );

    // No tag to install from: say what to set.
    let out = script(&["install"], &[("ACTION_REF", "main")], home.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("set the input version"));
}
