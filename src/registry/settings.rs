//! Per-registry settings in one place: the YAML file named by `MIRROR_REGISTRIES_FILE`
//! (`--registries-file`), keyed by registry `HOST[:PORT]`, read by `copy` and `serve`
//! (example: `deploy/registries.example.yaml`). Checked whole at start; every problem is reported
//! as `file:line: what is wrong`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::{LoadError, LoaderOptions, Node, Span};

/// The keys a registry's entry may have.
pub const KEYS: [&str; 7] = [
    "ca_dir",
    "client_cert",
    "client_key",
    "insecure",
    "chunk_size",
    "max_body",
    "layout",
];

/// How mirror names are laid out on a target registry (the one definition, in `mapping`).
pub use crate::mapping::Layout;

/// What the registries file says about one registry. Unset fields leave the defaults (and the
/// flags and environment variables) in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrySettings {
    ca_dir: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
    insecure: Option<bool>,
    chunk_size: Option<u64>,
    max_body: Option<u64>,
    layout: Option<Layout>,
}

impl RegistrySettings {
    /// A directory laid out like `certs.d/HOST/` (`*.crt` CAs, `NAME.cert` + `NAME.key`).
    pub fn ca_dir(&self) -> Option<&Path> {
        self.ca_dir.as_deref()
    }

    /// The client certificate and key for mutual TLS, named outside `ca_dir`.
    pub fn client_cert(&self) -> Option<(&Path, &Path)> {
        self.client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()))
    }

    /// `Some(true)`: plain HTTP; `Some(false)`: HTTPS even on loopback; `None`: the default.
    pub fn insecure(&self) -> Option<bool> {
        self.insecure
    }

    /// Bytes per `PATCH` when uploading in chunks to this registry.
    pub fn chunk_size(&self) -> Option<u64> {
        self.chunk_size
    }

    /// The largest request body this registry (or its front) accepts.
    pub fn max_body(&self) -> Option<u64> {
        self.max_body
    }

    /// How mirror names are laid out when this registry is the target.
    pub fn layout(&self) -> Option<Layout> {
        self.layout
    }
}

/// Settings per registry (`host` or `host:port`, lowercase), from the registries file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registries {
    by_host: BTreeMap<String, RegistrySettings>,
}

static NONE: RegistrySettings = RegistrySettings {
    ca_dir: None,
    client_cert: None,
    insecure: None,
    chunk_size: None,
    max_body: None,
    layout: None,
};

impl Registries {
    /// The settings for `registry` (empty when the file does not name it).
    pub fn get(&self, registry: &str) -> &RegistrySettings {
        self.by_host
            .get(&registry.to_ascii_lowercase())
            .unwrap_or(&NONE)
    }

    /// Every registry the file names, with its settings.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RegistrySettings)> {
        self.by_host.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Registries, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|e| SettingsError {
            problems: vec![format!(
                "{}: cannot read the registries file: {e}",
                path.display()
            )],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        parse(&path.display().to_string(), &text, base)
    }
}

/// Everything wrong with a registries file, one `file:line: what is wrong` per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", problems.join("\n"))]
pub struct SettingsError {
    /// The problems, in file order.
    pub problems: Vec<String>,
}

struct Problems<'a> {
    file: &'a str,
    list: Vec<(usize, String)>,
}

impl Problems<'_> {
    fn at(&mut self, span: &Span, msg: impl Into<String>) {
        let line = span.start().map(|m| m.line()).unwrap_or(0);
        self.list.push((line, msg.into()));
    }

    fn finish(mut self) -> SettingsError {
        self.list.sort_by_key(|(l, _)| *l);
        SettingsError {
            problems: self
                .list
                .into_iter()
                .map(|(l, m)| format!("{}:{l}: {m}", self.file))
                .collect(),
        }
    }
}

/// Parses a size as `--chunk-size` does: bytes, or a number with `K`, `M`, `G` (binary units;
/// `KiB`, `MB`, `mib`, … all mean the same).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("{s:?} is not a size; write bytes or a number with KiB, MiB or GiB, such as 4MiB")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{:?} in {s:?} is not a unit; use KiB, MiB or GiB (binary units)",
                unit.trim()
            ));
        }
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} must be more than 0 and fit in 64 bits"))
}

/// Whether `key` is a registry name as references write it: `host` or `host:port`.
fn registry_key_problem(key: &str) -> Option<String> {
    if key.contains("://") {
        return Some(format!(
            "{key:?} is not a registry name: write HOST or HOST:PORT, without a scheme"
        ));
    }
    if key.contains('/') {
        return Some(format!(
            "{key:?} is not a registry name: write HOST or HOST:PORT, without a path (settings apply to the whole registry)"
        ));
    }
    let (host, port) = match key.rsplit_once(':') {
        Some((h, p)) if !key.starts_with('[') || h.ends_with(']') => (h, Some(p)),
        _ => (key, None),
    };
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return Some(format!(
            "{key:?}: the port {p:?} is not a number from 0 to 65535"
        ));
    }
    let ok = !host.is_empty()
        && (host.starts_with('[')
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'));
    (!ok).then(|| format!("{key:?} is not a registry name: write HOST or HOST:PORT"))
}

fn scalar<'a>(node: &'a Node, key: &str, p: &mut Problems) -> Option<&'a MarkedScalarNode> {
    let s = node.as_scalar();
    if s.is_none() {
        p.at(node.span(), format!("{key} must be a single value"));
    }
    s
}

/// Parses a registries file's text; `file` names it in messages, `base` resolves relative paths.
pub fn parse(file: &str, text: &str, base: &Path) -> Result<Registries, SettingsError> {
    let mut p = Problems {
        file,
        list: Vec::new(),
    };
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok(Registries::default());
    }
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .toplevel_mapping();
    let root = match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(root) => root,
        Err(e) => {
            let (line, msg) = match &e {
                LoadError::DuplicateKey(d) => (
                    d.key.span().start().map(|m| m.line()).unwrap_or(0),
                    format!("{:?} is given twice; keep one", d.key.as_str()),
                ),
                LoadError::TopLevelMustBeMapping(m) => (
                    m.line(),
                    "the top must be a mapping of registry names (HOST[:PORT]) to their settings"
                        .into(),
                ),
                other => (0, format!("not valid YAML: {other}")),
            };
            p.list.push((line, msg));
            return Err(p.finish());
        }
    };
    let top = root.as_mapping().expect("the loader checked the top level");
    let mut out = Registries::default();
    for (key, node) in top.iter() {
        if let Some(problem) = registry_key_problem(key.as_str()) {
            p.at(key.span(), problem);
            continue;
        }
        let host = key.as_str().to_ascii_lowercase();
        let Some(map) = node.as_mapping() else {
            let empty = node
                .as_scalar()
                .is_some_and(|s| matches!(s.as_str(), "" | "~" | "null"));
            if !empty {
                p.at(
                    key.span(),
                    format!(
                        "{host}: the settings must be a mapping of keys ({})",
                        KEYS.join(", ")
                    ),
                );
            }
            continue;
        };
        if let Some(s) = entry(&host, key.span(), map, base, &mut p) {
            out.by_host.insert(host, s);
        }
    }
    if p.list.is_empty() {
        Ok(out)
    } else {
        Err(p.finish())
    }
}

fn entry(
    host: &str,
    at: &Span,
    map: &MarkedMappingNode,
    base: &Path,
    p: &mut Problems,
) -> Option<RegistrySettings> {
    let before = p.list.len();
    let mut s = RegistrySettings::default();
    for key in map.keys() {
        if !KEYS.contains(&key.as_str()) {
            p.at(
                key.span(),
                format!(
                    "{host}: unknown key {:?}; the keys are: {}",
                    key.as_str(),
                    KEYS.join(", ")
                ),
            );
        }
    }
    let path = |name: &str, p: &mut Problems| -> Option<(PathBuf, &Span)> {
        let node = map.get_node(name)?;
        let v = scalar(node, name, p)?;
        if v.as_str().trim().is_empty() {
            p.at(v.span(), format!("{host}: {name} is empty; name a path"));
            return None;
        }
        Some((base.join(v.as_str()), v.span()))
    };
    if let Some((dir, span)) = path("ca_dir", p) {
        if dir.is_dir() {
            s.ca_dir = Some(dir);
        } else {
            p.at(
                span,
                format!(
                    "{host}: ca_dir {} is not a directory; create it with the registry's CA as ca.crt, or fix the path",
                    dir.display()
                ),
            );
        }
    }
    match (path("client_cert", p), path("client_key", p)) {
        (Some((cert, cs)), Some((key, ks))) => {
            let mut ok = true;
            for (f, span) in [(&cert, cs), (&key, ks)] {
                if !f.is_file() {
                    ok = false;
                    p.at(span, format!("{host}: {} does not exist", f.display()));
                }
            }
            if ok {
                s.client_cert = Some((cert, key));
            }
        }
        (Some((_, span)), None) => p.at(
            span,
            format!("{host}: client_cert needs client_key too (the certificate's private key)"),
        ),
        (None, Some((_, span))) => p.at(
            span,
            format!("{host}: client_key needs client_cert too (the certificate it belongs to)"),
        ),
        (None, None) => {}
    }
    if let Some(node) = map.get_node("insecure")
        && let Some(v) = scalar(node, "insecure", p)
    {
        match v.as_bool() {
            Some(b) => s.insecure = Some(b),
            None => p.at(
                v.span(),
                format!(
                    "{host}: insecure must be true (plain HTTP) or false (HTTPS), not {:?}",
                    v.as_str()
                ),
            ),
        }
    }
    let size = |name: &str, p: &mut Problems| -> Option<u64> {
        let v = scalar(map.get_node(name)?, name, p)?;
        match parse_size(v.as_str()) {
            Ok(n) => Some(n),
            Err(e) => {
                p.at(v.span(), format!("{host}: {name}: {e}"));
                None
            }
        }
    };
    s.chunk_size = size("chunk_size", p);
    s.max_body = size("max_body", p);
    // The bounds the upload path accepts, reported here with the line.
    let limits = super::client::UploadLimits {
        chunk_size: s.chunk_size,
        max_body: s.max_body,
    };
    if let Err(e) = limits.check() {
        let key = if s.chunk_size.is_some() {
            "chunk_size"
        } else {
            "max_body"
        };
        let span = map.get_node(key).map_or(at, |n| n.span());
        p.at(span, format!("{host}: {e}"));
    }
    if let Some(node) = map.get_node("layout")
        && let Some(v) = scalar(node, "layout", p)
    {
        match v.as_str().parse() {
            Ok(l) => s.layout = Some(l),
            Err(e) => p.at(v.span(), format!("{host}: {e}")),
        }
    }
    (p.list.len() == before).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("5MB"), Ok(5 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("4 parsecs").unwrap_err().contains("not a unit"));
        assert!(parse_size("MiB").unwrap_err().contains("not a size"));
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn reads_every_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        std::fs::write(dir.path().join("c.cert"), "x").unwrap();
        std::fs::write(dir.path().join("c.key"), "x").unwrap();
        let text = "\
# comment
Registry.Internal:5000:
  ca_dir: certs
  client_cert: c.cert
  client_key: c.key
  insecure: false
  chunk_size: 4MiB
  max_body: 64MiB
  layout: flat
plain.example:
  insecure: true
empty.example:
";
        let r = parse("r.yaml", text, dir.path()).unwrap();
        let s = r.get("registry.internal:5000");
        assert_eq!(s.ca_dir(), Some(dir.path().join("certs").as_path()));
        assert_eq!(
            s.client_cert(),
            Some((
                dir.path().join("c.cert").as_path(),
                dir.path().join("c.key").as_path()
            ))
        );
        assert_eq!(s.insecure(), Some(false));
        assert_eq!(s.chunk_size(), Some(4 << 20));
        assert_eq!(s.max_body(), Some(64 << 20));
        assert_eq!(s.layout(), Some(Layout::Flat));
        assert_eq!(r.get("plain.example").insecure(), Some(true));
        assert_eq!(r.get("unknown.example"), &RegistrySettings::default());
        assert_eq!(
            parse("r.yaml", "# nothing\n", dir.path()).unwrap(),
            Registries::default()
        );
    }

    #[test]
    fn problems_name_file_line_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let text = "\
ok.example:
  chunk_sise: 4MiB
https://bad.example:
  insecure: true
a.example:
  insecure: maybe
  chunk_size: 8MiB
  max_body: 4MiB
  layout: deep
  client_cert: missing.cert
b.example/path: {}
c.example:
  ca_dir: nowhere
";
        let e = parse("r.yaml", text, dir.path()).unwrap_err();
        let want = [
            "r.yaml:2: ok.example: unknown key \"chunk_sise\"; the keys are: ca_dir, client_cert, client_key, insecure, chunk_size, max_body, layout",
            "r.yaml:3: \"https://bad.example\" is not a registry name: write HOST or HOST:PORT, without a scheme",
            "r.yaml:6: a.example: insecure must be true (plain HTTP) or false (HTTPS), not \"maybe\"",
            "r.yaml:7: a.example: the chunk size (8388608 bytes) is larger than the body limit (4194304 bytes)",
            "r.yaml:9: a.example: layout \"deep\" is not known",
            "r.yaml:10: a.example: client_cert needs client_key too",
            "r.yaml:11: \"b.example/path\" is not a registry name",
            "r.yaml:13: c.example: ca_dir",
        ];
        assert_eq!(e.problems.len(), want.len(), "{e}");
        for (got, want) in e.problems.iter().zip(want) {
            assert!(
                got.starts_with(want),
                "{got}\n  does not start with\n{want}"
            );
        }
        let dup = parse("r.yaml", "a.example: {}\na.example: {}\n", dir.path()).unwrap_err();
        assert_eq!(
            dup.problems,
            vec!["r.yaml:2: \"a.example\" is given twice; keep one"]
        );
        let list = parse("r.yaml", "- a\n", dir.path()).unwrap_err();
        assert!(
            list.problems[0].starts_with("r.yaml:1: the top must be a mapping"),
            "{list}"
        );
    }
}
