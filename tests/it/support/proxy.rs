//! A real HTTP proxy (tinyproxy, from Debian) on a free loopback port, logging every request, so
//! tests can tell which requests went through it. Stopped by pid when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running tinyproxy.
pub struct Proxy {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Proxy {
    /// Starts tinyproxy, allowing loopback clients to reach any port.
    pub async fn start() -> Proxy {
        super::require_tool("tinyproxy");
        let dir = tempfile::tempdir().unwrap();
        let mut last = String::new();
        for _ in 0..5 {
            let port = super::free_port();
            let log = dir.path().join("tinyproxy.log");
            let _ = std::fs::remove_file(&log);
            let config = dir.path().join("tinyproxy.conf");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 100\nAllow 127.0.0.1\nDisableViaHeader Yes\n",
                    log.display()
                ),
            )
            .unwrap();
            let mut child = Command::new("tinyproxy")
                .arg("-d")
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting tinyproxy (run scripts/test.sh, which installs it)");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!(
                        "exited with {status}: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                    && std::fs::read_to_string(&log).is_ok_and(|l| {
                        l.contains("Reloading config file finished") || l.contains("Connect")
                    })
                {
                    return Proxy { child, dir, port };
                }
                if Instant::now() > deadline {
                    last = "no answer within 10 s".into();
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        panic!("tinyproxy did not start: {last}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The request lines the proxy logged (`GET http://… HTTP/1.1`, `CONNECT host:port HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                l.split_once("): ")
                    .filter(|_| l.contains("Request (file descriptor"))
                    .map(|(_, r)| r.to_string())
            })
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
