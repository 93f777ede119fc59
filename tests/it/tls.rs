//! TLS the way Docker and containers do it, against real distribution registries serving HTTPS
//! with a CA the test makes: CAs from certs.d directories (the /etc ones replaced by temporary
//! ones through `MIRROR_SYSTEM_CERTS_DIRS`), `MIRROR_CERTS_DIR`, and the registries file; client
//! certificates for registries that require them (`http.tls.clientcas`); and the one-line error
//! when a registry's CA is unknown. skopeo, reading the same certs.d layout, checks the results.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::image::{Style, TestImage};
use crate::support::tls::Pki;
use crate::support::{Pusher, Registry, bin, sha256};

/// Runs the CLI with an empty Docker config and `env`.
fn run(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let empty = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env("DOCKER_CONFIG", empty.path())
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("MIRROR_CERTS_DIR")
        .env_remove("MIRROR_REGISTRIES_FILE")
        .env("MIRROR_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running mirror-mirror")
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "copy failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn image(reg: &Registry, repo: &str) -> TestImage {
    let p = Pusher::new(reg);
    let img = p
        .image(repo, 7, &[40_000, 3_000], false, Style::Compact)
        .await;
    p.manifest(repo, "v1", &img.media_type, &img.bytes).await;
    img
}

/// The target serves `repo:v1` with exactly the image's bytes.
async fn assert_on(reg: &Registry, repo: &str, img: &TestImage) {
    let (bytes, _, _) = Pusher::new(reg)
        .get_manifest(repo, "v1")
        .await
        .expect("manifest on the target");
    assert_eq!(sha256(&bytes), img.digest);
}

/// `skopeo inspect --raw` with `--cert-dir` (skopeo reads a certs.d/HOST directory the same way).
fn skopeo_inspect(reference: &str, cert_dir: Option<&Path>) -> Output {
    crate::support::require_tool("skopeo");
    let mut cmd = Command::new("skopeo");
    cmd.args(["inspect", "--raw", "--no-creds"]);
    if let Some(d) = cert_dir {
        cmd.arg(format!("--cert-dir={}", d.display()));
    }
    tokio::task::block_in_place(|| {
        cmd.arg(format!("docker://{reference}"))
            .output()
            .expect("running skopeo")
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_ca_in_certs_d_is_trusted_per_registry() {
    // Two HTTPS registries with different CAs: one found in a containers-style certs.d, the
    // other in MIRROR_CERTS_DIR (a mounted Secret): each CA serves its own registry in one run.
    let (pki_src, pki_dst) = (Pki::new(), Pki::new());
    let src = Registry::tls(&pki_src, false).await;
    let dst = Registry::tls(&pki_dst, false).await;
    let img = image(&src, "acme/app").await;
    let dirs = tempfile::tempdir().unwrap();
    let (docker_d, containers_d, secret) = (
        dirs.path().join("docker-certs.d"),
        dirs.path().join("containers-certs.d"),
        dirs.path().join("secret"),
    );
    pki_src.certs_d(&containers_d, &src.host(), false);
    pki_dst.certs_d(&secret, &dst.host(), false);
    let system = format!("{},{}", docker_d.display(), containers_d.display());
    let out = run(
        &[
            "copy",
            &format!("{}/acme/app:v1", src.host()),
            &format!("{}/mirror/app", dst.host()),
        ],
        &[
            ("MIRROR_SYSTEM_CERTS_DIRS", Path::new(&system)),
            ("MIRROR_CERTS_DIR", &secret),
        ],
    );
    assert_eq!(
        ok(&out),
        format!("{}/mirror/app@{}", dst.host(), img.digest)
    );
    assert_on(&dst, "mirror/app", &img).await;
    // skopeo, with the same directory, sees the same digest on the target.
    let seen = skopeo_inspect(
        &format!("{}/mirror/app:v1", dst.host()),
        Some(&secret.join(dst.host())),
    );
    assert!(
        seen.status.success(),
        "{}",
        String::from_utf8_lossy(&seen.stderr)
    );
    assert_eq!(sha256(&seen.stdout), img.digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_ca_fails_at_once_in_one_line_naming_the_host_and_where_its_ca_goes() {
    let pki = Pki::new();
    let src = Registry::tls(&pki, false).await;
    let dst = Registry::anonymous().await;
    image(&src, "acme/app").await;
    let dirs = tempfile::tempdir().unwrap();
    let certs_d = dirs.path().join("certs.d");
    // HTTPS on a loopback registry, which otherwise is plain HTTP.
    let file = dirs.path().join("registries.yaml");
    std::fs::write(&file, format!("{}:\n  insecure: false\n", src.host())).unwrap();
    let started = std::time::Instant::now();
    let out = run(
        &[
            "copy",
            &format!("{}/acme/app:v1", src.host()),
            &format!("{}/mirror/app", dst.host()),
        ],
        &[
            ("MIRROR_SYSTEM_CERTS_DIRS", &certs_d),
            ("MIRROR_REGISTRIES_FILE", &file),
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let e = errors[0];
    println!("{e}\nfailed after {:?}", started.elapsed());
    let host = src.host();
    assert!(e.contains(&format!("TLS to {host} failed")), "{e}");
    assert!(e.contains("UnknownIssuer"), "{e}");
    assert!(
        e.contains(&format!("{}/{host}/", certs_d.display())),
        "the hint names where the CA goes: {e}"
    );
    assert!(
        e.matches("https://").count() <= 1,
        "the URL at most once: {e}"
    );
    assert_eq!(e.matches("UnknownIssuer").count(), 1, "the cause once: {e}");
    assert!(
        !stderr.contains("retrying"),
        "a certificate that cannot be verified is not retried: {stderr}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_requires_a_client_certificate_gets_the_one_in_certs_d() {
    let pki = Pki::new();
    let src = Registry::tls(&pki, true).await;
    let dst = Registry::anonymous().await;
    let img = image(&src, "acme/app").await;
    let dirs = tempfile::tempdir().unwrap();
    let reference = format!("{}/acme/app:v1", src.host());
    let target = format!("{}/mirror/app", dst.host());

    // The CA alone is not enough: the registry refuses the handshake (skopeo agrees).
    let ca_only = dirs.path().join("ca-only");
    let dir = pki.certs_d(&ca_only, &src.host(), false);
    let out = run(
        &["copy", &reference, &target],
        &[("MIRROR_SYSTEM_CERTS_DIRS", &ca_only)],
    );
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!skopeo_inspect(&reference, Some(&dir)).status.success());

    // With client.cert + client.key beside ca.crt, as Docker lays them out.
    let full = dirs.path().join("full");
    let dir = pki.certs_d(&full, &src.host(), true);
    let out = run(
        &["copy", &reference, &target],
        &[("MIRROR_SYSTEM_CERTS_DIRS", &full)],
    );
    assert_eq!(ok(&out), format!("{target}@{}", img.digest));
    assert_on(&dst, "mirror/app", &img).await;
    let seen = skopeo_inspect(&reference, Some(&dir));
    assert!(
        seen.status.success(),
        "{}",
        String::from_utf8_lossy(&seen.stderr)
    );
    assert_eq!(sha256(&seen.stdout), img.digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_registries_file_names_a_ca_dir_and_a_client_certificate() {
    let pki = Pki::new();
    let dst = Registry::tls(&pki, true).await;
    let src = Registry::anonymous().await;
    let img = image(&src, "acme/app").await;
    let dirs = tempfile::tempdir().unwrap();
    let ca_dir = dirs.path().join("ca");
    std::fs::create_dir(&ca_dir).unwrap();
    std::fs::copy(pki.ca(), ca_dir.join("internal-ca.crt")).unwrap();
    let (cert, key) = pki.client();
    let file = dirs.path().join("registries.yaml");
    std::fs::write(
        &file,
        format!(
            "# the target\n{}:\n  ca_dir: ca\n  client_cert: {}\n  client_key: {}\n",
            dst.host(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let empty = dirs.path().join("no-certs.d");
    let out = run(
        &[
            "copy",
            &format!("{}/acme/app:v1", src.host()),
            &format!("{}/mirror/app", dst.host()),
        ],
        &[
            ("MIRROR_SYSTEM_CERTS_DIRS", &empty),
            ("MIRROR_REGISTRIES_FILE", &file),
        ],
    );
    assert_eq!(
        ok(&out),
        format!("{}/mirror/app@{}", dst.host(), img.digest)
    );
    assert_on(&dst, "mirror/app", &img).await;

    // A mistake in the file stops the copy before any request, naming the file and line.
    std::fs::write(
        &file,
        format!("{}:\n  ca_dir: ca\n  client_crt: x\n", dst.host()),
    )
    .unwrap();
    let out = run(
        &["copy", "a.example/x:1", "b.example/y"],
        &[("MIRROR_REGISTRIES_FILE", &file)],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:3: {}: unknown key \"client_crt\"; the keys are: ca_dir, client_cert",
            file.display(),
            dst.host()
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_trusts_a_ca_mounted_like_a_kubernetes_secret() {
    let pki = Pki::new();
    let src = Registry::tls(&pki, true).await;
    let dst = Registry::anonymous().await;
    let img = image(&src, "acme/app").await;
    // A Secret volume: the keys are symlinks into a timestamped directory behind `..data`.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("certs");
    let host_dir = secret.join(src.host());
    let stamped = host_dir.join("..2026_12_01_07_00_00.000000001");
    std::fs::create_dir_all(&stamped).unwrap();
    std::fs::copy(pki.ca(), stamped.join("ca.crt")).unwrap();
    let (c, k) = pki.client();
    std::fs::copy(c, stamped.join("client.cert")).unwrap();
    std::fs::copy(k, stamped.join("client.key")).unwrap();
    std::os::unix::fs::symlink(stamped.file_name().unwrap(), host_dir.join("..data")).unwrap();
    for f in ["ca.crt", "client.cert", "client.key"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), host_dir.join(f)).unwrap();
    }
    let svc = crate::support::service::Service::start(
        &dir.path().join("m.db"),
        &format!("{}/mirror", dst.host()),
        &src.host(),
        &[
            ("MIRROR_CERTS_DIR", &secret.display().to_string()),
            (
                "MIRROR_SYSTEM_CERTS_DIRS",
                &dir.path().join("none").display().to_string(),
            ),
        ],
    )
    .await;
    let (status, job) = svc
        .mirror(&serde_json::json!({ "image": format!("{}/acme/app:v1", src.host()) }))
        .await;
    assert_eq!(status, 202, "{job}");
    let job = svc
        .wait_job(
            job["id"].as_i64().unwrap(),
            std::time::Duration::from_secs(60),
        )
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["mirror_digest"], img.digest.as_str());
    let mirror = format!("mirror/{}/acme/app", src.host().replace(':', "_"));
    assert_on(&dst, &mirror, &img).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registrys_own_cas_are_added_to_the_system_roots_not_put_in_their_place() {
    // The "system" roots are SSL_CERT_FILE here (the platform verifier reads it as the system
    // store does), holding the CA that signed the target's certificate. The target's certs.d
    // directory holds another, unrelated CA: with it added (not replacing), the target still
    // verifies through the system roots, as public registries do next to private ones.
    let (system, unrelated) = (Pki::new(), Pki::new());
    let dst = Registry::tls(&system, false).await;
    let src = Registry::anonymous().await;
    let img = image(&src, "acme/app").await;
    let dirs = tempfile::tempdir().unwrap();
    let certs_d = dirs.path().join("certs.d");
    unrelated.certs_d(&certs_d, &dst.host(), false);
    let args = [
        "copy".to_string(),
        format!("{}/acme/app:v1", src.host()),
        format!("{}/mirror/app", dst.host()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(
        &args,
        &[
            ("MIRROR_SYSTEM_CERTS_DIRS", &certs_d),
            ("SSL_CERT_FILE", &system.ca()),
        ],
    );
    assert_eq!(
        ok(&out),
        format!("{}/mirror/app@{}", dst.host(), img.digest)
    );
    assert_on(&dst, "mirror/app", &img).await;
    // Without the system root, the unrelated CA alone does not verify it: the test can fail.
    let out = run(&args, &[("MIRROR_SYSTEM_CERTS_DIRS", &certs_d)]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("UnknownIssuer") && stderr.contains("do not verify its certificate"),
        "{stderr}"
    );
}
