//! The test harness: real CNCF distribution registries on loopback ports (anonymous, htpasswd,
//! bearer token with an in-process token issuer), an image pusher independent of the code under
//! test, and skopeo as an independent client.

pub mod front;
pub mod image;
pub mod nginx;
pub mod podman;
pub mod postgres;
pub mod prom;
pub mod proxy;
pub mod registry;
pub mod replicas;
pub mod service;
pub mod skopeo;
pub mod tls;
pub mod token;

pub use image::Pusher;
pub use registry::Registry;
pub use token::TokenIssuer;

use std::path::Path;

/// The `mirror-mirror` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mirror-mirror")
}

/// Serves `app` in-process on a free port of `ip` (a loopback address); returns `ip:PORT`.
pub async fn serve(app: axum::Router, ip: &str) -> String {
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A free loopback port for a server a test starts in another process (a registry, nginx,
/// PostgreSQL, `serve`). Ports are taken below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), from which outgoing connections take their source ports:
/// a port the kernel handed out with a bind to `:0` and that was let go again could be taken by
/// one of the suite's many connections before the server bound it ("Address already in use").
/// Each port is handed out once per test process, and only if it binds now.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768)
        .clamp(4096, 65535);
    // [low / 2, low): 16384 ports with the usual range; where a run starts in it depends on
    // the process, so two test processes at once rarely meet.
    let span = low - low / 2;
    let offset = std::process::id() * 997 % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low / 2 + (offset + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below {low}");
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Writes a Docker `config.json` with basic credentials for `hosts` into `dir`.
pub fn write_docker_config(dir: &Path, creds: &[(&str, &str, &str)]) {
    use base64::Engine as _;
    let auths: serde_json::Map<String, serde_json::Value> = creds
        .iter()
        .map(|(host, user, pass)| {
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            (host.to_string(), serde_json::json!({ "auth": auth }))
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&serde_json::json!({ "auths": auths })).unwrap(),
    )
    .unwrap();
}

/// Panics with the install hint when a tool the tests need is missing: tests fail, never skip.
#[track_caller]
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed; run scripts/test.sh, which installs docker-registry, skopeo, apache2-utils and openssl"
    );
}
