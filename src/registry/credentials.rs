//! Registry credentials from `REGISTRY_AUTH_FILE` (containers-auth.json) and the Docker config
//! (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// A stored credential for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Username and password (HTTP basic, or sent to the token server).
    Basic { username: String, password: String },
    /// Docker's `identitytoken`: an OAuth2 refresh token for the token server.
    IdentityToken { username: String, token: String },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credential::IdentityToken { username, .. } => {
                write!(f, "IdentityToken({username}, ***)")
            }
        }
    }
}

/// Why the credential files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file exists but cannot be read.
    #[error("cannot read the credentials file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not the JSON we expect.
    #[error("the credentials file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// Credentials by normalised registry name (`docker.io` for Docker Hub).
#[derive(Debug, Clone, Default)]
pub struct CredentialStore {
    by_registry: HashMap<String, Credential>,
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://host:5000/path` → `host:5000`.
fn normalise_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        _ => host,
    }
}

impl CredentialStore {
    /// No credentials.
    pub fn empty() -> Self {
        CredentialStore::default()
    }

    /// Loads `REGISTRY_AUTH_FILE`, then the Docker config; earlier files win for the same registry.
    /// Missing files are fine; unreadable or malformed ones are an error naming the file.
    pub fn load() -> Result<Self, CredentialsError> {
        let mut files = Vec::new();
        if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
            files.push(PathBuf::from(p));
        }
        if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
            files.push(PathBuf::from(d).join("config.json"));
        } else if let Some(h) = std::env::var_os("HOME") {
            files.push(PathBuf::from(h).join(".docker").join("config.json"));
        }
        CredentialStore::from_files(&files)
    }

    /// Loads the given files in order of precedence.
    pub fn from_files(files: &[PathBuf]) -> Result<Self, CredentialsError> {
        let mut store = CredentialStore::empty();
        for path in files {
            match std::fs::read_to_string(path) {
                Ok(text) => store.merge_json(path, &text)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CredentialsError::Read {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(store)
    }

    /// Parses one file's JSON (for tests and programmatic use).
    pub fn from_json(text: &str) -> Result<Self, CredentialsError> {
        let mut store = CredentialStore::empty();
        store.merge_json(Path::new("<json>"), text)?;
        Ok(store)
    }

    fn merge_json(&mut self, path: &Path, text: &str) -> Result<(), CredentialsError> {
        let invalid = |reason: String| CredentialsError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let file: ConfigFile = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for (key, entry) in file.auths {
            let registry = normalise_key(&key);
            let (mut username, mut password) = (entry.username, entry.password);
            if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| invalid(format!("auths.{key:?}.auth is not base64: {e}")))?;
                let raw = String::from_utf8(raw)
                    .map_err(|_| invalid(format!("auths.{key:?}.auth is not UTF-8")))?;
                let (u, p) = raw.split_once(':').ok_or_else(|| {
                    invalid(format!(
                        "auths.{key:?}.auth does not decode to user:password"
                    ))
                })?;
                username = Some(u.to_string());
                password = Some(p.to_string());
            }
            let credential = match (
                entry.identitytoken.filter(|t| !t.is_empty()),
                username,
                password,
            ) {
                (Some(token), u, _) => Credential::IdentityToken {
                    username: u.unwrap_or_else(|| "<token>".into()),
                    token,
                },
                (None, Some(username), Some(password)) => Credential::Basic { username, password },
                _ => continue,
            };
            self.by_registry.entry(registry).or_insert(credential);
        }
        for host in file.cred_helpers.keys() {
            tracing::warn!(
                "{}: credential helpers are not supported (credHelpers for {host}); put the credentials in auths or REGISTRY_AUTH_FILE",
                path.display()
            );
        }
        if let Some(store) = file.creds_store {
            tracing::debug!(
                "{}: credsStore {store:?} is not used; only auths entries are read",
                path.display()
            );
        }
        Ok(())
    }

    /// The credential for `registry` (normalised, `docker.io` for Docker Hub).
    pub fn get(&self, registry: &str) -> Option<&Credential> {
        self.by_registry.get(&normalise_key(registry))
    }

    /// Adds or replaces a credential.
    pub fn insert(&mut self, registry: &str, credential: Credential) {
        self.by_registry.insert(normalise_key(registry), credential);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn reads_every_entry_format() {
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "127.0.0.1:5000": {{"username": "u", "password": "p"}},
                "http://ghcr.io/some/path": {{"auth": "{}", "identitytoken": "refresh"}},
                "empty.io": {{}}
            }}, "credHelpers": {{"gcr.io": "gcloud"}}}}"#,
            b64("hub:pa:ss"),
            b64("ghuser:x")
        );
        let s = CredentialStore::from_json(&json).unwrap();
        assert_eq!(
            s.get("docker.io"),
            Some(&Credential::Basic {
                username: "hub".into(),
                password: "pa:ss".into()
            })
        );
        assert_eq!(s.get("registry-1.docker.io"), s.get("docker.io"));
        assert_eq!(
            s.get("127.0.0.1:5000"),
            Some(&Credential::Basic {
                username: "u".into(),
                password: "p".into()
            })
        );
        assert_eq!(
            s.get("ghcr.io"),
            Some(&Credential::IdentityToken {
                username: "ghuser".into(),
                token: "refresh".into()
            })
        );
        assert_eq!(s.get("empty.io"), None);
        assert_eq!(
            format!("{:?}", s.get("docker.io").unwrap()),
            "Basic(hub, ***)"
        );
    }

    #[test]
    fn earlier_files_win_and_missing_files_are_fine() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("auth.json");
        let second = dir.path().join("config.json");
        std::fs::write(
            &first,
            format!(r#"{{"auths":{{"r.io":{{"auth":"{}"}}}}}}"#, b64("a:1")),
        )
        .unwrap();
        std::fs::write(
            &second,
            format!(
                r#"{{"auths":{{"r.io":{{"auth":"{}"}},"s.io":{{"auth":"{}"}}}}}}"#,
                b64("b:2"),
                b64("c:3")
            ),
        )
        .unwrap();
        let s =
            CredentialStore::from_files(&[first, dir.path().join("missing.json"), second]).unwrap();
        assert_eq!(
            s.get("r.io"),
            Some(&Credential::Basic {
                username: "a".into(),
                password: "1".into()
            })
        );
        assert!(s.get("s.io").is_some());
    }

    #[test]
    fn malformed_files_are_errors_naming_the_problem() {
        let e = CredentialStore::from_json(r#"{"auths":{"r.io":{"auth":"%%%"}}}"#).unwrap_err();
        assert!(e.to_string().contains("not base64"), "{e}");
        let e = CredentialStore::from_json(&format!(
            r#"{{"auths":{{"r.io":{{"auth":"{}"}}}}}}"#,
            b64("nocolon")
        ))
        .unwrap_err();
        assert!(e.to_string().contains("user:password"), "{e}");
        assert!(CredentialStore::from_json("not json").is_err());
    }
}
