//! Real CNCF distribution registries (`docker-registry serve`) on free loopback ports, each with its
//! own config and storage, stopped by pid when dropped.

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::token::TokenIssuer;

/// How a registry authenticates.
#[derive(Clone)]
pub enum Auth {
    Anonymous,
    /// htpasswd basic auth with this user.
    Basic {
        user: String,
        pass: String,
    },
    /// Bearer tokens from `issuer`.
    Token {
        issuer: TokenIssuer,
    },
}

/// A running registry.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    pub auth: Auth,
    /// Serving HTTPS with this PKI's server certificate (and requiring its client certificate
    /// when `mtls`).
    pub tls: Option<(super::tls::Pki, bool)>,
}

impl Registry {
    /// An anonymous registry.
    pub async fn anonymous() -> Registry {
        Registry::start(Auth::Anonymous).await
    }

    /// A registry with htpasswd basic auth for `user`/`pass`.
    pub async fn basic(user: &str, pass: &str) -> Registry {
        Registry::start(Auth::Basic {
            user: user.into(),
            pass: pass.into(),
        })
        .await
    }

    /// A registry that trusts tokens from `issuer`.
    pub async fn token(issuer: &TokenIssuer) -> Registry {
        Registry::start(Auth::Token {
            issuer: issuer.clone(),
        })
        .await
    }

    /// An anonymous registry serving HTTPS with `pki`'s server certificate; with `mtls`, it also
    /// requires a client certificate signed by `pki`'s client CA (`http.tls.clientcas`).
    pub async fn tls(pki: &super::tls::Pki, mtls: bool) -> Registry {
        Registry::start_with(Auth::Anonymous, Some((pki.clone(), mtls))).await
    }

    #[track_caller]
    fn config(
        dir: &std::path::Path,
        port: u16,
        auth: &Auth,
        tls: Option<&(super::tls::Pki, bool)>,
    ) -> String {
        let auth_yaml = match auth {
            Auth::Anonymous => String::new(),
            Auth::Basic { user, pass } => {
                super::require_tool("htpasswd");
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, pass])
                    .output()
                    .expect("running htpasswd");
                assert!(
                    out.status.success(),
                    "htpasswd failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let path = dir.join("htpasswd");
                std::fs::write(&path, out.stdout).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: mirror-mirror-test\n    path: {}\n",
                    path.display()
                )
            }
            Auth::Token { issuer } => format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                issuer.realm(),
                issuer.service(),
                issuer.issuer(),
                issuer.cert_path().display()
            ),
        };
        let tls_yaml = match tls {
            None => String::new(),
            Some((pki, mtls)) => {
                let (cert, key) = pki.server();
                let mut y = format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    cert.display(),
                    key.display()
                );
                if *mtls {
                    y.push_str(&format!(
                        "    clientcas:\n      - {}\n",
                        pki.client_ca().display()
                    ));
                }
                y
            }
        };
        format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: mirror-mirror-test-secret\n{tls_yaml}{auth_yaml}",
            dir.join("storage").display()
        )
    }

    async fn start(auth: Auth) -> Registry {
        Registry::start_with(auth, None).await
    }

    async fn start_with(auth: Auth, tls: Option<(super::tls::Pki, bool)>) -> Registry {
        super::require_tool("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("registry.log");
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                Registry::config(dir.path(), port, &auth, tls.as_ref()),
            )
            .unwrap();
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .expect("starting docker-registry (run scripts/test.sh, which installs it)");
            match wait_ready(&mut child, port, &log_path).await {
                Ok(()) => {
                    return Registry {
                        child,
                        dir,
                        port,
                        auth,
                        tls,
                    };
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if !e.contains("address already in use") {
                        panic!("docker-registry did not start on 127.0.0.1:{port}: {e}");
                    }
                    last = e;
                }
            }
        }
        panic!("docker-registry found no free port: {last}");
    }

    /// The whole access log, to count requests.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` (`https://` when serving TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    /// An HTTP client for the harness's own requests (trusting the test CA when serving TLS).
    pub fn http(&self) -> reqwest::Client {
        match &self.tls {
            Some((pki, _)) => pki.http(),
            None => reqwest::Client::new(),
        }
    }

    /// User and password for basic or token registries.
    pub fn creds(&self) -> Option<(String, String)> {
        match &self.auth {
            Auth::Anonymous => None,
            Auth::Basic { user, pass } => Some((user.clone(), pass.clone())),
            Auth::Token { issuer } => Some(issuer.creds()),
        }
    }
}

fn log_tail(path: &std::path::Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

async fn wait_ready(child: &mut Child, port: u16, log: &std::path::Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = reqwest::Client::new();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("it exited with {status}; log:\n{}", log_tail(log)));
        }
        // Our process must say it listens on this port: in a free-port race, another test's
        // registry could answer the probe.
        let ours = std::fs::read_to_string(log)
            .is_ok_and(|l| l.contains(&format!("listening on 127.0.0.1:{port}")));
        if ours
            && let Ok(r) = client
                .get(format!("http://127.0.0.1:{port}/v2/"))
                .send()
                .await
            // A TLS port answers plain HTTP with 400.
            && (r.status() == 200 || r.status() == 401 || r.status() == 400)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no answer on /v2/ within 20 s; log:\n{}",
                log_tail(log)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
