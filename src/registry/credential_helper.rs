//! Docker credential helpers: `docker-credential-<name> get` with the registry's server URL on
//! stdin answers `{"ServerURL": …, "Username": …, "Secret": …}` on stdout (a `Username` of
//! `<token>` means the secret is an identity token). The protocol of
//! docker/docker-credential-helpers; `credsStore` and `credHelpers` in the Docker config name them.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;

use super::credentials::Credential;

/// How long a helper may take before it is stopped (a helper waiting on a locked keyring hangs).
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the helper answers.
#[derive(serde::Deserialize)]
struct Answer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// The server URL a helper is asked about for `registry` (what `docker login` stored it under).
pub fn server_url(registry: &str) -> String {
    if registry == "docker.io" {
        "https://index.docker.io/v1/".into()
    } else {
        registry.to_string()
    }
}

/// Asks helper `name` for `registry`'s credential: `Ok(None)` when it has none. The error is one
/// line naming the helper and what to do; it never holds a secret.
pub async fn get(
    name: &str,
    registry: &str,
    timeout: Duration,
) -> Result<Option<Credential>, String> {
    let program = format!("docker-credential-{name}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "the credential helper name {name:?} is not a plain name (the program run is docker-credential-<name>); fix credsStore / credHelpers"
        ));
    }
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "{program} is not installed or not on PATH; install it, or remove the credsStore / credHelpers entry"
            ),
            _ => format!("{program} could not be started: {e}"),
        })?;
    let url = server_url(registry);
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading its input still answers; ignore a broken pipe.
        let _ = stdin.write_all(url.as_bytes()).await;
        let _ = stdin.shutdown().await;
    }
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("{program} get failed: {e}")),
        Err(_) => {
            return Err(format!(
                "{program} get did not answer within {} s (a locked keyring?); unlock it or check the helper by hand: echo {url} | {program} get",
                timeout.as_secs()
            ));
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said = format!("{} {}", stdout.trim(), stderr.trim());
        if said.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        let first = said.trim().lines().next().unwrap_or("").chars().take(200);
        return Err(format!(
            "{program} get for {url} failed ({}): {}; check it by hand: echo {url} | {program} get",
            out.status,
            first.collect::<String>()
        ));
    }
    let answer: Answer = serde_json::from_str(stdout.trim()).map_err(|e| {
        format!(
            "{program} get for {url} answered something that is not the helper protocol's JSON ({e}); it must print {{\"ServerURL\", \"Username\", \"Secret\"}}"
        )
    })?;
    if answer.secret.is_empty() && answer.username.is_empty() {
        return Ok(None);
    }
    Ok(Some(if answer.username == "<token>" {
        Credential::IdentityToken {
            username: answer.username,
            token: answer.secret,
        }
    } else {
        Credential::Basic {
            username: answer.username,
            password: answer.secret,
        }
    }))
}
