//! TLS per registry, the way Docker and containers do it: a directory per `HOST[:PORT]` holding
//! `*.crt` files (CAs, added to the system roots, never replacing them) and a `NAME.cert` +
//! `NAME.key` pair (a client certificate for mutual TLS). The directories looked in, in order:
//! the registries file's `ca_dir` for the host, `MIRROR_CERTS_DIR/HOST[:PORT]/` (a mounted
//! Kubernetes Secret), then `/etc/docker/certs.d/HOST[:PORT]/` and
//! `/etc/containers/certs.d/HOST[:PORT]/` (`MIRROR_SYSTEM_CERTS_DIRS` replaces those two).

use std::path::{Path, PathBuf};

/// Where Docker and containers keep per-registry certificates.
pub const SYSTEM_CERTS_DIRS: &str = "/etc/docker/certs.d,/etc/containers/certs.d";

/// A problem with a registry's certificate files: names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file or directory that exists could not be read.
    #[error("registry {registry}: cannot read {}: {reason}; make it readable by this user", .path.display())]
    Read {
        registry: String,
        path: PathBuf,
        reason: String,
    },
    /// A `.crt` file holds no PEM certificate, or a bad one.
    #[error("registry {registry}: {} is not a PEM CA certificate ({reason}); put the registry's CA certificate there in PEM form", .path.display())]
    BadCa {
        registry: String,
        path: PathBuf,
        reason: String,
    },
    /// A client certificate without its key, or the other way round.
    #[error("registry {registry}: {} has no matching {}; a client certificate needs both NAME.cert and NAME.key", .have.display(), .missing.display())]
    Unpaired {
        registry: String,
        have: PathBuf,
        missing: PathBuf,
    },
    /// The client certificate and key do not make an identity.
    #[error("registry {registry}: the client certificate {} with key {} cannot be used ({reason}); both must be PEM (the key PKCS#8, PKCS#1 or SEC1)", .cert.display(), .key.display())]
    BadIdentity {
        registry: String,
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The certificate directories of every registry: the bases holding `HOST[:PORT]/` directories.
#[derive(Debug, Clone)]
pub struct CertsDirs {
    /// `MIRROR_CERTS_DIR`: looked in first.
    pub extra: Option<PathBuf>,
    /// `/etc/docker/certs.d`, `/etc/containers/certs.d` (or `MIRROR_SYSTEM_CERTS_DIRS`).
    pub system: Vec<PathBuf>,
}

impl Default for CertsDirs {
    fn default() -> Self {
        CertsDirs {
            extra: None,
            system: SYSTEM_CERTS_DIRS.split(',').map(PathBuf::from).collect(),
        }
    }
}

/// What one registry's TLS adds to the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostTls {
    /// CA files (`*.crt`), in the order found; added to the system roots.
    pub ca_files: Vec<PathBuf>,
    /// The client certificate and its key, for mutual TLS: the first pair found.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl HostTls {
    /// Whether nothing is added (the shared default client serves the registry).
    pub fn is_empty(&self) -> bool {
        self.ca_files.is_empty() && self.client.is_none()
    }

    /// Reads the files into what the HTTP client takes.
    pub fn load(
        &self,
        registry: &str,
    ) -> Result<(Vec<reqwest::Certificate>, Option<reqwest::Identity>), TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| TlsError::Read {
                registry: registry.to_string(),
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        };
        let mut cas = Vec::new();
        for path in &self.ca_files {
            let bad = |reason: String| TlsError::BadCa {
                registry: registry.to_string(),
                path: path.clone(),
                reason,
            };
            let certs = reqwest::Certificate::from_pem_bundle(&read(path)?)
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no BEGIN CERTIFICATE block".into()));
            }
            cas.extend(certs);
        }
        let identity = match &self.client {
            None => None,
            Some((cert, key)) => {
                let mut pem = read(cert)?;
                pem.push(b'\n');
                pem.extend(read(key)?);
                Some(
                    reqwest::Identity::from_pem(&pem).map_err(|e| TlsError::BadIdentity {
                        registry: registry.to_string(),
                        cert: cert.clone(),
                        key: key.clone(),
                        reason: super::error::causes(&e),
                    })?,
                )
            }
        };
        Ok((cas, identity))
    }
}

impl CertsDirs {
    /// The directories for `registry` (`host` or `host:port`), most specific first: `ca_dir`
    /// (from the registries file), then `MIRROR_CERTS_DIR/HOST`, then the system ones.
    pub fn dirs_for(&self, registry: &str, ca_dir: Option<&Path>) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = ca_dir.map(Path::to_path_buf).into_iter().collect();
        out.extend(self.extra.iter().map(|d| d.join(registry)));
        out.extend(self.system.iter().map(|d| d.join(registry)));
        out
    }

    /// Finds `registry`'s CA files and client certificate. Missing directories are fine; a file
    /// that cannot be read, or a certificate without its key, is an error naming it.
    pub fn find(&self, registry: &str, ca_dir: Option<&Path>) -> Result<HostTls, TlsError> {
        let mut tls = HostTls::default();
        for dir in self.dirs_for(registry, ca_dir) {
            scan_dir(registry, &dir, &mut tls)?;
        }
        Ok(tls)
    }

    /// Where `registry`'s CA can go, for error messages.
    pub fn hint(&self, registry: &str) -> String {
        let mut places: Vec<String> = Vec::new();
        if let Some(extra) = &self.extra {
            places.push(format!("{}/", extra.join(registry).display()));
        }
        places.extend(
            self.system
                .iter()
                .map(|d| format!("{}/", d.join(registry).display())),
        );
        let places = match places.len() {
            0 => "a directory named by MIRROR_CERTS_DIR".to_string(),
            1 => places.remove(0),
            _ => {
                let last = places.pop().unwrap_or_default();
                format!("{} or {last}", places.join(", "))
            }
        };
        format!(
            "put the CA that signed {registry}'s certificate in {places} as ca.crt (PEM), or name a ca_dir for {registry} in MIRROR_REGISTRIES_FILE"
        )
    }
}

/// Adds what `dir` holds to `tls`, as Docker reads a `certs.d/HOST` directory.
fn scan_dir(registry: &str, dir: &Path, tls: &mut HostTls) -> Result<(), TlsError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        // A file where a directory was expected, or one we may not list: say so.
        Err(e) => {
            return Err(TlsError::Read {
                registry: registry.to_string(),
                path: dir.to_path_buf(),
                reason: e.to_string(),
            });
        }
    };
    let mut names: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            // Kubernetes Secret volumes hold `..data` links and dot-directories: skip them.
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    names.sort();
    for path in &names {
        match path.extension().and_then(|e| e.to_str()) {
            Some("crt") => tls.ca_files.push(path.clone()),
            Some("cert") => {
                let key = path.with_extension("key");
                if !key.exists() {
                    return Err(TlsError::Unpaired {
                        registry: registry.to_string(),
                        have: path.clone(),
                        missing: key,
                    });
                }
                if tls.client.is_none() {
                    tls.client = Some((path.clone(), key));
                }
            }
            Some("key") => {
                let cert = path.with_extension("cert");
                if !cert.exists() {
                    return Err(TlsError::Unpaired {
                        registry: registry.to_string(),
                        have: path.clone(),
                        missing: cert,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `err`, anywhere in its chain, is a failure to verify the server's certificate.
pub fn is_certificate_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
            return true;
        }
        // The verifier's error may reach us re-wrapped; its message is rustls's.
        if e.to_string().starts_with("invalid peer certificate") {
            return true;
        }
        // hyper-rustls wraps the rustls error in an io::Error.
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(rustls::Error::InvalidCertificate(_)) =
                inner.downcast_ref::<rustls::Error>()
        {
            return true;
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_certs_d_like_docker() {
        let root = tempfile::tempdir().unwrap();
        let host = root.path().join("reg.example:5000");
        std::fs::create_dir_all(&host).unwrap();
        for f in ["ca.crt", "b.crt", "client.cert", "client.key", "README"] {
            std::fs::write(host.join(f), "x").unwrap();
        }
        let dirs = CertsDirs {
            extra: None,
            system: vec![root.path().to_path_buf()],
        };
        let tls = dirs.find("reg.example:5000", None).unwrap();
        assert_eq!(tls.ca_files, vec![host.join("b.crt"), host.join("ca.crt")]);
        assert_eq!(
            tls.client,
            Some((host.join("client.cert"), host.join("client.key")))
        );
        assert!(dirs.find("other:5000", None).unwrap().is_empty());

        std::fs::remove_file(host.join("client.key")).unwrap();
        let e = dirs.find("reg.example:5000", None).unwrap_err().to_string();
        assert!(
            e.contains("client.cert has no matching") && e.contains("client.key"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_ca_file_is_named() {
        let root = tempfile::tempdir().unwrap();
        let f = root.path().join("ca.crt");
        std::fs::write(&f, "not a certificate").unwrap();
        let tls = HostTls {
            ca_files: vec![f.clone()],
            client: None,
        };
        let e = tls.load("reg.example").unwrap_err().to_string();
        assert!(
            e.contains(&f.display().to_string()) && e.contains("not a PEM CA"),
            "{e}"
        );
    }

    #[test]
    fn the_hint_names_every_place() {
        let dirs = CertsDirs {
            extra: Some("/secrets/certs".into()),
            ..CertsDirs::default()
        };
        let h = dirs.hint("reg.example:5000");
        assert!(h.contains("/secrets/certs/reg.example:5000/"), "{h}");
        assert!(h.contains("/etc/docker/certs.d/reg.example:5000/"), "{h}");
        assert!(
            h.contains("/etc/containers/certs.d/reg.example:5000/"),
            "{h}"
        );
    }
}
