//! skopeo, an independent client, checks what mirror-mirror wrote.

use std::path::Path;
use std::process::Command;

fn creds_args(cmd: &mut Command, flag: &str, creds: Option<(String, String)>) {
    match creds {
        Some((u, p)) => cmd.arg(format!("{flag}={u}:{p}")),
        // Never pick up a Docker config from the environment.
        None if flag == "--creds" => cmd.arg("--no-creds"),
        None => cmd.arg("--src-no-creds"),
    };
}

/// Runs skopeo off the async worker threads, so in-process servers keep answering meanwhile.
fn output(cmd: &mut Command) -> std::process::Output {
    tokio::task::block_in_place(|| cmd.output().expect("running skopeo"))
}

/// `skopeo inspect --raw`: the exact manifest bytes the registry serves.
#[track_caller]
pub fn inspect_raw(reference: &str, creds: Option<(String, String)>) -> Vec<u8> {
    super::require_tool("skopeo");
    let mut cmd = Command::new("skopeo");
    cmd.args(["inspect", "--raw", "--tls-verify=false"]);
    creds_args(&mut cmd, "--creds", creds);
    let out = output(cmd.arg(format!("docker://{reference}")));
    assert!(
        out.status.success(),
        "skopeo inspect --raw {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `skopeo copy --all docker://… oci:DIR`: succeeds only if every manifest and blob is there and
/// matches its digest.
#[track_caller]
pub fn copy_all_to_oci(reference: &str, dir: &Path, creds: Option<(String, String)>) {
    super::require_tool("skopeo");
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--all", "--quiet", "--src-tls-verify=false"]);
    creds_args(&mut cmd, "--src-creds", creds);
    let out = output(
        cmd.arg(format!("docker://{reference}"))
            .arg(format!("oci:{}", dir.display())),
    );
    assert!(
        out.status.success(),
        "skopeo copy --all {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
