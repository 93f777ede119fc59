//! Docker credential helpers (`credHelpers`, `credsStore`): `copy` asks `docker-credential-<name>
//! get` for a registry's credential once and keeps it, takes `<token>` answers as identity tokens,
//! and a helper that is missing or fails is named in one line. The helper is a script speaking the
//! protocol, put on the binary's PATH; the registries are real (htpasswd and token auth).

use std::path::Path;
use std::process::{Command, Output};

use crate::support::image::Style;
use crate::support::{Pusher, Registry, TokenIssuer, bin};

/// Writes `docker-credential-<name>` into `dir`: it logs each server URL asked about to
/// `<dir>/<name>.log` and answers `answers` (server URL → JSON), else "not found".
fn helper(dir: &Path, name: &str, answers: &[(&str, String)]) {
    let mut cases = String::new();
    for (url, json) in answers {
        cases.push_str(&format!("  '{url}') printf '%s' '{json}' ;;\n"));
    }
    let log = dir.join(format!("{name}.log"));
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread -r url\necho \"$url\" >> '{}'\ncase \"$url\" in\n{cases}  *) echo 'credentials not found in native keychain'; exit 1 ;;\nesac\n",
        log.display()
    );
    let path = dir.join(format!("docker-credential-{name}"));
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn asked(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{name}.log")))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs `copy` with `config` as the Docker config and `bin_dir` first on PATH.
fn copy(bin_dir: &Path, config: serde_json::Value, src: &str, dst: &str) -> Output {
    let docker = tempfile::tempdir().unwrap();
    std::fs::write(docker.path().join("config.json"), config.to_string()).unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(bin())
        .args(["copy", src, dst])
        .env("DOCKER_CONFIG", docker.path())
        .env_remove("REGISTRY_AUTH_FILE")
        .env("PATH", path)
        .env("MIRROR_LOG", "info")
        .output()
        .expect("running mirror-mirror")
}

async fn pushed(reg: &Registry) -> String {
    let p = Pusher::new(reg);
    let img = p
        .image("acme/app", 5, &[10_000, 20_000], false, Style::Compact)
        .await;
    p.manifest("acme/app", "v1", &img.media_type, &img.bytes)
        .await;
    img.digest
}

#[tokio::test(flavor = "multi_thread")]
async fn cred_helpers_are_asked_once_per_registry() {
    let src = Registry::basic("alice", "alice-secret").await;
    let dst = Registry::anonymous().await;
    let digest = pushed(&src).await;
    let bin_dir = tempfile::tempdir().unwrap();
    let answer = format!(
        r#"{{"ServerURL":"{}","Username":"alice","Secret":"alice-secret"}}"#,
        src.host()
    );
    helper(bin_dir.path(), "test", &[(&src.host(), answer)]);
    let out = copy(
        bin_dir.path(),
        serde_json::json!({ "credHelpers": { src.host(): "test" } }),
        &format!("{}/acme/app:v1", src.host()),
        &format!("{}/mirror/app", dst.host()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}/mirror/app@{digest}", dst.host())
    );
    // Many requests to the source, one question to the helper; none about the anonymous target
    // (credHelpers names only the source).
    assert_eq!(asked(bin_dir.path(), "test"), vec![src.host()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_creds_store_serves_every_registry_and_token_answers_are_identity_tokens() {
    let issuer = TokenIssuer::start("bob", "bob-secret").await;
    let src = Registry::token(&issuer).await;
    let dst = Registry::anonymous().await;
    let digest = pushed(&src).await;
    let bin_dir = tempfile::tempdir().unwrap();
    // `<token>` as the username: the secret is a refresh token for the token server.
    let answer = format!(
        r#"{{"ServerURL":"{}","Username":"<token>","Secret":"refresh-bob-secret"}}"#,
        src.host()
    );
    helper(bin_dir.path(), "store", &[(&src.host(), answer)]);
    let out = copy(
        bin_dir.path(),
        serde_json::json!({ "credsStore": "store" }),
        &format!("{}/acme/app:v1", src.host()),
        &format!("{}/mirror/app", dst.host()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}/mirror/app@{digest}", dst.host())
    );
    let mut hosts = asked(bin_dir.path(), "store");
    hosts.sort();
    let mut want = vec![src.host()];
    // The target is anonymous: it never asks for credentials, so the store is not asked about it.
    want.sort();
    assert_eq!(hosts, want);
    assert!(issuer.requests() > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_failing_helper_is_named_in_one_line() {
    let src = Registry::basic("carol", "carol-secret").await;
    let dst = Registry::anonymous().await;
    pushed(&src).await;
    let bin_dir = tempfile::tempdir().unwrap();
    let broken = bin_dir.path().join("docker-credential-broken");
    std::fs::write(&broken, "#!/bin/sh\necho 'keyring is locked' >&2\nexit 3\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, want) in [
        (
            "absent",
            "docker-credential-absent is not installed or not on PATH".to_string(),
        ),
        (
            "broken",
            format!(
                "docker-credential-broken get for {} failed (exit status: 3): keyring is locked",
                src.host()
            ),
        ),
    ] {
        let out = copy(
            bin_dir.path(),
            serde_json::json!({ "credHelpers": { src.host(): name } }),
            &format!("{}/acme/app:v1", src.host()),
            &format!("{}/mirror/app", dst.host()),
        );
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(&want), "{}", errors[0]);
        assert!(
            errors[0].contains(&format!("registry {}", src.host())),
            "{}",
            errors[0]
        );
    }
}

/// Runs `cmd` with `env`, asserting success.
#[track_caller]
fn sh(cmd: &str, args: &[&str], env: &[(&str, &Path)], stdin: Option<&str>) -> String {
    use std::io::Write as _;
    crate::support::require_tool(cmd);
    let mut c = Command::new(cmd);
    c.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn debians_docker_credential_pass_with_a_throwaway_gpg_key() {
    let src = Registry::basic("dave", "dave-secret").await;
    let dst = Registry::anonymous().await;
    let digest = pushed(&src).await;
    let (gnupg, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(gnupg.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let env = [
        ("GNUPGHOME", gnupg.path()),
        ("PASSWORD_STORE_DIR", store.path()),
    ];
    let gpg = |args: &[&str]| {
        let mut a = vec!["--batch", "--pinentry-mode", "loopback", "--passphrase", ""];
        a.extend(args);
        sh("gpg", &a, &env, None)
    };
    gpg(&[
        "--quick-gen-key",
        "mirror-mirror test <test@example.invalid>",
        "ed25519",
        "cert",
    ]);
    let listed = sh("gpg", &["--list-keys", "--with-colons"], &env, None);
    let fpr = listed
        .lines()
        .find_map(|l| {
            l.strip_prefix("fpr:")
                .map(|r| r.trim_matches(':').to_string())
        })
        .expect("a fingerprint");
    gpg(&["--quick-add-key", &fpr, "cv25519", "encr"]);
    sh("pass", &["init", &fpr], &env, None);
    let stored = format!(
        r#"{{"ServerURL":"{}","Username":"dave","Secret":"dave-secret"}}"#,
        src.host()
    );
    sh("docker-credential-pass", &["store"], &env, Some(&stored));

    let docker = tempfile::tempdir().unwrap();
    std::fs::write(
        docker.path().join("config.json"),
        serde_json::json!({ "credsStore": "pass" }).to_string(),
    )
    .unwrap();
    let out = Command::new(bin())
        .args([
            "copy",
            &format!("{}/acme/app:v1", src.host()),
            &format!("{}/mirror/app", dst.host()),
        ])
        .env("DOCKER_CONFIG", docker.path())
        .env_remove("REGISTRY_AUTH_FILE")
        .env("GNUPGHOME", gnupg.path())
        .env("PASSWORD_STORE_DIR", store.path())
        .output()
        .unwrap();
    // The agent gpg started for this home directory.
    let _ = Command::new("gpgconf")
        .args(["--kill", "gpg-agent"])
        .env("GNUPGHOME", gnupg.path())
        .status();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}/mirror/app@{digest}", dst.host())
    );
}
