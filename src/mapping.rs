//! Where a source lands under `MIRROR_TARGET`, and which sources `MIRROR_ALLOWED_SOURCES` admits.
//!
//! A source maps one-to-one and without collisions: `gcr.io/kaniko-project/executor:v1.8.1` under
//! `ghcr.io/acme/mirror` becomes `ghcr.io/acme/mirror/gcr.io/kaniko-project/executor:v1.8.1`. A registry
//! port, which cannot appear in a path, is written with `_` (`localhost:5000` → `localhost_5000`);
//! host names cannot contain `_`, so the mapping reverses exactly.
//!
//! Registries that take only `namespace/repo` (Docker Hub, Quay, Aliyun ACR) get the `flat` layout:
//! the whole source becomes one path component below the prefix, with `__` between the source's
//! components (`registry.example.cn/acme` + `gcr.io/kaniko-project/executor` →
//! `registry.example.cn/acme/gcr.io__kaniko-project__executor`). Host names contain no `_`, so the
//! port is `_` there too (`localhost_5000__a`); a source whose own path has a `__` cannot be
//! flattened without ambiguity and is refused. Both layouts reverse exactly ([`TargetPrefix::source_of`]).

use std::fmt;
use std::str::FromStr;

use crate::reference::ImageRef;

/// How a source's name is written under the target prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// `prefix/<registry>/<path>`: the source's path kept as it is (GHCR, GAR, Harbor, distribution).
    #[default]
    Nested,
    /// `prefix/<registry>__<path with __ between components>`: one component (Docker Hub, Quay, ACR).
    Flat,
}

impl Layout {
    /// The name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Nested => "nested",
            Layout::Flat => "flat",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Layout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "nested" => Ok(Layout::Nested),
            "flat" => Ok(Layout::Flat),
            other => Err(format!(
                "layout {other:?} is not known: use \"nested\" (prefix/registry/path) or \"flat\" (one name below the prefix, for registries that take only namespace/repo)"
            )),
        }
    }
}

/// Longest repository name (registry path) distribution accepts.
const MAX_NAME: usize = 255;

/// The repository prefix mirrors are written under (`ghcr.io/acme/mirror`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPrefix {
    /// Registry host (`ghcr.io`, `127.0.0.1:5001`).
    pub registry: String,
    /// Path under it (`acme/mirror`); may be empty.
    pub path: String,
    /// How sources are written below it.
    pub layout: Layout,
}

impl TargetPrefix {
    /// Parses `registry[/path]`, e.g. `ghcr.io/acme/mirror`.
    pub fn parse(s: &str) -> Result<TargetPrefix, String> {
        let s = s.trim().trim_end_matches('/');
        // Validate with the reference parser by naming a repository under the prefix.
        let probe = ImageRef::parse(&format!("{s}/x")).map_err(|e| {
            format!("{s:?} is not a registry/repository prefix such as ghcr.io/acme/mirror: {e}")
        })?;
        if probe.tag().is_some() || probe.digest().is_some() {
            return Err(format!(
                "{s:?} must be a repository prefix, without a tag or digest"
            ));
        }
        if !s.contains('/') && !s.contains('.') && !s.contains(':') && s != "localhost" {
            return Err(format!(
                "{s:?} does not name a registry; write it in full, such as ghcr.io/acme/mirror"
            ));
        }
        let path = probe
            .repository()
            .strip_suffix("x")
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string();
        Ok(TargetPrefix {
            registry: probe.registry().to_string(),
            path,
            layout: Layout::Nested,
        })
    }

    /// The same prefix with sources written in `layout`.
    pub fn with_layout(mut self, layout: Layout) -> TargetPrefix {
        self.layout = layout;
        self
    }

    /// `registry/path`.
    pub fn repo(&self) -> String {
        if self.path.is_empty() {
            self.registry.clone()
        } else {
            format!("{}/{}", self.registry, self.path)
        }
    }

    /// The mirror repository (`registry/path/...`, no tag) for `source`.
    pub fn repo_for(&self, source: &ImageRef) -> Result<String, String> {
        let host = source.registry().to_ascii_lowercase();
        if host.starts_with('[') {
            return Err(format!(
                "source registry {host} is an IPv6 literal, which cannot be written as a repository path; use a host name"
            ));
        }
        let host = host.replace(':', "_");
        let mapped = match self.layout {
            Layout::Nested => format!("{host}/{}", source.repository()),
            Layout::Flat => {
                if let Some(part) = source.repository().split('/').find(|c| c.contains("__")) {
                    return Err(format!(
                        "source {} has \"__\" in its path component {part:?}, which the flat layout writes between components; name a target for it or use the nested layout",
                        source.repo_name()
                    ));
                }
                format!("{host}__{}", source.repository().replace('/', "__"))
            }
        };
        let full = if self.path.is_empty() {
            mapped
        } else {
            format!("{}/{mapped}", self.path)
        };
        if full.len() > MAX_NAME {
            return Err(format!(
                "the mirror repository {}/{full} would be longer than {MAX_NAME} characters; name a shorter target for it",
                self.registry
            ));
        }
        Ok(format!("{}/{full}", self.registry))
    }

    /// The source repository whose mapping is `repo`, if `repo` has the shape of one: the reverse
    /// of [`TargetPrefix::repo_for`]. Such names are reserved for that source.
    pub fn source_of(&self, repo: &str) -> Option<String> {
        let rest = repo.strip_prefix(&self.repo())?.strip_prefix('/')?;
        let (host, path) = match self.layout {
            Layout::Nested => rest.split_once('/')?,
            Layout::Flat => {
                if rest.contains('/') {
                    return None;
                }
                rest.split_once("__")?
            }
        };
        // Only a registry host has a `.`, a port (`_` here) or is `localhost`; `tools/kaniko` is a
        // name of the operator's choosing, not a mapped source.
        if !(host.contains('.') || host.contains('_') || host == "localhost") {
            return None;
        }
        let host = host.replacen('_', ":", 1);
        let path = match self.layout {
            Layout::Nested => path.to_string(),
            Layout::Flat => path.replace("__", "/"),
        };
        let source = ImageRef::parse(&format!("{host}/{path}")).ok()?;
        let name = source.repo_name();
        // Exact round trip only: anything else is not a mapped name.
        (self.repo_for(&source).ok()? == repo).then_some(name)
    }

    /// Whether `repo` (registry/path) lies under this prefix.
    pub fn contains(&self, repo: &str) -> bool {
        let prefix = self.repo();
        repo.strip_prefix(&prefix)
            .is_some_and(|rest| rest.starts_with('/'))
    }
}

/// A named target: a registry prefix (with its layout) a request can send mirrors to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The name requests use (`ghcr`, `home`); `default` for the one-target form.
    pub name: String,
    pub prefix: TargetPrefix,
}

/// The configured targets, in the order configured (`MIRROR_TARGETS`, or the one of
/// `MIRROR_TARGET` named `default`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets(Vec<Target>);

/// The name of the one target of `MIRROR_TARGET`.
pub const DEFAULT_TARGET: &str = "default";

impl Targets {
    /// The one target of `MIRROR_TARGET`, named [`DEFAULT_TARGET`].
    pub fn single(prefix: TargetPrefix) -> Targets {
        Targets(vec![Target {
            name: DEFAULT_TARGET.to_string(),
            prefix,
        }])
    }

    /// Parses `MIRROR_TARGETS`: comma-separated `name=registry/prefix`.
    pub fn parse(s: &str) -> Result<Targets, String> {
        let mut out: Vec<Target> = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((name, prefix)) = entry.split_once('=') else {
                return Err(format!(
                    "entry {entry:?} has no name: write name=registry/prefix, such as ghcr=ghcr.io/acme/mirror"
                ));
            };
            let name = name.trim();
            if name.is_empty()
                || name.len() > 32
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "target name {name:?} must be 1 to 32 of a-z, 0-9, '-', '_' (it is what requests name in \"targets\")"
                ));
            }
            let prefix = TargetPrefix::parse(prefix).map_err(|e| format!("target {name}: {e}"))?;
            if let Some(twin) = out.iter().find(|t| t.name == name) {
                return Err(format!("target name {:?} is given twice", twin.name));
            }
            if let Some(other) = out.iter().find(|t| {
                t.prefix.contains(&prefix.repo())
                    || prefix.contains(&t.prefix.repo())
                    || t.prefix.repo() == prefix.repo()
            }) {
                return Err(format!(
                    "targets {} ({}) and {name} ({}) overlap; give each target its own prefix",
                    other.name,
                    other.prefix.repo(),
                    prefix.repo()
                ));
            }
            out.push(Target {
                name: name.to_string(),
                prefix,
            });
        }
        if out.is_empty() {
            return Err(
                "no targets; write name=registry/prefix,… such as ghcr=ghcr.io/acme/mirror".into(),
            );
        }
        Ok(Targets(out))
    }

    /// Every target, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.0.iter()
    }

    /// Every target, mutably (to set their layouts).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Target> {
        self.0.iter_mut()
    }

    /// The targets `names` picks (each once, in the order given), or every target when `None`;
    /// an unknown name is an error naming the known ones.
    pub fn select(&self, names: Option<&[String]>) -> Result<Vec<&Target>, String> {
        let Some(names) = names else {
            return Ok(self.0.iter().collect());
        };
        if names.is_empty() {
            return Err(format!(
                "\"targets\" is empty; name one or more of {}, or leave it out for all",
                self.names()
            ));
        }
        let mut out: Vec<&Target> = Vec::new();
        for n in names {
            let t = self.0.iter().find(|t| &t.name == n).ok_or_else(|| {
                format!(
                    "target {n:?} is not configured; known targets: {}",
                    self.names()
                )
            })?;
            if !out.iter().any(|o| o.name == t.name) {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// The target whose prefix holds `repo`.
    pub fn containing(&self, repo: &str) -> Option<&Target> {
        self.0.iter().find(|t| t.prefix.contains(repo))
    }

    /// The names, comma-separated (for messages).
    pub fn names(&self) -> String {
        self.0
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The prefixes, comma-separated (for messages and the status page).
    pub fn repos(&self) -> String {
        self.0
            .iter()
            .map(|t| t.prefix.repo())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Sources that may be mirrored: registries, registry/path prefixes, and `*.suffix` host wildcards.
#[derive(Debug, Clone)]
pub struct AllowList(Vec<(String, String)>);

/// The well-known public registries, allowed when `MIRROR_ALLOWED_SOURCES` is not set.
pub const DEFAULT_ALLOWED_SOURCES: &str = "docker.io,gcr.io,*.gcr.io,registry.k8s.io,k8s.gcr.io,quay.io,ghcr.io,public.ecr.aws,mcr.microsoft.com,*.pkg.dev,nvcr.io,registry.gitlab.com,docker.elastic.co,cgr.dev";

impl AllowList {
    /// Parses a comma-separated list: `docker.io`, `gcr.io/kaniko-project`, `*.pkg.dev`.
    pub fn parse(s: &str) -> Result<AllowList, String> {
        let mut out = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (host, path) = entry.split_once('/').unwrap_or((entry, ""));
            let host = match host.to_ascii_lowercase().as_str() {
                "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
                h => h.to_string(),
            };
            let bare = host.strip_prefix("*.").unwrap_or(&host);
            if bare.is_empty() || bare.contains('*') || bare.contains(char::is_whitespace) {
                return Err(format!(
                    "{entry:?} is not a registry, registry/path prefix or *.domain wildcard"
                ));
            }
            out.push((host, path.trim_matches('/').to_string()));
        }
        if out.is_empty() {
            return Err("the list is empty; name at least one registry".into());
        }
        Ok(AllowList(out))
    }

    /// The hosts named exactly (not by wildcard): the operator vouches for where they resolve.
    pub fn exact_hosts(&self) -> Vec<String> {
        self.0
            .iter()
            .filter(|(h, _)| !h.starts_with("*."))
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// Whether `source` may be mirrored.
    pub fn allows(&self, source: &ImageRef) -> bool {
        let host = source.registry().to_ascii_lowercase();
        let repo = source.repository();
        self.0.iter().any(|(h, path)| {
            let host_ok = match h.strip_prefix("*.") {
                Some(suffix) => host.ends_with(&format!(".{suffix}")),
                None => &host == h,
            };
            host_ok
                && (path.is_empty()
                    || repo == path
                    || repo
                        .strip_prefix(path.as_str())
                        .is_some_and(|r| r.starts_with('/')))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_targets_parse_select_and_refuse_what_is_wrong() {
        let t = Targets::parse("ghcr=ghcr.io/acme/mirror, home=registry.example.cn/acme").unwrap();
        assert_eq!(t.names(), "ghcr, home");
        assert_eq!(t.repos(), "ghcr.io/acme/mirror, registry.example.cn/acme");
        let all: Vec<&str> = t
            .select(None)
            .unwrap()
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(all, ["ghcr", "home"]);
        let some = t
            .select(Some(&["home".into(), "home".into()]))
            .unwrap()
            .into_iter()
            .map(|t| t.name.clone())
            .collect::<Vec<_>>();
        assert_eq!(some, ["home"]);
        assert_eq!(
            t.select(Some(&["cn".into()])).unwrap_err(),
            "target \"cn\" is not configured; known targets: ghcr, home"
        );
        assert!(t.select(Some(&[])).unwrap_err().contains("is empty"));
        assert_eq!(
            t.containing("registry.example.cn/acme/x")
                .map(|t| t.name.as_str()),
            Some("home")
        );
        for (bad, why) in [
            ("ghcr.io/acme", "has no name"),
            ("G=ghcr.io/a", "must be 1 to 32"),
            ("a=ghcr.io/x,a=quay.io/y", "given twice"),
            ("a=ghcr.io/x,b=ghcr.io/x/y", "overlap"),
            ("a=nohost", "does not name a registry"),
            ("", "no targets"),
        ] {
            let e = Targets::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn src(s: &str) -> ImageRef {
        ImageRef::parse_source(s).unwrap()
    }

    #[test]
    fn maps_one_to_one() {
        let p = TargetPrefix::parse("ghcr.io/acme/mirror").unwrap();
        assert_eq!(
            p.repo_for(&src("gcr.io/kaniko-project/executor:v1.8.1"))
                .unwrap(),
            "ghcr.io/acme/mirror/gcr.io/kaniko-project/executor"
        );
        assert_eq!(
            p.repo_for(&src("nginx")).unwrap(),
            "ghcr.io/acme/mirror/docker.io/library/nginx"
        );
        assert_eq!(
            p.repo_for(&src("localhost:5000/a/b")).unwrap(),
            "ghcr.io/acme/mirror/localhost_5000/a/b"
        );
        // The same path on two registries, or with and without a port, never collides.
        assert_ne!(
            p.repo_for(&src("localhost:5000/a")).unwrap(),
            p.repo_for(&src("localhost/a")).unwrap()
        );
        assert!(p.contains("ghcr.io/acme/mirror/docker.io/library/nginx"));
        assert!(!p.contains("ghcr.io/acme/mirrorx/y"));
        let local = TargetPrefix::parse("127.0.0.1:5001").unwrap();
        assert_eq!(
            local.repo_for(&src("quay.io/a/b")).unwrap(),
            "127.0.0.1:5001/quay.io/a/b"
        );
        assert!(TargetPrefix::parse("ghcr.io/acme/mirror:tag").is_err());
        assert!(TargetPrefix::parse("mirror").is_err());
    }

    #[test]
    fn flat_layout_writes_one_component() {
        let p = TargetPrefix::parse("registry.example.cn/acme")
            .unwrap()
            .with_layout(Layout::Flat);
        assert_eq!(
            p.repo_for(&src("gcr.io/kaniko-project/executor:v1.8.1"))
                .unwrap(),
            "registry.example.cn/acme/gcr.io__kaniko-project__executor"
        );
        assert_eq!(
            p.repo_for(&src("nginx")).unwrap(),
            "registry.example.cn/acme/docker.io__library__nginx"
        );
        assert_eq!(
            p.repo_for(&src("localhost:5000/a_b/c")).unwrap(),
            "registry.example.cn/acme/localhost_5000__a_b__c"
        );
        let err = p.repo_for(&src("quay.io/a__b/c")).unwrap_err();
        assert!(
            err.contains("\"__\"") && err.contains("nested layout"),
            "{err}"
        );
        let long = format!("quay.io/{}", ["abcdefghij"; 22].join("/"));
        let err = p.repo_for(&src(&long)).unwrap_err();
        assert!(err.contains("longer than 255"), "{err}");
        assert_eq!("FLAT".parse::<Layout>().unwrap(), Layout::Flat);
        assert!("deep".parse::<Layout>().unwrap_err().contains("nested"));
    }

    #[test]
    fn reverse_mapping_names_the_owner_only_for_mapped_names() {
        for layout in [Layout::Nested, Layout::Flat] {
            let p = TargetPrefix::parse("127.0.0.1:5001/acme")
                .unwrap()
                .with_layout(layout);
            let mapped = p.repo_for(&src("127.0.0.1:5000/bench/wide")).unwrap();
            assert_eq!(
                p.source_of(&mapped).as_deref(),
                Some("127.0.0.1:5000/bench/wide")
            );
            // Names of the operator's choosing are not reserved for anyone.
            assert_eq!(p.source_of("127.0.0.1:5001/acme/tools/kaniko"), None);
            assert_eq!(p.source_of("127.0.0.1:5001/acme/kaniko"), None);
            assert_eq!(p.source_of("127.0.0.1:5001/other/gcr.io/x"), None);
        }
    }

    /// Random valid sources, both layouts: the mapping is valid, reverses exactly and never
    /// maps two sources to one name.
    #[test]
    fn both_layouts_reverse_exactly_and_never_collide() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alnum = |rng: &mut rand::rngs::StdRng, n: usize| -> String {
            (0..n)
                .map(|_| b"abz09"[rng.random_range(0..5)] as char)
                .collect()
        };
        let seps = [".", "_", "__", "-", "--"];
        for layout in [Layout::Nested, Layout::Flat] {
            let p = TargetPrefix::parse("registry.example.cn/acme")
                .unwrap()
                .with_layout(layout);
            let mut seen = std::collections::HashMap::new();
            for _ in 0..5000 {
                let host = match rng.random_range(0..4) {
                    0 => "gcr.io".to_string(),
                    1 => format!("{}.io", alnum(&mut rng, 2)),
                    2 => format!("localhost:{}", rng.random_range(1..99)),
                    _ => format!("10.0.0.{}:5000", rng.random_range(1..9)),
                };
                let parts: Vec<String> = (0..rng.random_range(1..4))
                    .map(|_| {
                        let n = rng.random_range(1..3);
                        let mut c = alnum(&mut rng, n);
                        if rng.random_bool(0.5) {
                            c.push_str(seps[rng.random_range(0..seps.len())]);
                            c.push_str(&alnum(&mut rng, 1));
                        }
                        c
                    })
                    .collect();
                let Ok(source) = ImageRef::parse(&format!("{host}/{}", parts.join("/"))) else {
                    continue;
                };
                let name = source.repo_name();
                match p.repo_for(&source) {
                    Ok(repo) => {
                        let parsed = ImageRef::parse(&repo)
                            .unwrap_or_else(|e| panic!("{repo} is not a valid name: {e}"));
                        assert_eq!(parsed.repo_name(), repo);
                        if layout == Layout::Flat {
                            assert_eq!(repo.matches('/').count(), 2, "{repo}");
                        }
                        assert_eq!(p.source_of(&repo).as_deref(), Some(name.as_str()), "{repo}");
                        if let Some(other) = seen.insert(repo.clone(), name.clone()) {
                            assert_eq!(other, name, "{other} and {name} both map to {repo}");
                        }
                    }
                    Err(e) => {
                        assert_eq!(layout, Layout::Flat, "{name}: {e}");
                        assert!(name.contains("__"), "{name}: {e}");
                    }
                }
            }
            assert!(seen.len() > 1000, "{}", seen.len());
        }
    }

    #[test]
    fn allow_list_matches_hosts_prefixes_and_wildcards() {
        let a = AllowList::parse(DEFAULT_ALLOWED_SOURCES).unwrap();
        assert!(a.allows(&src("nginx")));
        assert!(a.allows(&src("us-docker.pkg.dev/p/r/i:1")));
        assert!(a.allows(&src("eu.gcr.io/p/i")));
        assert!(!a.allows(&src("evil.example/x")));
        assert!(!a.allows(&src("pkg.dev.evil.example/x")));
        let a = AllowList::parse("gcr.io/kaniko-project, 127.0.0.1:5000").unwrap();
        assert!(a.allows(&src("gcr.io/kaniko-project/executor")));
        assert!(!a.allows(&src("gcr.io/kaniko-projectx/executor")));
        assert!(!a.allows(&src("gcr.io/other/executor")));
        assert!(a.allows(&src("127.0.0.1:5000/x")));
        assert!(AllowList::parse(" , ").is_err());
    }
}
