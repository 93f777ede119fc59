//! HTTP clients per registry: one shared client for registries with nothing special, and one per
//! registry that has its own TLS (CAs added to the system roots, a client certificate), built
//! the first time the registry is reached and kept for the process. Also decides the scheme.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::error::{Error, Result};
use super::settings::Registries;
use super::tls::{CertsDirs, HostTls};
use crate::reference::is_loopback;

/// Makes a client builder with every setting but TLS (timeouts, resolver, redirects, proxies).
pub type Builder = Arc<dyn Fn() -> reqwest::ClientBuilder + Send + Sync>;

/// Where the TLS and transport settings of each registry come from.
#[derive(Clone, Default)]
pub struct TransportConfig {
    /// The certs.d base directories.
    pub certs: CertsDirs,
    /// The registries file.
    pub registries: Arc<Registries>,
    /// Registries named by `--insecure-registry`: plain HTTP.
    pub insecure: Vec<String>,
}

impl std::fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportConfig")
            .field("certs", &self.certs)
            .field("registries", &self.registries.iter().count())
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// The HTTP clients of one registry client.
pub struct Connections {
    builder: Builder,
    shared: reqwest::Client,
    config: TransportConfig,
    /// Registry → its TLS files and the client for them (the shared one when it has none).
    by_registry: Mutex<HashMap<String, (HostTls, reqwest::Client)>>,
}

impl Connections {
    /// Clients made by `builder`, with the TLS `config` says.
    pub fn new(builder: Builder, config: TransportConfig) -> Result<Connections> {
        let shared = builder().build().map_err(|e| Error::Network {
            context: "building the HTTP client".into(),
            source: e,
        })?;
        Ok(Connections {
            builder,
            shared,
            config,
            by_registry: Mutex::new(HashMap::new()),
        })
    }

    /// What the registries file says about `registry` (chunk size, body limit, layout, …).
    pub fn settings(&self, registry: &str) -> &super::settings::RegistrySettings {
        self.config.registries.get(registry)
    }

    /// The client for requests to `registry` (and its token server and redirects).
    pub fn for_registry(&self, registry: &str) -> Result<reqwest::Client> {
        if let Some((_, c)) = self
            .by_registry
            .lock()
            .expect("connections poisoned")
            .get(registry)
        {
            return Ok(c.clone());
        }
        let tls = self.tls_of(registry)?;
        let client = if tls.is_empty() {
            self.shared.clone()
        } else {
            let (cas, identity) = tls.load(registry)?;
            let mut b = (self.builder)().tls_certs_merge(cas);
            if let Some(id) = identity {
                b = b.identity(id);
            }
            let client = b.build().map_err(|e| Error::Network {
                context: format!("building the HTTP client for {registry}"),
                source: e,
            })?;
            tracing::info!(
                registry,
                ca_files = tls.ca_files.len(),
                client_certificate = tls.client.is_some(),
                "registry {registry}: TLS with {} extra CA file(s){}",
                tls.ca_files.len(),
                if tls.client.is_some() {
                    " and a client certificate"
                } else {
                    ""
                }
            );
            client
        };
        let mut map = self.by_registry.lock().expect("connections poisoned");
        Ok(map
            .entry(registry.to_string())
            .or_insert((tls, client))
            .1
            .clone())
    }

    /// `registry`'s TLS files: `ca_dir` and the certs.d directories, and the registries file's
    /// client certificate.
    fn tls_of(&self, registry: &str) -> Result<HostTls> {
        let settings = self.config.registries.get(registry);
        let mut tls = self.config.certs.find(registry, settings.ca_dir())?;
        if let Some((cert, key)) = settings.client_cert() {
            tls.client = Some((cert.to_path_buf(), key.to_path_buf()));
        }
        Ok(tls)
    }

    /// Whether `registry` has TLS files of its own (read once, then cached).
    fn has_tls_files(&self, registry: &str) -> bool {
        if self.for_registry(registry).is_err() {
            // Unusable files: HTTPS, so the request fails naming them.
            return true;
        }
        self.by_registry
            .lock()
            .expect("connections poisoned")
            .get(registry)
            .is_some_and(|(tls, _)| !tls.is_empty())
    }

    /// `http` or `https` for `registry`: the registries file's `insecure` decides; else a
    /// registry named by `--insecure-registry` is plain HTTP; else a registry with TLS files is
    /// HTTPS; else loopback registries are plain HTTP and every other is HTTPS.
    pub fn scheme(&self, registry: &str) -> &'static str {
        match self.config.registries.get(registry).insecure() {
            Some(true) => return "http",
            Some(false) => return "https",
            None => {}
        }
        if self
            .config
            .insecure
            .iter()
            .any(|h| h.eq_ignore_ascii_case(registry))
        {
            return "http";
        }
        if is_loopback(registry) && !self.has_tls_files(registry) {
            "http"
        } else {
            "https"
        }
    }

    /// An error sending to `registry`: a certificate that cannot be verified becomes
    /// [`Error::Tls`], saying where the registry's CA goes; others are [`Error::Network`].
    pub fn error(&self, registry: &str, context: String, e: reqwest::Error) -> Error {
        if super::tls::is_certificate_error(&e) {
            let reason = leaf(&e);
            let hint = match self.tls_of(registry) {
                Ok(t) if !t.ca_files.is_empty() => format!(
                    "the CA file(s) {} do not verify its certificate; replace them with the CA that signed it",
                    t.ca_files
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => self.config.certs.hint(registry),
            };
            return Error::Tls {
                registry: registry.to_string(),
                reason,
                hint,
            };
        }
        Error::Network { context, source: e }
    }
}

/// The innermost cause's message (`invalid peer certificate: UnknownIssuer`).
fn leaf(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_follows_the_file_then_the_flag_then_the_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs.d");
        std::fs::create_dir_all(certs.join("127.0.0.1:5443")).unwrap();
        std::fs::write(certs.join("127.0.0.1:5443").join("ca.crt"), "x").unwrap();
        let registries = super::super::settings::parse(
            "r.yaml",
            "plain.example:\n  insecure: true\n127.0.0.1:5000:\n  insecure: false\n",
            dir.path(),
        )
        .unwrap();
        let conn = Connections::new(
            Arc::new(reqwest::Client::builder),
            TransportConfig {
                certs: CertsDirs {
                    extra: None,
                    system: vec![certs],
                },
                registries: Arc::new(registries),
                insecure: vec!["Flagged.example".into()],
            },
        )
        .unwrap();
        assert_eq!(conn.scheme("plain.example"), "http");
        assert_eq!(conn.scheme("127.0.0.1:5000"), "https", "insecure: false");
        assert_eq!(
            conn.scheme("flagged.example"),
            "http",
            "--insecure-registry"
        );
        assert_eq!(conn.scheme("127.0.0.1:5443"), "https", "has a CA file");
        assert_eq!(conn.scheme("127.0.0.1:6000"), "http", "loopback");
        assert_eq!(conn.scheme("ghcr.io"), "https");
    }
}
