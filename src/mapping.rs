//! Where a source lands under `MIRROR_TARGET`, and which sources `MIRROR_ALLOWED_SOURCES` admits.
//!
//! A source maps one-to-one and without collisions: `gcr.io/kaniko-project/executor:v1.8.1` under
//! `ghcr.io/acme/mirror` becomes `ghcr.io/acme/mirror/gcr.io/kaniko-project/executor:v1.8.1`. A registry
//! port, which cannot appear in a path, is written with `_` (`localhost:5000` → `localhost_5000`);
//! host names cannot contain `_`, so the mapping reverses exactly.

use crate::reference::ImageRef;

/// The repository prefix mirrors are written under (`ghcr.io/acme/mirror`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPrefix {
    /// Registry host (`ghcr.io`, `127.0.0.1:5001`).
    pub registry: String,
    /// Path under it (`acme/mirror`); may be empty.
    pub path: String,
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
        })
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
        let mapped = format!("{}/{}", host.replace(':', "_"), source.repository());
        let full = if self.path.is_empty() {
            mapped
        } else {
            format!("{}/{mapped}", self.path)
        };
        if full.len() > 255 {
            return Err(format!(
                "the mirror repository {}/{full} would be longer than 255 characters",
                self.registry
            ));
        }
        Ok(format!("{}/{full}", self.registry))
    }

    /// Whether `repo` (registry/path) lies under this prefix.
    pub fn contains(&self, repo: &str) -> bool {
        let prefix = self.repo();
        repo.strip_prefix(&prefix)
            .is_some_and(|rest| rest.starts_with('/'))
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
