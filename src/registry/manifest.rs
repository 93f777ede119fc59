//! Manifests as exact bytes: media types, the Accept list, and the children a manifest names.
//! We parse only to find children; what we push is always the bytes we received.

use bytes::Bytes;
use oci_spec::image::MediaType;
use serde::Deserialize;

use super::error::{Error, Result};
use crate::digest::Digest;

/// Docker manifest list (multi-platform).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 1 manifests (refused: their digest cannot be kept).
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// Signed Docker schema 1 manifests.
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// The short-lived OCI artifact manifest (image-spec 1.1 release candidates).
pub const OCI_ARTIFACT_MANIFEST: &str = "application/vnd.oci.artifact.manifest.v1+json";

/// Every manifest type we copy, best first; schema 1 last so a registry sends it only when it has
/// nothing else, and we can refuse it with a clear reason.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.oci.artifact.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5, \
application/vnd.docker.distribution.manifest.v1+json;q=0.5";

/// Most entries an index may have.
pub const MAX_INDEX_ENTRIES: usize = 1000;

/// What a manifest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An OCI index or Docker manifest list: names child manifests.
    Index,
    /// An image (or artifact) manifest: names a config and layers (blobs).
    Image,
}

/// A content descriptor: the parts of it the copy needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The media type of the content it points to.
    #[serde(default)]
    pub media_type: String,
    /// The content's digest.
    pub digest: Digest,
    /// The content's size in bytes.
    pub size: u64,
    /// Non-distributable ("foreign") layers name URLs instead of living in the registry.
    #[serde(default)]
    pub urls: Vec<String>,
    /// The platform an index entry is for.
    #[serde(default)]
    pub platform: Option<Platform>,
    /// The artifact type, for index entries that are artifacts.
    #[serde(default)]
    pub artifact_type: Option<String>,
}

/// An index entry's platform.
#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`, `arm64`, `unknown` for attestations).
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// CPU variant (`v7`, `v8`).
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Parsed {
    schema_version: Option<i64>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    /// The artifact manifest's blobs.
    blobs: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
}

/// A manifest: the exact bytes, their digest and media type, and the children they name.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The bytes exactly as the source served them.
    pub bytes: Bytes,
    /// The media type (from `Content-Type`, else from the body).
    pub media_type: String,
    /// The digest of `bytes`.
    pub digest: Digest,
    /// Index or image.
    pub kind: Kind,
    /// Child manifests (for an index).
    pub manifests: Vec<Descriptor>,
    /// Blobs: the config first, then layers (for an image).
    pub blobs: Vec<Descriptor>,
    /// The manifest this one refers to (`subject`), if any.
    pub subject: Option<Descriptor>,
}

fn is_schema1(media_type: &str) -> bool {
    media_type == DOCKER_SCHEMA1 || media_type == DOCKER_SCHEMA1_SIGNED
}

fn is_index(media_type: &str) -> bool {
    media_type == MediaType::ImageIndex.to_string() || media_type == DOCKER_MANIFEST_LIST
}

fn is_image(media_type: &str) -> bool {
    media_type == MediaType::ImageManifest.to_string()
        || media_type == DOCKER_MANIFEST_V2
        || media_type == OCI_ARTIFACT_MANIFEST
}

impl Manifest {
    /// Interprets `bytes` (already checked against `digest`) served with `content_type`.
    pub fn new(
        reference: String,
        bytes: Bytes,
        content_type: Option<String>,
        digest: Digest,
    ) -> Result<Manifest> {
        let invalid = |reason: String| Error::InvalidManifest {
            reference: reference.clone(),
            reason,
        };
        if content_type.as_deref().is_some_and(is_schema1) {
            return Err(Error::Schema1 { reference });
        }
        let parsed: Parsed = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("not a JSON manifest: {e}")))?;
        if parsed.schema_version == Some(1) {
            return Err(Error::Schema1 { reference });
        }
        // The header decides, unless it is missing or generic; the body's mediaType must agree.
        let header = content_type.filter(|c| is_index(c) || is_image(c));
        let media_type = match (header, parsed.media_type.as_deref()) {
            (Some(h), Some(b)) if h != b => {
                return Err(invalid(format!(
                    "the registry served it as {h} but its mediaType says {b}"
                )));
            }
            (Some(h), _) => h,
            (None, Some(b)) if is_index(b) || is_image(b) => b.to_string(),
            (None, Some(b)) => return Err(invalid(format!("unsupported media type {b}"))),
            (None, None) if parsed.manifests.is_some() => MediaType::ImageIndex.to_string(),
            (None, None) if parsed.config.is_some() || parsed.layers.is_some() => {
                MediaType::ImageManifest.to_string()
            }
            (None, None) => return Err(invalid("it has no mediaType, manifests or layers".into())),
        };
        let kind = if is_index(&media_type) {
            Kind::Index
        } else {
            Kind::Image
        };
        let (manifests, blobs) = match kind {
            Kind::Index => {
                let manifests = parsed
                    .manifests
                    .ok_or_else(|| invalid("an index without a manifests list".into()))?;
                if manifests.len() > MAX_INDEX_ENTRIES {
                    return Err(invalid(format!(
                        "the index has {} entries; at most {MAX_INDEX_ENTRIES} are accepted",
                        manifests.len()
                    )));
                }
                (manifests, Vec::new())
            }
            Kind::Image => {
                let mut blobs = Vec::new();
                if let Some(c) = parsed.config {
                    blobs.push(c);
                } else if media_type != OCI_ARTIFACT_MANIFEST {
                    return Err(invalid("an image manifest without a config".into()));
                }
                blobs.extend(parsed.layers.unwrap_or_default());
                blobs.extend(parsed.blobs.unwrap_or_default());
                if blobs.len() > MAX_INDEX_ENTRIES {
                    return Err(invalid(format!(
                        "the manifest names {} blobs; at most {MAX_INDEX_ENTRIES} are accepted",
                        blobs.len()
                    )));
                }
                (Vec::new(), blobs)
            }
        };
        Ok(Manifest {
            bytes,
            media_type,
            digest,
            kind,
            manifests,
            blobs,
            subject: parsed.subject,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(body: &str, ct: Option<&str>) -> Result<Manifest> {
        let bytes = Bytes::from(body.to_string());
        let digest = Digest::sha256_of(&bytes);
        Manifest::new("test".into(), bytes, ct.map(str::to_string), digest)
    }

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn index_children_and_image_blobs() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D}","size":3,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#
        );
        let m = manifest(&idx, Some("application/vnd.oci.image.index.v1+json")).unwrap();
        assert_eq!(m.kind, Kind::Index);
        assert_eq!(
            m.manifests[0].platform.as_ref().unwrap().to_string(),
            "linux/arm64/v8"
        );
        let img = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{D}","size":2}},"layers":[{{"mediaType":"y","digest":"{D}","size":2,"urls":["https://x"]}}]}}"#
        );
        let m = manifest(&img, Some(DOCKER_MANIFEST_V2)).unwrap();
        assert_eq!(m.kind, Kind::Image);
        assert_eq!(m.blobs.len(), 2);
        assert_eq!(m.blobs[1].urls.len(), 1);
        assert_eq!(m.bytes, img.as_bytes(), "bytes are kept exactly");
    }

    #[test]
    fn refuses_schema1_and_disagreeing_types() {
        let e = manifest(
            r#"{"schemaVersion":1,"name":"x"}"#,
            Some("application/json"),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Schema1 { .. }), "{e}");
        let e = manifest("{}", Some(DOCKER_SCHEMA1_SIGNED)).unwrap_err();
        assert!(e.to_string().contains("schema 1"), "{e}");
        let e = manifest(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
            Some(DOCKER_MANIFEST_V2),
        )
        .unwrap_err();
        assert!(e.to_string().contains("served it as"), "{e}");
        let e = manifest(r#"{"schemaVersion":2,"mediaType":"text/x"}"#, None).unwrap_err();
        assert!(e.to_string().contains("unsupported media type"), "{e}");
    }

    #[test]
    fn refuses_bad_digests_in_descriptors() {
        let body = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"m","digest":"md5:abc","size":1}]}"#;
        assert!(manifest(body, None).is_err());
    }
}
