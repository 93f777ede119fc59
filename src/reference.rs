//! Image references, parsed and normalised at the edge the way Docker does:
//! `nginx` → `docker.io/library/nginx:latest`. After parsing, the parts are trusted.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// Longest repository path accepted (as CNCF distribution).
pub const MAX_NAME_LEN: usize = 255;

/// Why a string is not an image reference; each names the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("the reference is empty; write one such as gcr.io/kaniko-project/executor:v1.8.1")]
    Empty,
    #[error("{input:?} has a URL scheme; remove it (write gcr.io/x, not https://gcr.io/x)")]
    Scheme { input: String },
    #[error(
        "{input:?} has user information before '@'; put credentials in the Docker config, not in the reference"
    )]
    Userinfo { input: String },
    #[error("registry host {host:?} is not valid: {reason}")]
    InvalidHost { host: String, reason: String },
    #[error("{input:?} has an empty path component (a leading, trailing or double '/')")]
    EmptyComponent { input: String },
    #[error(
        "repository path component {index} of {input:?} is {component:?}; '.' and '..' are not allowed"
    )]
    DotComponent {
        input: String,
        index: usize,
        component: String,
    },
    #[error(
        "repository path component {index} {component:?} has uppercase letters; repository names are lowercase: {suggestion:?}"
    )]
    Uppercase {
        index: usize,
        component: String,
        suggestion: String,
    },
    #[error(
        "repository path component {index} {component:?} is not valid: use lowercase letters and digits, separated by '.', '_', '__' or dashes"
    )]
    InvalidComponent { index: usize, component: String },
    #[error("the repository name is {len} characters long; at most {MAX_NAME_LEN} are allowed")]
    NameTooLong { len: usize },
    #[error(
        "tag {tag:?} is not valid: up to 128 characters of letters, digits, '_', '.' and '-', not starting with '.' or '-'"
    )]
    InvalidTag { tag: String },
    #[error("the digest part {digest:?} is not valid: {source}")]
    InvalidDigest {
        digest: String,
        #[source]
        source: DigestError,
    },
}

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageRef {
    /// Parses a reference without defaulting the tag (`localhost:5000/foo` has no tag).
    pub fn parse(input: &str) -> Result<ImageRef, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if input.contains("://") {
            return Err(ReferenceError::Scheme {
                input: input.to_string(),
            });
        }
        let (rest, digest) = match input.rsplit_once('@') {
            Some((_, after)) if after.contains('/') => {
                return Err(ReferenceError::Userinfo {
                    input: input.to_string(),
                });
            }
            Some((before, d)) => {
                if before.contains('@') {
                    return Err(ReferenceError::Userinfo {
                        input: input.to_string(),
                    });
                }
                let digest = Digest::parse(d).map_err(|source| ReferenceError::InvalidDigest {
                    digest: d.to_string(),
                    source,
                })?;
                (before, Some(digest))
            }
            None => (input, None),
        };
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(i) if last_slash.is_none_or(|s| i > s) => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(t) = tag {
            validate_tag(t)?;
        }
        if name.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if looks_like_host(first) => {
                (normalise_host(first)?, path.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let repository = if registry == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        validate_path(input, &repository)?;
        Ok(ImageRef {
            registry,
            repository,
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// Parses a source reference: without a tag or digest, the tag is `latest`.
    pub fn parse_source(input: &str) -> Result<ImageRef, ReferenceError> {
        let mut r = ImageRef::parse(input)?;
        if r.tag.is_none() && r.digest.is_none() {
            r.tag = Some("latest".into());
        }
        Ok(r)
    }

    /// The normalised registry (`docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host to talk HTTP to (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// The repository path (`library/nginx`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `registry/repository`.
    pub fn repo_name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same reference with another tag.
    pub fn with_tag(mut self, tag: Option<String>) -> ImageRef {
        self.tag = tag;
        self
    }

    /// The same reference with another digest.
    pub fn with_digest(mut self, digest: Option<Digest>) -> ImageRef {
        self.digest = digest;
        self
    }

    /// The interop reference type of `oci-spec` (which `oci-client` re-exports).
    pub fn to_oci(&self) -> oci_spec::distribution::Reference {
        use oci_spec::distribution::Reference;
        let (r, p) = (self.registry.clone(), self.repository.clone());
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => Reference::with_tag_and_digest(r, p, t.clone(), d.to_string()),
            (None, Some(d)) => Reference::with_digest(r, p, d.to_string()),
            (Some(t), None) => Reference::with_tag(r, p, t.clone()),
            (None, None) => Reference::with_tag(r, p, "latest".into()),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageRef {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(s)
    }
}

/// Docker's rule: the first component is a registry if it has a '.' or ':', is `localhost`, or has
/// uppercase letters (repository paths cannot).
fn looks_like_host(first: &str) -> bool {
    first.contains(['.', ':'])
        || first == "localhost"
        || first.chars().any(|c| c.is_ascii_uppercase())
}

fn normalise_host(host: &str) -> Result<String, ReferenceError> {
    let bad = |reason: &str| ReferenceError::InvalidHost {
        host: host.to_string(),
        reason: reason.to_string(),
    };
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("an IPv6 address needs its closing ']'"))?;
        inside
            .parse::<Ipv6Addr>()
            .map_err(|_| bad("the text in brackets is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| bad("expected ':port' after ']'"))?,
            ),
        };
        (&host[..rest.len() - after.len() + 1], port)
    } else {
        match host.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    if let Some(p) = port {
        match p.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) && !p.starts_with('0') => {}
            _ => return Err(bad(&format!("port {p:?} is not a number from 1 to 65535"))),
        }
    }
    if !name.starts_with('[') {
        if name.is_empty() || name.len() > 253 {
            return Err(bad("the host name is empty or too long"));
        }
        for label in name.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(bad(&format!(
                    "label {label:?} must be letters, digits and '-', not starting or ending with '-'"
                )));
            }
        }
    }
    let lower = host.to_ascii_lowercase();
    Ok(match lower.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        _ => host.to_string(),
    })
}

fn validate_path(input: &str, path: &str) -> Result<(), ReferenceError> {
    if path.len() > MAX_NAME_LEN {
        return Err(ReferenceError::NameTooLong { len: path.len() });
    }
    for (i, component) in path.split('/').enumerate() {
        let index = i + 1;
        if component.is_empty() {
            return Err(ReferenceError::EmptyComponent {
                input: input.to_string(),
            });
        }
        if component == "." || component == ".." {
            return Err(ReferenceError::DotComponent {
                input: input.to_string(),
                index,
                component: component.to_string(),
            });
        }
        if component_ok(&component.to_ascii_lowercase())
            && component.chars().any(|c| c.is_ascii_uppercase())
        {
            return Err(ReferenceError::Uppercase {
                index,
                component: component.to_string(),
                suggestion: component.to_ascii_lowercase(),
            });
        }
        if !component_ok(component) {
            return Err(ReferenceError::InvalidComponent {
                index,
                component: component.to_string(),
            });
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b.iter().all(|&x| word(x) || x == b'.' || x == b'-');
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::InvalidTag {
            tag: tag.to_string(),
        })
    }
}

/// Whether `host` (with or without a port) is loopback: `localhost`, `127.0.0.0/8` or `[::1]`.
pub fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        return rest
            .split(']')
            .next()
            .and_then(|h| h.parse::<Ipv6Addr>().ok())
            .is_some_and(|a| a.is_loopback());
    } else {
        host.split(':').next().unwrap_or(host)
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn normalises_like_docker() {
        let cases = [
            ("nginx", "docker.io/library/nginx:latest"),
            ("library/nginx", "docker.io/library/nginx:latest"),
            ("docker.io/nginx", "docker.io/library/nginx:latest"),
            ("index.docker.io/nginx", "docker.io/library/nginx:latest"),
            (
                "registry-1.docker.io/library/nginx:1.25",
                "docker.io/library/nginx:1.25",
            ),
            (
                "gcr.io/kaniko-project/executor:v1.8.1",
                "gcr.io/kaniko-project/executor:v1.8.1",
            ),
            ("localhost:5000/a/b", "localhost:5000/a/b:latest"),
            ("localhost/a", "localhost/a:latest"),
            (
                &format!("127.0.0.1:5000/x@{D}"),
                &format!("127.0.0.1:5000/x@{D}"),
            ),
            ("[::1]:5000/x:t", "[::1]:5000/x:t"),
            (
                &format!("ghcr.io/a/b:tag@{D}"),
                &format!("ghcr.io/a/b:tag@{D}"),
            ),
            ("foo_bar.com:8080", "docker.io/library/foo_bar.com:8080"),
            (
                "a__b/c--d/e.f_g:T_1.x-y",
                "docker.io/a__b/c--d/e.f_g:T_1.x-y",
            ),
        ];
        for (input, want) in cases {
            let r = ImageRef::parse_source(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_string(), want, "{input}");
            assert_eq!(
                ImageRef::parse(&r.to_string()).unwrap(),
                r,
                "{input} round-trips"
            );
        }
        let r = ImageRef::parse("localhost:5000/foo").unwrap();
        assert_eq!(r.tag(), None, "parse does not default the tag");
        assert_eq!(
            ImageRef::parse_source("nginx").unwrap().api_host(),
            "registry-1.docker.io"
        );
        let oci = ImageRef::parse_source("nginx").unwrap().to_oci();
        assert_eq!(oci.whole(), "docker.io/library/nginx:latest");
    }

    #[test]
    fn refuses_bad_references_naming_the_part() {
        let long = format!("a/{}", "b".repeat(300));
        let long_tag = format!("x:{}", "t".repeat(129));
        let cases: Vec<(&str, &str)> = vec![
            ("", "empty"),
            ("Nginx/Foo", "uppercase"),
            ("NGINX", "uppercase"),
            ("gcr.io/UPPER/x", "uppercase"),
            ("gcr.io/a/../b", "'..'"),
            ("https://gcr.io/x", "scheme"),
            ("user@gcr.io/x", "user information"),
            ("gcr.io:99999/x", "port"),
            ("x:", "tag"),
            ("x@sha256:abc", "digest part"),
            ("x@md5:d41d8cd98f00b204e9800998ecf8427e", "not supported"),
            ("x:tag with space", "tag"),
            ("gcr.io/x/", "empty path component"),
            (&long, "255"),
            (&long_tag, "tag"),
            ("gcr.io/a$b", "component 1"),
            ("-gcr.io/x", "label"),
        ];
        for (input, want) in cases {
            let e = ImageRef::parse(input).expect_err(input).to_string();
            assert!(e.contains(want), "{input:?}: {e}");
        }
    }

    #[test]
    fn random_strings_never_panic_and_round_trip() {
        let alphabet = b"aZ09._-:/@[]x";
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut s = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 24) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s.push(alphabet[(state % alphabet.len() as u64) as usize] as char);
            }
            if let Ok(r) = ImageRef::parse(&s) {
                assert_eq!(ImageRef::parse(&r.to_string()).as_ref(), Ok(&r), "{s:?}");
            }
        }
    }

    /// Property: over generated references (no ports, lowercase names), we accept exactly what the
    /// distribution grammar (oci-spec's regex-based parser, an independent implementation) accepts,
    /// and normalise to the same string.
    #[test]
    fn accepts_exactly_what_the_distribution_grammar_accepts() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let name_chars = b"ab0._-";
        let tag_chars = b"aZ9._-";
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..30_000 {
            let mut s = String::new();
            let components = 1 + next(3);
            for c in 0..components {
                if c > 0 {
                    s.push('/');
                }
                let len = next(7) as usize;
                for _ in 0..len {
                    s.push(name_chars[next(name_chars.len() as u64) as usize] as char);
                }
            }
            // Docker reads a first component with a '.' as a host; `_` cannot be in a host name,
            // where the regex falls back to a path: a documented difference, left out here.
            if let Some((first, _)) = s.split_once('/')
                && first.contains('.')
                && first.contains('_')
            {
                continue;
            }
            if next(3) == 0 {
                s.push(':');
                for _ in 0..next(6) {
                    s.push(tag_chars[next(tag_chars.len() as u64) as usize] as char);
                }
            }
            if next(4) == 0 {
                let hex: String = (0..(60 + next(8)))
                    .map(|_| b"0123456789abcdef"[next(16) as usize] as char)
                    .collect();
                s.push_str(&format!("@sha256:{hex}"));
            }
            let ours = ImageRef::parse_source(&s);
            let oracle = oci_spec::distribution::Reference::try_from(s.as_str());
            match (&ours, &oracle) {
                (Ok(o), Ok(r)) => {
                    assert_eq!(o.to_string(), r.whole(), "{s:?} normalises alike");
                    accepted += 1;
                }
                (Err(_), Err(_)) => refused += 1,
                _ => panic!("{s:?}: ours {ours:?}, distribution grammar {oracle:?}"),
            }
        }
        assert!(
            accepted > 1000 && refused > 1000,
            "both sides exercised: {accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:5000",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["gcr.io", "10.0.0.1:5000", "[::2]:1", "localhost.evil.com"] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
