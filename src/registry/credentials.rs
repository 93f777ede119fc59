//! Registry credentials from the containers auth file (`$REGISTRY_AUTH_FILE`) and the Docker config
//! (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`), looked up by normalised registry
//! host (`docker.io` for Docker Hub).
//!
//! `auths` entries are read at load time. A registry named in `credHelpers`, or any registry
//! without an `auths` entry when `credsStore` is set, gets its credential from that credential
//! helper (`docker-credential-<name> get`, see [`super::credential_helper`]) the first time it
//! is needed, cached for the process. Within one file `credHelpers` wins over `auths`; across
//! files the first file that names a registry wins.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde_json::{Map, Value};

/// The normalised name of Docker Hub, as `crate::reference` writes it.
const DOCKER_HUB: &str = "docker.io";

/// Stands for "every registry without an `auths` entry" where a `credsStore` names no registry.
const ANY_REGISTRY: &str = "*";

/// Where a credential in a file came from, when `from_json` has no file.
const INLINE_JSON: &str = "<inline JSON>";

/// A stored credential for one registry. `Debug` shows the username only; secrets print as `***`.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Username and password: HTTP basic auth, or sent to the registry's token server.
    Basic {
        /// The username.
        username: String,
        /// The password (or a personal access token used as one).
        password: String,
    },
    /// Docker's `identitytoken`: an OAuth2 refresh token for the registry's token server.
    IdentityToken {
        /// The username stored with it (`<token>` when the file names none).
        username: String,
        /// The refresh token.
        token: String,
    },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &format_args!("***"))
                .finish(),
            Credential::IdentityToken { username, .. } => f
                .debug_struct("IdentityToken")
                .field("username", username)
                .field("token", &format_args!("***"))
                .finish(),
        }
    }
}

/// Why the credential files could not be used. Messages name the file and the entry, never a
/// secret.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file exists but cannot be read.
    #[error(
        "cannot read the credentials file {}: {source}; make it readable by this user, or point \
         REGISTRY_AUTH_FILE / DOCKER_CONFIG elsewhere",
        .path.display()
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not JSON.
    #[error(
        "the credentials file {} is not valid JSON ({reason}); fix it, or log in again to rewrite it",
        .path.display()
    )]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's complaint, with line and column.
        reason: String,
    },
    /// A value in the file has the wrong JSON type.
    #[error(
        "in the credentials file {}, {field} must be {expected}; fix the file, or log in again to \
         rewrite it",
        .path.display()
    )]
    Shape {
        /// The file.
        path: PathBuf,
        /// Where in the file, e.g. `auths."gcr.io".password`.
        field: String,
        /// The JSON type it must have, e.g. `a string`.
        expected: &'static str,
    },
    /// A credential helper failed.
    #[error(
        "registry {registry}: the credential helper named by {setting} in {}: {reason}",
        .path.display()
    )]
    Helper {
        /// The registry asked about.
        registry: String,
        /// `credHelpers` or `credsStore`.
        setting: &'static str,
        /// The file that names the helper.
        path: PathBuf,
        /// What went wrong, naming the program.
        reason: String,
    },
    /// An `auth` value is not the base64 of `username:password`.
    #[error(
        "in the credentials file {}, auths.{key:?}.auth {problem}; it must be the base64 of \
         \"username:password\": log in to {key} again, or fix the entry",
        .path.display()
    )]
    BadAuth {
        /// The file.
        path: PathBuf,
        /// The key of the entry under `auths`, as written.
        key: String,
        /// What is wrong with it.
        problem: AuthProblem,
    },
}

/// What is wrong with an `auth` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthProblem {
    /// Not base64.
    #[error("is not valid base64")]
    NotBase64,
    /// Decodes to bytes that are not UTF-8.
    #[error("does not decode to UTF-8 text")]
    NotUtf8,
    /// Decodes to text without a ':'.
    #[error("does not decode to \"username:password\" (there is no ':')")]
    NoColon,
    /// Decodes to `:password`.
    #[error("decodes to an empty username")]
    EmptyUsername,
}

/// Credentials by normalised registry host (`docker.io` for Docker Hub, `localhost:5000`).
#[derive(Debug, Clone, Default)]
pub struct CredentialStore {
    by_registry: BTreeMap<String, Credential>,
    /// Registries whose credentials live in a credential helper: host → the helper (`*`: every
    /// registry without an entry of its own, from a `credsStore`).
    helpers: BTreeMap<String, Helper>,
    /// What the helpers answered, per registry (`None`: they have nothing for it).
    from_helpers: std::sync::Arc<tokio::sync::Mutex<BTreeMap<String, Option<Credential>>>>,
}

/// A credential helper configured for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Helper {
    /// `credHelpers` or `credsStore`.
    setting: &'static str,
    /// The helper's name (`gcloud`, `desktop`): the program is `docker-credential-<name>`.
    name: String,
    /// The file that configures it.
    path: PathBuf,
}

/// How directly an `auths` key names a registry; within one file, the most direct key wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum KeyForm {
    /// `host` or `host:port`.
    Host,
    /// A URL such as `https://host/v1/` or `http://host`.
    Url,
    /// A repository or namespace under the host (`host/org/repo`), which containers-auth.json
    /// allows; we use it for the whole host.
    Namespace,
}

/// What one file says, before it is merged into a store.
#[derive(Default)]
struct FileContents {
    /// Registry → (key form, key as written, credential); the most direct key per registry.
    credentials: BTreeMap<String, (KeyForm, String, Credential)>,
    /// Registry → helper.
    helpers: BTreeMap<String, Helper>,
}

impl CredentialStore {
    /// No credentials: every registry is accessed anonymously.
    pub fn empty() -> Self {
        CredentialStore::default()
    }

    /// Loads, in order of precedence, `$REGISTRY_AUTH_FILE`, then `$DOCKER_CONFIG/config.json`
    /// (or `$HOME/.docker/config.json` without `DOCKER_CONFIG`). For a registry named in several
    /// files, the first file wins.
    ///
    /// Missing files are fine (no credentials from them); a file that cannot be read or is
    /// malformed is an error naming it.
    pub fn load() -> Result<Self, CredentialsError> {
        let files = default_files(|name| std::env::var_os(name));
        for (variable, path) in &files {
            if let Some(variable) = variable
                && matches!(path.try_exists(), Ok(false))
            {
                tracing::warn!(
                    file = %path.display(),
                    "{variable} names {}, which does not exist; continuing without it",
                    path.display()
                );
            }
        }
        let paths: Vec<PathBuf> = files.into_iter().map(|(_, path)| path).collect();
        CredentialStore::from_files(&paths)
    }

    /// Loads the given files, earlier files taking precedence. Missing files are skipped; an
    /// unreadable or malformed file is an error naming it.
    pub fn from_files(files: &[PathBuf]) -> Result<Self, CredentialsError> {
        let mut store = CredentialStore::empty();
        for path in files {
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::debug!(file = %path.display(), "no credentials file at {}", path.display());
                    continue;
                }
                Err(source) => {
                    return Err(CredentialsError::Read {
                        path: path.clone(),
                        source,
                    });
                }
            };
            let contents = parse_file(path, &text)?;
            store.merge(contents);
            tracing::debug!(
                file = %path.display(),
                registries = store.by_registry.len(),
                "read credentials file {}",
                path.display()
            );
        }
        store.warn_unsupported();
        Ok(store)
    }

    /// Parses the JSON of one file (`{"auths": {...}}`), for tests and programmatic use.
    pub fn from_json(json: &str) -> Result<Self, CredentialsError> {
        let mut store = CredentialStore::empty();
        store.merge(parse_file(Path::new(INLINE_JSON), json)?);
        store.warn_unsupported();
        Ok(store)
    }

    /// The credential for `registry`: a registry host as [`crate::reference::ImageRef::registry`]
    /// gives it (`docker.io` for Docker Hub). Docker Hub's aliases and URL forms are accepted too.
    pub fn get(&self, registry: &str) -> Option<&Credential> {
        self.by_registry.get(&normalise_key(registry).0)
    }

    /// Adds or replaces the credential for `registry` (normalised as in [`CredentialStore::get`]).
    pub fn insert(&mut self, registry: &str, credential: Credential) {
        self.by_registry
            .insert(normalise_key(registry).0, credential);
    }

    /// How many registries have a credential.
    pub fn len(&self) -> usize {
        self.by_registry.len()
    }

    /// Whether no registry has a credential.
    pub fn is_empty(&self) -> bool {
        self.by_registry.is_empty()
    }

    /// The registries that have a credential, sorted (no secrets: for logs and status pages).
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.by_registry.keys().map(String::as_str)
    }

    /// Adds a later (lower-precedence) file: registries already known keep their credential.
    fn merge(&mut self, contents: FileContents) {
        let claimed =
            |s: &Self, r: &str| s.by_registry.contains_key(r) || s.helpers.contains_key(r);
        let mut add_helpers = Vec::new();
        for (registry, helper) in contents.helpers {
            // `credHelpers` wins over `auths` within a file; a `credsStore` only serves the rest.
            if !claimed(self, &registry)
                && (helper.setting == "credHelpers"
                    || !contents.credentials.contains_key(&registry))
            {
                add_helpers.push((registry, helper));
            }
        }
        for (registry, (_, _, credential)) in contents.credentials {
            if !claimed(self, &registry) && !add_helpers.iter().any(|(r, _)| *r == registry) {
                self.by_registry.insert(registry, credential);
            }
        }
        self.helpers.extend(add_helpers);
    }

    /// The credential for `registry`: from `auths`, else from its credential helper (run once per
    /// registry; the answer is kept). A helper that fails is an error naming it, in one line.
    pub async fn resolve(&self, registry: &str) -> Result<Option<Credential>, CredentialsError> {
        let key = normalise_key(registry).0;
        if let Some(c) = self.by_registry.get(&key) {
            return Ok(Some(c.clone()));
        }
        let Some(helper) = self
            .helpers
            .get(&key)
            .or_else(|| self.helpers.get(ANY_REGISTRY))
        else {
            return Ok(None);
        };
        let mut cache = self.from_helpers.lock().await;
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let found = super::credential_helper::get(
            &helper.name,
            &key,
            super::credential_helper::HELPER_TIMEOUT,
        )
        .await
        .map_err(|reason| CredentialsError::Helper {
            registry: key.clone(),
            setting: helper.setting,
            path: helper.path.clone(),
            reason,
        })?;
        tracing::debug!(
            registry = %key,
            helper = %helper.name,
            found = found.is_some(),
            "asked docker-credential-{} for {key}'s credentials",
            helper.name
        );
        cache.insert(key, found.clone());
        Ok(found)
    }

    /// Whether `registry`'s credential comes from a helper (not known before it is asked).
    pub fn helper_for(&self, registry: &str) -> Option<String> {
        let key = normalise_key(registry).0;
        if self.by_registry.contains_key(&key) {
            return None;
        }
        self.helpers
            .get(&key)
            .or_else(|| self.helpers.get(ANY_REGISTRY))
            .map(|h| format!("docker-credential-{}", h.name))
    }

    /// One line per registry whose credentials come from a helper.
    fn warn_unsupported(&self) {
        for (registry, helper) in &self.helpers {
            let which = if registry == ANY_REGISTRY {
                "registries without an `auths` entry".to_string()
            } else {
                format!("registry {registry}")
            };
            tracing::info!(
                helper = %helper.name,
                file = %helper.path.display(),
                "{which}: credentials from docker-credential-{} ({} in {})",
                helper.name,
                helper.setting,
                helper.path.display(),
            );
        }
    }
}

/// The files [`CredentialStore::load`] reads, in order of precedence, each with the environment
/// variable that named it (none for the `$HOME` default). Empty variables count as unset.
fn default_files(env: impl Fn(&str) -> Option<OsString>) -> Vec<(Option<&'static str>, PathBuf)> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    let mut files = Vec::new();
    if let Some(path) = var("REGISTRY_AUTH_FILE") {
        files.push((Some("REGISTRY_AUTH_FILE"), PathBuf::from(path)));
    }
    if let Some(dir) = var("DOCKER_CONFIG") {
        files.push((
            Some("DOCKER_CONFIG"),
            PathBuf::from(dir).join("config.json"),
        ));
    } else if let Some(home) = var("HOME") {
        files.push((
            None,
            PathBuf::from(home).join(".docker").join("config.json"),
        ));
    }
    files
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://host:5000/path` → `host:5000`; also says
/// how directly the key named the registry.
fn normalise_key(key: &str) -> (String, KeyForm) {
    let key = key.trim();
    let lower = key.to_ascii_lowercase();
    let (rest, had_scheme) = match lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
    {
        Some(rest) => (rest, true),
        None => (lower.as_str(), false),
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let form = match (had_scheme, path.trim_end_matches('/')) {
        (false, "") if !rest.ends_with('/') => KeyForm::Host,
        (_, "" | "v1" | "v2") => KeyForm::Url,
        _ => KeyForm::Namespace,
    };
    let host = match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB,
        other => other,
    };
    (host.to_string(), form)
}

/// Reads one file's JSON. An empty file holds no credentials (as Docker treats it).
fn parse_file(path: &Path, text: &str) -> Result<FileContents, CredentialsError> {
    let mut contents = FileContents::default();
    if text.trim().is_empty() {
        return Ok(contents);
    }
    // Parse to a `Value` first: serde_json's syntax errors carry positions, not content, whereas
    // typed deserialisation errors can quote values (which may be secrets).
    let root: Value = serde_json::from_str(text).map_err(|e| CredentialsError::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let shape = |field: String, expected: &'static str| CredentialsError::Shape {
        path: path.to_path_buf(),
        field,
        expected,
    };
    let root = root
        .as_object()
        .ok_or_else(|| shape("the top level".into(), "an object"))?;

    let auths = optional_object(root, "auths").map_err(|e| shape(e, "an object"))?;
    let mut stubs = Vec::new();
    for (key, entry) in auths.into_iter().flatten() {
        let field = |name: &str| format!("auths.{key:?}.{name}");
        let entry = match entry {
            Value::Null => continue,
            Value::Object(entry) => entry,
            _ => return Err(shape(format!("auths.{key:?}"), "an object")),
        };
        let text = |name: &str| -> Result<Option<&str>, CredentialsError> {
            match entry.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(shape(field(name), "a string")),
            }
        };
        let (auth, username, password, token) = (
            text("auth")?,
            text("username")?,
            text("password")?,
            text("identitytoken")?,
        );
        let (username, password) = match auth {
            Some(auth) => {
                let (u, p) = decode_auth(auth).map_err(|problem| CredentialsError::BadAuth {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    problem,
                })?;
                (Some(u), Some(p))
            }
            None => (username.map(str::to_string), password.map(str::to_string)),
        };
        let credential = match (token, username, password) {
            (Some(token), username, _) => Credential::IdentityToken {
                username: username.unwrap_or_else(|| "<token>".into()),
                token: token.to_string(),
            },
            // As Docker: a username alone is sent with an empty password.
            (None, Some(username), password) => Credential::Basic {
                username,
                password: password.unwrap_or_default(),
            },
            (None, None, Some(_)) => {
                tracing::warn!(
                    file = %path.display(),
                    "{}: auths.{key:?} has a password but no username; ignoring the entry",
                    path.display()
                );
                continue;
            }
            (None, None, None) => {
                // `docker login` with a credential store leaves such stubs behind.
                stubs.push(key.clone());
                continue;
            }
        };
        let (registry, form) = normalise_key(key);
        match contents.credentials.get(&registry) {
            // On a tie the first key in the map's (sorted) order stays, so the choice is stable.
            Some((best, _, _)) if *best <= form => {}
            _ => {
                contents
                    .credentials
                    .insert(registry, (form, key.clone(), credential));
            }
        }
    }
    for (registry, (form, key, _)) in &contents.credentials {
        if *form == KeyForm::Namespace {
            tracing::warn!(
                registry = %registry,
                file = %path.display(),
                "{}: the credentials for {key:?} are used for every repository on {registry}",
                path.display()
            );
        }
    }

    let mut helper = |registry: String, setting: &'static str, name: &str| {
        contents.helpers.entry(registry).or_insert(Helper {
            setting,
            name: name.to_string(),
            path: path.to_path_buf(),
        });
    };
    let cred_helpers = optional_object(root, "credHelpers").map_err(|e| shape(e, "an object"))?;
    for (key, name) in cred_helpers.into_iter().flatten() {
        let name = name
            .as_str()
            .ok_or_else(|| shape(format!("credHelpers.{key:?}"), "a string"))?;
        helper(normalise_key(key).0, "credHelpers", name);
    }
    match root.get("credsStore") {
        None | Some(Value::Null) => {}
        Some(Value::String(store)) if store.is_empty() => {}
        Some(Value::String(store)) => {
            // The store holds the credentials of the registries `docker login` left stubs for.
            let mut registries: BTreeSet<String> =
                stubs.iter().map(|key| normalise_key(key).0).collect();
            if registries.is_empty() {
                registries.insert(ANY_REGISTRY.into());
            }
            for registry in registries {
                helper(registry, "credsStore", store);
            }
        }
        Some(_) => return Err(shape("credsStore".into(), "a string")),
    }
    Ok(contents)
}

/// `root[name]` if it is an object; `None` if absent or null; `Err(name)` if another type.
fn optional_object<'a>(
    root: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, String> {
    match root.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => Err(name.to_string()),
    }
}

/// base64(`username:password`) → the pair; the password may contain ':'. Like Go's decoder (which
/// Docker uses), line breaks are ignored; padding is optional.
fn decode_auth(auth: &str) -> Result<(String, String), AuthProblem> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: String = auth
        .trim()
        .chars()
        .filter(|c| *c != '\n' && *c != '\r')
        .collect();
    let raw = LENIENT
        .decode(compact)
        .map_err(|_| AuthProblem::NotBase64)?;
    let text = String::from_utf8(raw).map_err(|_| AuthProblem::NotUtf8)?;
    let (username, password) = text.split_once(':').ok_or(AuthProblem::NoColon)?;
    if username.is_empty() {
        return Err(AuthProblem::EmptyUsername);
    }
    Ok((username.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn basic(username: &str, password: &str) -> Credential {
        Credential::Basic {
            username: username.into(),
            password: password.into(),
        }
    }

    fn auths(entries: &[(&str, Value)]) -> String {
        let map: Map<String, Value> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        serde_json::json!({ "auths": map }).to_string()
    }

    /// Runs `f` with a subscriber that captures log output; returns what `f` returned and the log.
    fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
        let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let buf = buf.clone();
            move || SharedBuf(buf.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let log = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        (out, log)
    }

    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for SharedBuf {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn reads_every_entry_format() {
        let json = auths(&[
            (
                "a.io",
                serde_json::json!({ "auth": b64("alice:pa:ss:word") }),
            ),
            (
                "b.io",
                serde_json::json!({ "username": "bob", "password": "pw", "email": "x@y" }),
            ),
            (
                "c.io",
                serde_json::json!({ "auth": b64("carol:x"), "identitytoken": "refresh-c" }),
            ),
            ("d.io", serde_json::json!({ "identitytoken": "refresh-d" })),
            (
                "e.io",
                serde_json::json!({ "username": "erin", "identitytoken": "refresh-e" }),
            ),
            (
                "f.io",
                serde_json::json!({ "auth": b64("frank:ok"), "username": "ignored", "password": "ignored" }),
            ),
            ("g.io", serde_json::json!({ "username": "gina" })),
            ("h.io", serde_json::json!({ "auth": "", "username": null })),
            ("i.io", serde_json::json!(null)),
            (
                "j.io",
                serde_json::json!({ "auth": format!("{}\n", b64("jo:pw").trim_end_matches('=')) }),
            ),
        ]);
        let s = CredentialStore::from_json(&json).unwrap();
        assert_eq!(
            s.get("a.io"),
            Some(&basic("alice", "pa:ss:word")),
            "password keeps its ':'"
        );
        assert_eq!(s.get("b.io"), Some(&basic("bob", "pw")));
        assert_eq!(
            s.get("c.io"),
            Some(&Credential::IdentityToken {
                username: "carol".into(),
                token: "refresh-c".into()
            })
        );
        assert_eq!(
            s.get("d.io"),
            Some(&Credential::IdentityToken {
                username: "<token>".into(),
                token: "refresh-d".into()
            })
        );
        assert_eq!(
            s.get("e.io"),
            Some(&Credential::IdentityToken {
                username: "erin".into(),
                token: "refresh-e".into()
            })
        );
        assert_eq!(
            s.get("f.io"),
            Some(&basic("frank", "ok")),
            "auth wins over username/password"
        );
        assert_eq!(s.get("g.io"), Some(&basic("gina", "")));
        assert_eq!(s.get("h.io"), None);
        assert_eq!(s.get("i.io"), None);
        assert_eq!(
            s.get("j.io"),
            Some(&basic("jo", "pw")),
            "unpadded, with a line break"
        );
        assert_eq!(s.len(), 8);
        assert_eq!(
            CredentialStore::from_json("").unwrap().len(),
            0,
            "empty file"
        );
        assert_eq!(CredentialStore::from_json("{}").unwrap().len(), 0);
        assert!(CredentialStore::empty().is_empty());
    }

    #[test]
    fn normalises_keys_to_host_and_port() {
        let cred = || serde_json::json!({ "auth": b64("u:p") });
        let json = auths(&[
            ("plain.io", cred()),
            ("ported.io:5000", cred()),
            ("https://url.io/v1/", cred()),
            ("http://insecure.io:8080", cred()),
            ("path.io/org/repo", cred()),
            ("MixedCase.IO", cred()),
            ("https://quay.io/", cred()),
        ]);
        let s = CredentialStore::from_json(&json).unwrap();
        assert_eq!(
            s.registries().collect::<Vec<_>>(),
            [
                "insecure.io:8080",
                "mixedcase.io",
                "path.io",
                "plain.io",
                "ported.io:5000",
                "quay.io",
                "url.io"
            ]
        );
        assert!(
            s.get("ported.io").is_none(),
            "the port is part of the registry"
        );
        assert!(s.get("MIXEDCASE.io").is_some());
        assert!(s.get("https://url.io/v2/").is_some());
    }

    #[test]
    fn docker_hub_aliases_all_mean_docker_io() {
        for key in [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "registry-1.docker.io",
            "docker.io",
        ] {
            let s = CredentialStore::from_json(&auths(&[(
                key,
                serde_json::json!({ "auth": b64("hub:pw") }),
            )]))
            .unwrap();
            for name in [
                "docker.io",
                "index.docker.io",
                "registry-1.docker.io",
                "https://index.docker.io/v1/",
            ] {
                assert_eq!(
                    s.get(name),
                    Some(&basic("hub", "pw")),
                    "key {key:?}, lookup {name:?}"
                );
            }
        }
        // With several aliases in one file, the plain host form wins, then URL forms.
        let s = CredentialStore::from_json(&auths(&[
            (
                "https://index.docker.io/v1/",
                serde_json::json!({ "auth": b64("url:1") }),
            ),
            ("docker.io", serde_json::json!({ "auth": b64("host:2") })),
            (
                "docker.io/library",
                serde_json::json!({ "auth": b64("namespace:3") }),
            ),
        ]))
        .unwrap();
        assert_eq!(s.get("docker.io"), Some(&basic("host", "2")));
        let s = CredentialStore::from_json(&auths(&[
            (
                "docker.io/library",
                serde_json::json!({ "auth": b64("namespace:3") }),
            ),
            (
                "https://index.docker.io/v1/",
                serde_json::json!({ "auth": b64("url:1") }),
            ),
        ]))
        .unwrap();
        assert_eq!(s.get("docker.io"), Some(&basic("url", "1")));
    }

    #[test]
    fn namespaced_keys_serve_the_whole_host_with_a_warning() {
        let ns = || serde_json::json!({ "auth": b64("robot:ns") });
        let (s, log) =
            capture_logs(|| CredentialStore::from_json(&auths(&[("quay.io/org/repo", ns())])));
        assert_eq!(s.unwrap().get("quay.io"), Some(&basic("robot", "ns")));
        assert!(
            log.contains("used for every repository on quay.io"),
            "{log}"
        );
        // Shadowed by a host key: no warning.
        let (s, log) = capture_logs(|| {
            CredentialStore::from_json(&auths(&[
                ("quay.io/org/repo", ns()),
                ("quay.io", serde_json::json!({ "auth": b64("me:host") })),
            ]))
        });
        assert_eq!(s.unwrap().get("quay.io"), Some(&basic("me", "host")));
        assert!(!log.contains("WARN"), "{log}");
    }

    #[test]
    fn earlier_files_win_and_missing_files_are_fine() {
        let dir = tempfile::tempdir().unwrap();
        let auth_file = dir.path().join("auth.json");
        let docker_config = dir.path().join("config.json");
        std::fs::write(
            &auth_file,
            auths(&[(
                "r.io",
                serde_json::json!({ "auth": b64("from-auth-file:1") }),
            )]),
        )
        .unwrap();
        std::fs::write(
            &docker_config,
            auths(&[
                (
                    "https://r.io/v1/",
                    serde_json::json!({ "auth": b64("from-docker:2") }),
                ),
                ("s.io", serde_json::json!({ "auth": b64("only-docker:3") })),
            ]),
        )
        .unwrap();
        let s = CredentialStore::from_files(&[
            auth_file.clone(),
            dir.path().join("missing.json"),
            docker_config.clone(),
        ])
        .unwrap();
        assert_eq!(s.get("r.io"), Some(&basic("from-auth-file", "1")));
        assert_eq!(s.get("s.io"), Some(&basic("only-docker", "3")));

        let s = CredentialStore::from_files(&[docker_config, auth_file]).unwrap();
        assert_eq!(
            s.get("r.io"),
            Some(&basic("from-docker", "2")),
            "order is precedence"
        );

        let none = CredentialStore::from_files(&[dir.path().join("nope.json")]).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn default_files_follow_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let files = default_files(env(&[
            ("REGISTRY_AUTH_FILE", "/run/auth.json"),
            ("DOCKER_CONFIG", "/etc/docker"),
            ("HOME", "/home/u"),
        ]));
        assert_eq!(
            files,
            [
                (Some("REGISTRY_AUTH_FILE"), PathBuf::from("/run/auth.json")),
                (
                    Some("DOCKER_CONFIG"),
                    PathBuf::from("/etc/docker/config.json")
                ),
            ]
        );
        let files = default_files(env(&[
            ("REGISTRY_AUTH_FILE", ""),
            ("DOCKER_CONFIG", ""),
            ("HOME", "/home/u"),
        ]));
        assert_eq!(
            files,
            [(None, PathBuf::from("/home/u/.docker/config.json"))]
        );
        assert!(default_files(env(&[])).is_empty());
    }

    #[test]
    fn malformed_files_are_errors_naming_file_entry_and_fix() {
        let secret_json = r#"{"auths": {"r.io": "c2VjcmV0OnB3"}}"#;
        let cases: Vec<(String, &[&str])> = vec![
            (
                auths(&[("r.io", serde_json::json!({ "auth": "%%%not-base64" }))]),
                &[
                    "auths.\"r.io\".auth is not valid base64",
                    "username:password",
                    "log in to r.io again",
                ],
            ),
            (
                auths(&[("r.io", serde_json::json!({ "auth": b64("nocolon") }))]),
                &["there is no ':'"],
            ),
            (
                auths(&[("r.io", serde_json::json!({ "auth": b64(":pw") }))]),
                &["empty username"],
            ),
            (
                auths(&[("r.io", serde_json::json!({ "auth": "/w==" }))]),
                &["does not decode to UTF-8"],
            ),
            ("not json".into(), &["is not valid JSON", "line 1"]),
            ("[]".into(), &["the top level must be an object"]),
            (r#"{"auths": []}"#.into(), &["auths must be an object"]),
            (secret_json.into(), &["auths.\"r.io\" must be an object"]),
            (
                r#"{"auths": {"r.io": {"password": 12345}}}"#.into(),
                &["auths.\"r.io\".password must be a string"],
            ),
            (
                r#"{"credHelpers": {"gcr.io": 1}}"#.into(),
                &["credHelpers.\"gcr.io\" must be a string"],
            ),
            (
                r#"{"credsStore": true}"#.into(),
                &["credsStore must be a string"],
            ),
        ];
        for (json, fragments) in cases {
            let err = CredentialStore::from_json(&json).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(INLINE_JSON), "{json}: {msg}");
            for fragment in fragments {
                assert!(msg.contains(fragment), "{json}: {msg:?} lacks {fragment:?}");
            }
            for secret in ["c2VjcmV0OnB3", "12345", "secret"] {
                assert!(!msg.contains(secret), "{json}: {msg} shows a secret");
            }
        }
        let err =
            CredentialStore::from_json(&auths(&[("r.io", serde_json::json!({ "auth": "%%%" }))]))
                .unwrap_err();
        assert!(matches!(
            err,
            CredentialsError::BadAuth { ref key, problem: AuthProblem::NotBase64, .. } if key == "r.io"
        ));
    }

    #[test]
    fn file_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("config.json");
        std::fs::write(&bad, "{\"auths\": {").unwrap();
        let err = CredentialStore::from_files(std::slice::from_ref(&bad)).unwrap_err();
        assert!(matches!(err, CredentialsError::Json { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );

        // A directory where a file should be cannot be read.
        let err = CredentialStore::from_files(&[dir.path().to_path_buf()]).unwrap_err();
        assert!(matches!(err, CredentialsError::Read { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let b = basic("alice", "hunter2");
        let t = Credential::IdentityToken {
            username: "bob".into(),
            token: "refresh-secret".into(),
        };
        assert_eq!(
            format!("{b:?}"),
            r#"Basic { username: "alice", password: *** }"#
        );
        assert_eq!(
            format!("{t:?}"),
            r#"IdentityToken { username: "bob", token: *** }"#
        );
        let mut store = CredentialStore::empty();
        store.insert("a.io", b);
        store.insert("https://index.docker.io/v1/", t);
        let debug = format!("{store:?} {store:#?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("refresh-secret"),
            "{debug}"
        );
        assert!(debug.contains("alice") && debug.contains("***"), "{debug}");
        assert!(
            store.get("docker.io").is_some(),
            "insert normalises the registry"
        );
    }

    #[test]
    fn insert_replaces() {
        let mut store = CredentialStore::from_json(&auths(&[(
            "r.io",
            serde_json::json!({ "auth": b64("a:1") }),
        )]))
        .unwrap();
        store.insert("r.io", basic("b", "2"));
        assert_eq!(store.get("r.io"), Some(&basic("b", "2")));
    }

    #[test]
    fn credential_helpers_win_within_a_file_and_the_first_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("auth.json");
        let second = dir.path().join("config.json");
        std::fs::write(
            &first,
            serde_json::json!({
                "auths": { "gcr.io": { "auth": b64("oauth2:first-secret") }, "quay.io": { "auth": b64("q:first") } },
                "credHelpers": { "gcr.io": "gcloud", "us-docker.pkg.dev": "gcloud" }
            })
            .to_string(),
        )
        .unwrap();
        std::fs::write(
            &second,
            serde_json::json!({
                "auths": { "https://index.docker.io/v1/": {}, "ghcr.io": { "auth": b64("me:second-secret") } },
                "credHelpers": { "gcr.io": "other", "quay.io": "other" },
                "credsStore": "desktop"
            })
            .to_string(),
        )
        .unwrap();
        let (store, log) = capture_logs(|| CredentialStore::from_files(&[first, second.clone()]));
        let store = store.unwrap();
        assert_eq!(
            store.helper_for("gcr.io").as_deref(),
            Some("docker-credential-gcloud")
        );
        assert_eq!(
            store.helper_for("us-docker.pkg.dev").as_deref(),
            Some("docker-credential-gcloud")
        );
        assert_eq!(
            store.helper_for("docker.io").as_deref(),
            Some("docker-credential-desktop")
        );
        assert_eq!(
            store.helper_for("quay.io"),
            None,
            "the first file's auths entry wins"
        );
        assert_eq!(store.get("quay.io"), Some(&basic("q", "first")));
        assert_eq!(store.helper_for("ghcr.io"), None);
        assert_eq!(store.get("ghcr.io"), Some(&basic("me", "second-secret")));
        assert_eq!(
            store.get("gcr.io"),
            None,
            "credHelpers wins over auths in a file"
        );
        assert!(
            log.contains("registry gcr.io: credentials from docker-credential-gcloud"),
            "{log}"
        );
        assert!(!log.contains("secret"), "{log}");

        // A credsStore with no registry left behind in `auths` serves every registry.
        let store = CredentialStore::from_json(r#"{"credsStore": "osxkeychain"}"#).unwrap();
        assert_eq!(
            store.helper_for("any.example").as_deref(),
            Some("docker-credential-osxkeychain")
        );
    }
}
