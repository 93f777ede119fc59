//! Which repositories a registry's stored credentials may be used for (against the confused
//! deputy). In `serve`, the target's registry is often a source too (`ghcr.io`), and its
//! credentials can push: anyone who may request a mirror could otherwise have the service read a
//! private repository there with them and publish it. So on the target's registry the stored
//! credentials are used only for the mirror namespace (the target prefix) and for source paths the
//! operator names as trusted (`MIRROR_TRUSTED_SOURCE_CREDENTIALS`); every other repository there
//! is read anonymously, as a stranger could. Credentials of other registries are source
//! credentials and are used for sources as before. `copy` has no restriction: its one user names
//! both images and owns both credentials, as with crane or skopeo.

use std::collections::BTreeMap;

/// Where stored credentials may be used, per registry; registries not named are unrestricted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialReach {
    /// Registry → the repository prefixes its credentials serve (the target prefix, trusted paths).
    restricted: BTreeMap<String, Vec<String>>,
}

/// The environment variable naming trusted source paths.
pub const TRUSTED_VAR: &str = "MIRROR_TRUSTED_SOURCE_CREDENTIALS";

impl CredentialReach {
    /// No restriction: every registry's credentials serve every repository on it (`copy`).
    pub fn unrestricted() -> Self {
        CredentialReach::default()
    }

    /// The service's rule: `target_registry`'s credentials serve repositories under
    /// `target_path` and under each of `trusted` (`registry/path` prefixes on the target's
    /// registry). A trusted entry elsewhere is an error: other registries' credentials are source
    /// credentials already.
    pub fn for_target(
        target_registry: &str,
        target_path: &str,
        trusted: &[String],
    ) -> Result<Self, String> {
        let mut paths = vec![target_path.trim_matches('/').to_string()];
        for t in trusted {
            let t = t.trim();
            if t.is_empty() {
                continue;
            }
            let Some((registry, path)) = t.split_once('/') else {
                return Err(format!(
                    "{TRUSTED_VAR} entry {t:?} is not registry/path: name a repository (or a prefix of repositories) on {target_registry}, such as {target_registry}/acme/public"
                ));
            };
            if !registry.eq_ignore_ascii_case(target_registry) {
                return Err(format!(
                    "{TRUSTED_VAR} entry {t:?} is on {registry}, not on the target's registry {target_registry}; only sources on the target's registry need it (credentials of other registries are always used to read their sources)"
                ));
            }
            let path = path.trim_matches('/');
            if path.is_empty() {
                return Err(format!(
                    "{TRUSTED_VAR} entry {t:?} names no path; trusting the whole registry would let any request read any private repository on it with the target's credentials, so name the repositories"
                ));
            }
            paths.push(path.to_string());
        }
        let mut restricted = BTreeMap::new();
        restricted.insert(target_registry.to_ascii_lowercase(), paths);
        Ok(CredentialReach { restricted })
    }

    /// [`CredentialReach::for_target`] for several targets: each target registry's credentials
    /// serve the prefixes of every target on it, and the trusted entries on it. A trusted entry
    /// on none of the target registries is an error.
    pub fn for_targets(targets: &[(String, String)], trusted: &[String]) -> Result<Self, String> {
        let mut restricted: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (registry, path) in targets {
            let mine: Vec<String> = trusted
                .iter()
                .filter(|t| {
                    t.trim()
                        .split_once('/')
                        .is_some_and(|(r, _)| r.eq_ignore_ascii_case(registry))
                })
                .cloned()
                .collect();
            let one = CredentialReach::for_target(registry, path, &mine)?;
            for (r, paths) in one.restricted {
                let entry = restricted.entry(r).or_default();
                for p in paths {
                    if !entry.contains(&p) {
                        entry.push(p);
                    }
                }
            }
        }
        if let Some(stray) = trusted.iter().map(|t| t.trim()).find(|t| {
            !t.is_empty()
                && !targets.iter().any(|(r, _)| {
                    t.split_once('/')
                        .is_some_and(|(tr, _)| tr.eq_ignore_ascii_case(r))
                })
        }) {
            // The one-target rule says why, in its words.
            let (registry, path) = &targets[0];
            CredentialReach::for_target(registry, path, &[stray.to_string()])?;
        }
        Ok(CredentialReach { restricted })
    }

    /// Whether the credentials stored for `registry` may be used for repository `name` on it.
    pub fn allows(&self, registry: &str, name: &str) -> bool {
        match self.restricted.get(&registry.to_ascii_lowercase()) {
            None => true,
            Some(prefixes) => prefixes.iter().any(|p| {
                p.is_empty()
                    || name == p
                    || (name.len() > p.len()
                        && name.starts_with(p.as_str())
                        && name.as_bytes()[p.len()] == b'/')
            }),
        }
    }

    /// Why `registry/name` is read without the stored credentials, for error messages; `None`
    /// when they are used.
    pub fn refusal(&self, registry: &str, name: &str) -> Option<String> {
        (!self.allows(registry, name)).then(|| {
            format!(
                "{registry}/{name} is read without credentials: the credentials stored for {registry} are the mirror target's, and they read only the mirror namespace and the sources named in {TRUSTED_VAR}; add {registry}/{name} there if the target's credentials may read it"
            )
        })
    }

    /// The repository a request is for, from its first scope (`repository:NAME:ACTIONS`).
    pub fn repository_of(scopes: &[String]) -> Option<&str> {
        let s = scopes.first()?.strip_prefix("repository:")?;
        Some(s.rsplit_once(':').map_or(s, |(name, _)| name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_registry_serves_its_namespace_and_trusted_paths_only() {
        let r = CredentialReach::for_target(
            "ghcr.io",
            "acme/mirror",
            &["ghcr.io/acme/public-stuff".into()],
        )
        .unwrap();
        assert!(r.allows("ghcr.io", "acme/mirror"));
        assert!(r.allows("ghcr.io", "acme/mirror/gcr.io/kaniko-project/executor"));
        assert!(r.allows("GHCR.io", "acme/public-stuff/app"));
        assert!(!r.allows("ghcr.io", "acme/private"));
        assert!(
            !r.allows("ghcr.io", "acme/mirrorx"),
            "prefixes end at a '/'"
        );
        assert!(!r.allows("ghcr.io", "acme/public-stuffing"));
        assert!(
            r.allows("gcr.io", "anything"),
            "other registries are unrestricted"
        );
        assert!(
            r.refusal("ghcr.io", "acme/private")
                .unwrap()
                .contains(TRUSTED_VAR)
        );
        assert!(CredentialReach::unrestricted().allows("ghcr.io", "acme/private"));
    }

    #[test]
    fn bad_trusted_entries_say_why() {
        let e = |t: &str| {
            CredentialReach::for_target("ghcr.io", "acme/mirror", &[t.to_string()]).unwrap_err()
        };
        assert!(e("gcr.io/x").contains("not on the target's registry"));
        assert!(e("ghcr.io").contains("not registry/path"));
        assert!(e("ghcr.io/").contains("names no path"));
    }

    #[test]
    fn repository_from_scopes() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            CredentialReach::repository_of(&s(&["repository:a/b:pull,push", "repository:c:pull"])),
            Some("a/b")
        );
        assert_eq!(CredentialReach::repository_of(&[]), None);
    }
}
