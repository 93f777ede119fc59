//! Builds and pushes test images with plain HTTP calls, independent of the code under test:
//! blobs, image manifests and indexes with caller-controlled bytes.

use base64::Engine as _;
use serde_json::{Value, json};

use super::registry::{Auth, Registry};
use super::sha256;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A pushed manifest.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub digest: String,
    pub bytes: Vec<u8>,
    pub media_type: String,
    /// Blob digests the manifest (and its children) name.
    pub blobs: Vec<String>,
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

/// `len` deterministic bytes in 1 MiB pieces: a pseudo-random block for `seed`, each piece
/// stamped with its index (so no two pieces are alike), generated as they are read.
pub fn generated(
    seed: u64,
    len: u64,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    const PIECE: u64 = 1 << 20;
    let block = bytes::Bytes::from(bytes(seed, PIECE as usize));
    futures_util::stream::iter((0..len.div_ceil(PIECE)).map(move |i| {
        let n = PIECE.min(len - i * PIECE) as usize;
        let mut piece = block[..n].to_vec();
        for (b, s) in piece.iter_mut().zip((i as u32).to_le_bytes()) {
            *b = s;
        }
        Ok(bytes::Bytes::from(piece))
    }))
}

/// Pushes to one registry, authenticating as its harness user.
pub struct Pusher {
    http: reqwest::Client,
    base: String,
    auth: Auth,
}

impl Pusher {
    pub fn new(reg: &Registry) -> Pusher {
        Pusher {
            http: reg.http(),
            base: reg.url(),
            auth: reg.auth.clone(),
        }
    }

    fn authz(&self, repo: &str) -> Option<String> {
        match &self.auth {
            Auth::Anonymous => None,
            Auth::Basic { user, pass } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            )),
            Auth::Token { issuer } => {
                Some(format!("Bearer {}", issuer.mint(repo, "pull,push,delete")))
            }
        }
    }

    fn req(&self, method: reqwest::Method, repo: &str, url: String) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match self.authz(repo) {
            Some(a) => r.header("authorization", a),
            None => r,
        }
    }

    /// Uploads a blob (POST, then PUT with the digest); returns its digest.
    pub async fn blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let r = self
            .req(
                reqwest::Method::POST,
                repo,
                format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            202,
            "start upload: {}",
            r.text().await.unwrap_or_default()
        );
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let mut url = url::Url::parse(&self.base).unwrap().join(&loc).unwrap();
        url.query_pairs_mut().append_pair("digest", &digest);
        let r = self
            .req(reqwest::Method::PUT, repo, url.to_string())
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "put blob: {}",
            r.text().await.unwrap_or_default()
        );
        digest
    }

    /// Uploads `len` bytes of [`generated`] data for `seed` without holding them in memory
    /// (hashed in a first pass, streamed in a second); returns the digest.
    pub async fn generated_blob(&self, repo: &str, seed: u64, len: u64) -> String {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        let mut chunks = generated(seed, len);
        while let Some(c) = futures_util::StreamExt::next(&mut chunks).await {
            h.update(c.unwrap());
        }
        let digest = format!("sha256:{}", hex::encode(h.finalize()));
        let r = self
            .req(
                reqwest::Method::POST,
                repo,
                format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "start upload");
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let mut url = url::Url::parse(&self.base).unwrap().join(&loc).unwrap();
        url.query_pairs_mut().append_pair("digest", &digest);
        let r = self
            .req(reqwest::Method::PUT, repo, url.to_string())
            .header("content-type", "application/octet-stream")
            .header("content-length", len)
            .body(reqwest::Body::wrap_stream(generated(seed, len)))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "put generated blob: {}",
            r.text().await.unwrap_or_default()
        );
        digest
    }

    /// Pushes exact manifest bytes under `reference`; returns the digest of the bytes.
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        data: &[u8],
    ) -> String {
        let r = self
            .req(
                reqwest::Method::PUT,
                repo,
                format!("{}/v2/{repo}/manifests/{reference}", self.base),
            )
            .header("content-type", media_type)
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert_eq!(
            status,
            201,
            "put manifest {repo}:{reference}: {}",
            r.text().await.unwrap_or_default()
        );
        sha256(data)
    }

    /// GET a manifest: (bytes, Content-Type, Docker-Content-Digest); `None` when absent.
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Option<(Vec<u8>, String, String)> {
        // distribution's filesystem driver rewrites a tag's link file in place: a read racing a
        // tag update (drift following a move) can get a 500 for a moment. Asked again then.
        let mut tries = 0;
        let r = loop {
            let r = self
                .req(
                    reqwest::Method::GET,
                    repo,
                    format!("{}/v2/{repo}/manifests/{reference}", self.base),
                )
                .header(
                    "accept",
                    format!("{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_MANIFEST}"),
                )
                .send()
                .await
                .unwrap();
            tries += 1;
            if r.status() != 500 || tries == 20 {
                break r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        if r.status() == 404 {
            return None;
        }
        assert_eq!(r.status(), 200, "get manifest {repo}:{reference}");
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let dcd = r
            .headers()
            .get("docker-content-digest")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        Some((r.bytes().await.unwrap().to_vec(), ct, dcd))
    }

    /// Whether the repository has the blob.
    pub async fn blob_exists(&self, repo: &str, digest: &str) -> bool {
        let r = self
            .req(
                reqwest::Method::HEAD,
                repo,
                format!("{}/v2/{repo}/blobs/{digest}", self.base),
            )
            .send()
            .await
            .unwrap();
        r.status() == 200
    }

    /// Deletes a manifest by digest (and so every tag naming it), as retention or garbage
    /// collection would.
    pub async fn delete_manifest(&self, repo: &str, digest: &str) {
        let r = self
            .req(
                reqwest::Method::DELETE,
                repo,
                format!("{}/v2/{repo}/manifests/{digest}", self.base),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "delete manifest {repo}@{digest}");
    }

    /// Unlinks a blob from the repository, as garbage collection would.
    pub async fn delete_blob(&self, repo: &str, digest: &str) {
        let r = self
            .req(
                reqwest::Method::DELETE,
                repo,
                format!("{}/v2/{repo}/blobs/{digest}", self.base),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "delete blob {digest}");
    }

    /// Pushes config + layers and an image manifest (by digest) with `style`d bytes.
    pub async fn image(
        &self,
        repo: &str,
        seed: u64,
        layers: &[usize],
        docker: bool,
        style: Style,
    ) -> TestImage {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","seed":{seed},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let layer_bytes: Vec<Vec<u8>> = layers
            .iter()
            .enumerate()
            .map(|(i, n)| bytes(seed * 1000 + i as u64, *n))
            .collect();
        self.image_with(repo, config.as_bytes(), &layer_bytes, docker, style)
            .await
    }

    /// Like [`Pusher::image`] with given config and layer bytes.
    pub async fn image_with(
        &self,
        repo: &str,
        config: &[u8],
        layers: &[Vec<u8>],
        docker: bool,
        style: Style,
    ) -> TestImage {
        let (mt, config_mt, layer_mt) = if docker {
            (
                DOCKER_MANIFEST,
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            )
        } else {
            (
                OCI_MANIFEST,
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        };
        let c = self.blob(repo, config).await;
        let mut blobs = vec![c.clone()];
        let mut layer_descs = Vec::new();
        for l in layers {
            let d = self.blob(repo, l).await;
            blobs.push(d.clone());
            layer_descs.push(json!({ "mediaType": layer_mt, "digest": d, "size": l.len() }));
        }
        let v = json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "config": { "mediaType": config_mt, "digest": c, "size": config.len() },
            "layers": layer_descs,
        });
        let data = style.render(&v);
        let digest = self.manifest(repo, &sha256(&data), mt, &data).await;
        TestImage {
            digest,
            bytes: data,
            media_type: mt.into(),
            blobs,
        }
    }

    /// Pushes an index of `children` (each with an optional platform and annotations) by digest and,
    /// if given, `tag`.
    pub async fn index(
        &self,
        repo: &str,
        tag: Option<&str>,
        children: &[(TestImage, Value)],
        docker: bool,
        style: Style,
    ) -> TestImage {
        let mt = if docker { DOCKER_LIST } else { OCI_INDEX };
        let manifests: Vec<Value> = children
            .iter()
            .map(|(c, extra)| {
                let mut d =
                    json!({ "mediaType": c.media_type, "digest": c.digest, "size": c.bytes.len() });
                if let Value::Object(m) = extra {
                    for (k, v) in m {
                        d[k] = v.clone();
                    }
                }
                d
            })
            .collect();
        let v = json!({ "schemaVersion": 2, "mediaType": mt, "manifests": manifests });
        let data = style.render(&v);
        let digest = self.manifest(repo, &sha256(&data), mt, &data).await;
        if let Some(t) = tag {
            self.manifest(repo, t, mt, &data).await;
        }
        let blobs = children.iter().flat_map(|(c, _)| c.blobs.clone()).collect();
        TestImage {
            digest,
            bytes: data,
            media_type: mt.into(),
            blobs,
        }
    }
}

/// How manifest bytes are laid out: a re-serialising copier changes all but `Compact`'s digest.
#[derive(Debug, Clone, Copy)]
pub enum Style {
    /// serde_json's compact form.
    Compact,
    /// Three-space indentation, CRLF line endings, a space before each colon.
    CrlfOdd,
}

impl Style {
    fn render(self, v: &Value) -> Vec<u8> {
        match self {
            Style::Compact => serde_json::to_vec(v).unwrap(),
            Style::CrlfOdd => {
                let pretty = serde_json::to_string_pretty(v).unwrap();
                pretty
                    .lines()
                    .map(|l| {
                        let indent = l.len() - l.trim_start().len();
                        format!(
                            "{}{}",
                            " ".repeat(indent / 2 * 3),
                            l.trim_start().replacen("\": ", "\" : ", 1)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\r\n")
                    .into_bytes()
            }
        }
    }
}

/// A platform annotation for an index entry.
pub fn platform(os: &str, arch: &str) -> Value {
    json!({ "platform": { "os": os, "architecture": arch } })
}
