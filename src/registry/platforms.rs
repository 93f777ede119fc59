//! Platform subsets (`copy --platform`): which children of an index are copied, and the index
//! rebuilt from them when there are several. The children keep their official digests; a rebuilt
//! index has a new digest that no official index has, and is reported as such.

use std::collections::HashSet;

use bytes::Bytes;
use serde_json::Value;

use super::error::{Error, Result};
use super::manifest::Manifest;
use crate::digest::Digest;

/// The annotation an attestation manifest's index entry carries (BuildKit).
const REFERENCE_TYPE: &str = "vnd.docker.reference.type";
/// The child an attestation is about.
const REFERENCE_DIGEST: &str = "vnd.docker.reference.digest";

/// The annotation a rebuilt index carries: the official index it was cut from.
pub const SUBSET_OF: &str = "dev.mirror-mirror.subset-of";

/// A platform asked for: `os/arch` or `os/arch/variant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl std::str::FromStr for PlatformSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        let bad = || {
            format!(
                "{s:?} is not a platform: write os/arch or os/arch/variant (linux/amd64, linux/arm/v7)"
            )
        };
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        if parts.iter().any(|p| {
            !p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        }) {
            return Err(bad());
        }
        Ok(PlatformSpec {
            os: parts[0].to_ascii_lowercase(),
            architecture: parts[1].to_ascii_lowercase(),
            variant: parts.get(2).map(|v| v.to_ascii_lowercase()),
        })
    }
}

impl std::fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl PlatformSpec {
    /// Whether a platform (`os`, `architecture`, `variant`) is this one; no variant asked matches any.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == architecture
            && self.variant.as_deref().is_none_or(|v| Some(v) == variant)
    }
}

/// Parses the platforms a request lists (`what` names the list in messages, e.g. `platforms`):
/// every entry must be `os/arch[/variant]`, and the list must not be empty. The message names the
/// bad entry by its position and says what to write.
pub fn parse_list(what: &str, items: &[String]) -> std::result::Result<Vec<PlatformSpec>, String> {
    if items.is_empty() {
        return Err(format!(
            "{what} is empty: name at least one platform as os/arch[/variant] (linux/amd64), or leave {what} out to mirror every platform"
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, s)| s.parse().map_err(|e| format!("{what}[{i}]: {e}")))
        .collect()
}

/// A platform as an index or a config gives it: (os, architecture, variant).
pub type Triple = (String, String, Option<String>);

/// One child chosen for a platform asked for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Chosen {
    /// The platform as the index lists it (`linux/arm64/v8`).
    pub platform: String,
    /// The child's official digest (as the source index lists it).
    pub digest: Digest,
    /// Attestation manifests that refer to it (`unknown/unknown` entries), copied with it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attestations: Vec<Digest>,
}

/// What a subset of `index` copies.
#[derive(Debug, Clone)]
pub struct Selection {
    /// One per platform asked for, in the order asked.
    pub chosen: Vec<Chosen>,
    /// The index holding only the chosen entries and their attestations, in the source's order.
    pub rebuilt: Manifest,
}

fn platform_of(entry: &Value) -> Option<Triple> {
    let p = entry.get("platform")?;
    let s = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_string);
    Some((s("os")?, s("architecture")?, s("variant")))
}

fn annotation<'a>(entry: &'a Value, key: &str) -> Option<&'a str> {
    entry.get("annotations")?.get(key)?.as_str()
}

fn show((os, arch, variant): &Triple) -> String {
    match variant {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    }
}

fn is_attestation(entry: &Value) -> bool {
    annotation(entry, REFERENCE_TYPE) == Some("attestation-manifest")
        || platform_of(entry).is_some_and(|(os, arch, _)| os == "unknown" && arch == "unknown")
}

/// Chooses the children of `index` (named `what` in messages) for `specs`. A platform the index
/// lacks, or one that names several of its children, is refused with the platforms it has.
pub fn select(what: &str, index: &Manifest, specs: &[PlatformSpec]) -> Result<Selection> {
    let invalid = |reason: String| Error::InvalidManifest {
        reference: what.to_string(),
        reason,
    };
    let mut v: Value =
        serde_json::from_slice(&index.bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let entries = v
        .get("manifests")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| invalid("an index without a manifests array".into()))?;
    let platforms: Vec<(usize, Triple)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| !is_attestation(e))
        .filter_map(|(i, e)| platform_of(e).map(|p| (i, p)))
        .collect();
    let available = || {
        let mut names: Vec<String> = platforms.iter().map(|(_, p)| show(p)).collect();
        names.dedup();
        names.join(", ")
    };
    let digest_of = |e: &Value| -> Result<Digest> {
        e.get("digest")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("an index entry without a digest".into()))?
            .parse()
            .map_err(|e| invalid(format!("an index entry's digest: {e}")))
    };
    let mut chosen = Vec::new();
    let mut keep: HashSet<usize> = HashSet::new();
    for spec in specs {
        let hits: Vec<&(usize, Triple)> = platforms
            .iter()
            .filter(|(_, (os, arch, var))| spec.matches(os, arch, var.as_deref()))
            .collect();
        let (i, p) = match hits.as_slice() {
            [] => {
                return Err(Error::Refused {
                    reason: format!("{what} has no platform {spec}; it has {}", available()),
                });
            }
            [one] => one,
            many => {
                return Err(Error::Refused {
                    reason: format!(
                        "platform {spec} names {} children of {what} ({}): name one exactly; it has {}",
                        many.len(),
                        many.iter()
                            .map(|(_, p)| show(p))
                            .collect::<Vec<_>>()
                            .join(", "),
                        available()
                    ),
                });
            }
        };
        if !keep.insert(*i) {
            continue;
        }
        let digest = digest_of(&entries[*i])?;
        let mut attestations = Vec::new();
        let named = digest.to_string();
        for (j, e) in entries.iter().enumerate() {
            if is_attestation(e) && annotation(e, REFERENCE_DIGEST) == Some(named.as_str()) {
                keep.insert(j);
                attestations.push(digest_of(e)?);
            }
        }
        chosen.push(Chosen {
            platform: show(p),
            digest,
            attestations,
        });
    }
    let kept: Vec<Value> = entries
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, e)| e)
        .collect();
    v["manifests"] = Value::Array(kept);
    v["annotations"][SUBSET_OF] = Value::String(format!("{what}@{}", index.digest));
    let bytes = Bytes::from(serde_json::to_vec(&v).map_err(|e| Error::Invalid(e.to_string()))?);
    let digest = Digest::sha256_of(&bytes);
    let rebuilt = Manifest::new(
        format!("{what} (subset)"),
        bytes,
        Some(index.media_type.clone()),
        digest,
    )?;
    Ok(Selection { chosen, rebuilt })
}

/// The platform an image config (`os`, `architecture`, `variant`) gives, if it says.
pub fn config_platform(config: &[u8]) -> Option<Triple> {
    let v: Value = serde_json::from_slice(config).ok()?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Some((s("os")?, s("architecture")?, s("variant")))
}

/// `os/arch[/variant]` as shown in messages.
pub fn show_platform(p: &Triple) -> String {
    show(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: Value) -> Manifest {
        let bytes = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": entries,
            }))
            .unwrap(),
        );
        let d = Digest::sha256_of(&bytes);
        Manifest::new(
            "r/x".into(),
            bytes,
            Some("application/vnd.oci.image.index.v1+json".into()),
            d,
        )
        .unwrap()
    }

    fn entry(n: u8, os: &str, arch: &str, variant: Option<&str>) -> Value {
        let mut p = serde_json::json!({"os": os, "architecture": arch});
        if let Some(v) = variant {
            p["variant"] = v.into();
        }
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": Digest::sha256_of(&[n]).to_string(),
            "size": 10,
            "platform": p,
        })
    }

    #[test]
    fn parses_platforms() {
        let p: PlatformSpec = "linux/arm/v7".parse().unwrap();
        assert_eq!(p.variant.as_deref(), Some("v7"));
        assert_eq!(p.to_string(), "linux/arm/v7");
        assert!("linux".parse::<PlatformSpec>().is_err());
        assert!("linux//x".parse::<PlatformSpec>().is_err());
        assert!("a/b/c/d".parse::<PlatformSpec>().is_err());
        let list = |v: &[&str]| {
            parse_list(
                "platforms",
                &v.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            list(&["Linux/AMD64"]).unwrap()[0].to_string(),
            "linux/amd64"
        );
        let e = list(&["linux/amd64", "amd64"]).unwrap_err();
        assert!(
            e.starts_with("platforms[1]: \"amd64\" is not a platform: write os/arch"),
            "{e}"
        );
        assert!(list(&[]).unwrap_err().contains("platforms is empty"));
    }

    #[test]
    fn chooses_children_and_their_attestations() {
        let amd = entry(1, "linux", "amd64", None);
        let arm = entry(2, "linux", "arm64", Some("v8"));
        let mut att = entry(3, "unknown", "unknown", None);
        att["annotations"] = serde_json::json!({
            REFERENCE_TYPE: "attestation-manifest",
            REFERENCE_DIGEST: amd["digest"],
        });
        let idx = index(serde_json::json!([amd, arm, att]));
        let s = select("r/x", &idx, &["linux/amd64".parse().unwrap()]).unwrap();
        assert_eq!(s.chosen.len(), 1);
        assert_eq!(s.chosen[0].attestations, vec![Digest::sha256_of(&[3])]);
        assert_eq!(s.rebuilt.manifests.len(), 2);
        assert_ne!(s.rebuilt.digest, idx.digest);
        let s = select("r/x", &idx, &["linux/arm64".parse().unwrap()]).unwrap();
        assert_eq!(s.chosen[0].platform, "linux/arm64/v8");
        assert!(s.chosen[0].attestations.is_empty());
        let e = select("r/x", &idx, &["linux/s390x".parse().unwrap()]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("has no platform linux/s390x"), "{msg}");
        assert!(msg.contains("linux/amd64, linux/arm64/v8"), "{msg}");
        assert!(!msg.contains("unknown"), "{msg}");
    }

    #[test]
    fn an_ambiguous_platform_is_refused() {
        let idx = index(serde_json::json!([
            entry(1, "linux", "arm", Some("v6")),
            entry(2, "linux", "arm", Some("v7")),
        ]));
        let e = select("r/x", &idx, &["linux/arm".parse().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("name one exactly"), "{e}");
        assert!(select("r/x", &idx, &["linux/arm/v7".parse().unwrap()]).is_ok());
    }
}
