//! The digest-preserving copy engine: resolve the source once, walk index → manifests → blobs by
//! digest, write blobs, then child manifests, then the top manifest, then the tag; read back to verify.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::try_join_all;
use serde::Serialize;
use tokio::sync::{Notify, OnceCell, Semaphore};

use super::client::{BlobSource, Client, MountOutcome, Repo, UploadSession};
use super::error::{Error, Result};
use super::fanout::Member;
use super::gate::Gate;
use super::manifest::{Descriptor, Kind, Manifest};
use super::platforms::{Chosen, PlatformSpec, config_platform, select, show_platform};
use crate::digest::Digest;
use crate::reference::ImageRef;

/// The OCI image index media type (the referrers fallback index is one).
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Deepest index nesting followed (an index of indexes is depth 2).
pub const MAX_DEPTH: usize = 4;

/// Most manifest bytes one image may add up to (a hostile index cannot make us hold more).
pub const MAX_TOTAL_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

/// Round-trip-bound requests (HEADs, POSTs, manifests) allowed per byte stream (`--jobs`): they
/// carry no bytes, so over a long link they are what waits, not what loads it.
const REQUESTS_PER_JOB: usize = 4;

/// Blobs this small (an image config, a small layer) are round-trip-bound: read whole while the
/// target is asked whether it has them, and put with one request, outside the byte-stream limit.
const SMALL_BLOB: u64 = 1024 * 1024;

/// Most bytes of small blobs held in memory at once.
const SMALL_BYTES_HELD: u64 = 8 * 1024 * 1024;

/// A manifest to write and, first, the manifests it names that the target lacks.
struct Plan {
    manifest: Manifest,
    children: Vec<Plan>,
}

/// How a copy runs.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Blob byte streams (GET → PUT) at once; round-trip-bound requests (HEADs, upload POSTs,
    /// manifests) run up to 4 × this.
    pub jobs: usize,
    /// Also copy what refers to the image: OCI referrers (the referrers API, or the
    /// `sha256-<hex>` fallback tag) and cosign's `sha256-<hex>.sig`/`.att`/`.sbom` tags.
    pub referrers: bool,
    /// Re-check every manifest of the image on the target instead of trusting the top one's
    /// presence, and write back whatever is missing (a repair after garbage collection).
    pub repair: bool,
    /// Look for referrers even when the image is already up to date on the target (the service
    /// does, so a retried job still copies them; the one-shot `copy` does not, so a no-op copy
    /// stays at 2 requests per registry).
    pub referrers_when_up_to_date: bool,
    /// The copies of the same image to other targets that share this copy's source reads (the
    /// service's worker, for one request's targets): each manifest and blob is read from the
    /// source once for all of them. `None`: this copy reads the source on its own.
    pub fanout: Option<Member>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            jobs: 16,
            referrers: true,
            repair: false,
            referrers_when_up_to_date: false,
            fanout: None,
        }
    }
}

/// Live counters of a running copy, for progress reports.
#[derive(Debug, Default)]
pub struct Progress {
    /// Blob bytes the copy has to account for (known as manifests are read).
    pub bytes_total: AtomicU64,
    /// Blob bytes done: uploaded, mounted or found on the target.
    pub bytes_done: AtomicU64,
    /// Blobs the copy has to account for.
    pub blobs_total: AtomicU64,
    /// Blobs done.
    pub blobs_done: AtomicU64,
    /// Bytes streamed so far (grows during an upload).
    pub bytes_streamed: Arc<AtomicU64>,
    /// Notified once only the copy's last write is left (the top manifest, sent next), or the
    /// image was found up to date: what remains is that write's answer, the read-back and the
    /// referrers. The service's worker then takes its next job.
    pub finishing: Notify,
}

/// One manifest of the copied image.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Its digest (the same on source and target).
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// The platform an index gives it (`linux/arm64/v8`; `unknown/unknown` for attestations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Its size in bytes.
    pub size: u64,
}

/// What a copy did, and the proof: the digest on the target equals the source's.
#[derive(Debug, Clone, Serialize)]
pub struct CopyResult {
    /// The source as asked for (canonical form).
    pub source: String,
    /// The digest the source resolved to.
    pub source_digest: Digest,
    /// The target reference written (with its tag, if any).
    pub target: String,
    /// The digest the target serves (verified equal to `source_digest`).
    pub target_digest: Digest,
    /// The line to pull the mirror by: `target-repo@sha256:…`.
    pub pull: String,
    /// Media type of the top manifest.
    pub media_type: String,
    /// Platforms of an index (attestations excluded).
    pub platforms: Vec<String>,
    /// Every manifest, top first.
    pub manifests: Vec<ManifestEntry>,
    /// Total size of the blobs the image names.
    pub bytes_total: u64,
    /// Blob bytes that crossed the wire.
    pub bytes_moved: u64,
    /// Blobs streamed from source to target.
    pub blobs_uploaded: usize,
    /// Blobs linked by a cross-repository mount.
    pub blobs_mounted: usize,
    /// Blobs the target already had.
    pub blobs_skipped: usize,
    /// Non-distributable layers (with `urls`) left where they are.
    pub blobs_foreign: usize,
    /// Manifests written to the target.
    pub manifests_pushed: usize,
    /// Manifests the target already had.
    pub manifests_skipped: usize,
    /// True when the target already served this digest under this reference: nothing was written.
    pub up_to_date: bool,
    /// Signatures, attestations and other artifacts copied with the image (each verified).
    pub referrers: Vec<Referrer>,
    /// Referrers that could not be looked up or copied: the image's copy stands without them.
    pub referrers_failed: Vec<ReferrerFailure>,
    /// Wall time of the copy.
    pub duration_ms: u64,
    /// A dry run ([`dry_run`]): nothing was written; the counts say what a copy would do (a blob
    /// counted as mounted would be tried as a mount first, and uploaded if the registry declines).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// A platform subset (`copy --platform`): only some children of the source index were copied,
    /// each under its official digest; `source_digest` is the source index's.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub subset: bool,
    /// With a subset: whether the tag names an index rebuilt from the chosen entries (several
    /// platforms; its digest, `target_digest`, is NOT an official one) or the one child itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_rebuilt: Option<bool>,
    /// With a subset: the official index the children were chosen from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_index_digest: Option<Digest>,
    /// With a subset: each platform copied, its official child digest and its attestations.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Chosen>,
}

/// An artifact that refers to a copied manifest, copied along with it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Referrer {
    /// The manifest it refers to.
    pub subject: Digest,
    /// Its digest (the same on source and target).
    pub digest: Digest,
    /// The tag it travels under (`sha256-<hex>.sig`, the `sha256-<hex>` fallback index), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// A referrer (or a lookup of referrers) that failed; the image it refers to is copied regardless.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReferrerFailure {
    /// The manifest it refers to.
    pub subject: Digest,
    /// What failed: a referrer's tag or digest, or `referrers of <subject>` for the lookup.
    pub reference: String,
    /// Why.
    pub error: String,
    /// Whether trying again may work (a 5xx, a timeout); drift watch tries again either way.
    pub transient: bool,
}

impl ReferrerFailure {
    fn new(subject: &Digest, reference: String, e: &Error) -> ReferrerFailure {
        ReferrerFailure {
            subject: subject.clone(),
            reference,
            error: e.to_string(),
            transient: e.is_transient(),
        }
    }
}

/// Whether `e` is the registry refusing access (401/403): for the referrers API, some registries
/// answer so instead of 404 when they do not offer it.
fn is_denied(e: &Error) -> bool {
    matches!(
        e,
        Error::Status {
            status: 401 | 403,
            ..
        }
    )
}

/// What refers to one manifest of the image on the source: (subject, its fallback tag name,
/// what was found as (tag, digest), the referrers API answer when it must go into the target's
/// fallback index).
type Found = (
    Digest,
    String,
    Vec<(Option<String>, Option<Digest>)>,
    Option<Manifest>,
);

/// Looks up, for every manifest of the image, what refers to it on the source (read-only, so it
/// runs while the image's blobs are still moving). A lookup that fails is reported, not fatal: a
/// referrers API that refuses access (401/403) still leaves the fallback tags looked up.
async fn find_referrers(
    client: &Client,
    engine: &Engine<'_>,
) -> (Vec<Found>, Vec<ReferrerFailure>) {
    let subjects: Vec<Digest> = {
        let mut v: Vec<Digest> = engine
            .entries
            .lock()
            .expect("entries poisoned")
            .iter()
            .map(|e| e.digest.clone())
            .collect();
        v.dedup();
        v
    };
    // Look everything up at once: the referrers API and the fallback tag for every manifest.
    let lookups = subjects.iter().enumerate().map(|(i, subject)| async move {
        let base = fallback_tag(subject);
        // cosign signs the digest a user pulls (the top manifest); its tags are looked for there
        // only, so a wide index costs two lookups per child, not five.
        let mut tags = vec![base.clone()];
        if i == 0 {
            tags.extend([
                format!("{base}.sig"),
                format!("{base}.att"),
                format!("{base}.sbom"),
            ]);
        }
        let (api, heads) = futures_util::future::join(
            client.referrers(&engine.src, subject),
            try_join_all(tags.iter().map(|t| client.head_manifest(&engine.src, t))),
        )
        .await;
        let mut failed = Vec::new();
        let mut found: Vec<(Option<String>, Option<Digest>)> = Vec::new();
        let api = match api {
            Ok(api) => api,
            Err(e) => {
                failed.push(ReferrerFailure::new(
                    subject,
                    format!("referrers of {}", subject.short()),
                    &e,
                ));
                None
            }
        };
        if let Some(index) = &api {
            found.extend(
                index
                    .manifests
                    .iter()
                    .map(|d| (None, Some(d.digest.clone()))),
            );
        }
        let mut has_fallback = false;
        match heads {
            Ok(heads) => {
                for (tag, head) in tags.into_iter().zip(heads) {
                    if head.is_some() {
                        has_fallback |= tag == base;
                        found.push((Some(tag), None));
                    }
                }
            }
            Err(e) => failed.push(ReferrerFailure::new(subject, format!("{base}*"), &e)),
        }
        // Referrers the source lists only through its API must also be findable on a target
        // without one: there they go into the fallback index, as the OCI spec asks of a client.
        let api = api.filter(|index| !index.manifests.is_empty() && !has_fallback);
        ((subject.clone(), base, found, api), failed)
    });
    let mut out = Vec::new();
    let mut failed = Vec::new();
    for (found, f) in futures_util::future::join_all(lookups).await {
        out.push(found);
        failed.extend(f);
    }
    (out, failed)
}

/// [`find_referrers`], once for every copy of the fan-out that looks up the same manifests (the
/// copies of a request to its targets: one lookup on the source, not one per target).
async fn find_referrers_once(
    client: &Client,
    engine: &Engine<'_>,
) -> (Vec<Found>, Vec<ReferrerFailure>) {
    let Some(f) = &engine.fanout else {
        return find_referrers(client, engine).await;
    };
    let key = {
        let entries = engine.entries.lock().expect("entries poisoned");
        let mut rest: Vec<String> = entries
            .iter()
            .skip(1)
            .map(|e| e.digest.to_string())
            .collect();
        rest.sort();
        rest.dedup();
        let top = entries
            .first()
            .map(|e| e.digest.to_string())
            .unwrap_or_default();
        format!("referrers of {}@{top} {}", engine.src, rest.join(","))
    };
    f.once(key, Box::pin(find_referrers(client, engine))).await
}

/// The fallback tag of `subject`'s referrers (`sha256-<hex>`); cosign adds `.sig`, `.att`, `.sbom`.
fn fallback_tag(subject: &Digest) -> String {
    format!(
        "{}-{}",
        match subject.algorithm() {
            crate::digest::Algorithm::Sha256 => "sha256",
            crate::digest::Algorithm::Sha512 => "sha512",
        },
        subject.hex()
    )
}

/// What refers to `subject` on `src` now: (tag it travels under, if any, and its digest), from
/// the referrers API (a 401/403 there counts as no API) and the fallback and cosign tags. Drift
/// watch compares it with what was copied.
pub async fn upstream_referrers(
    client: &Client,
    src: &Repo,
    subject: &Digest,
) -> Result<Vec<(Option<String>, Digest)>> {
    let base = fallback_tag(subject);
    let tags = [
        base.clone(),
        format!("{base}.sig"),
        format!("{base}.att"),
        format!("{base}.sbom"),
    ];
    let (api, heads) = futures_util::future::join(
        client.referrers(src, subject),
        try_join_all(tags.iter().map(|t| client.head_manifest(src, t))),
    )
    .await;
    let api = match api {
        Err(e) if is_denied(&e) => None,
        other => other?,
    };
    let mut out: Vec<(Option<String>, Digest)> = api
        .map(|index| {
            index
                .manifests
                .iter()
                .map(|d| (None, d.digest.clone()))
                .collect()
        })
        .unwrap_or_default();
    for (tag, head) in tags.into_iter().zip(heads?) {
        if let Some(h) = head {
            let digest = match h.digest {
                Some(d) => d,
                None => client.get_manifest(src, &tag, None).await?.digest,
            };
            out.push((Some(tag), digest));
        }
    }
    Ok(out)
}

/// Copies what [`find_referrers`] found, each by its own verified copy, after the image is written.
/// One that fails is reported with the reason and the others still go.
async fn copy_referrers(
    client: &Client,
    source: &ImageRef,
    target: &ImageRef,
    engine: &Engine<'_>,
    options: &CopyOptions,
    found: Vec<Found>,
) -> (Vec<Referrer>, Vec<ReferrerFailure>) {
    let nested = CopyOptions {
        referrers: false,
        repair: false,
        referrers_when_up_to_date: false,
        fanout: None,
        ..options.clone()
    };
    let src_repo = source.clone().with_tag(None).with_digest(None);
    let dst_repo = target.clone().with_tag(None).with_digest(None);
    let mut out = Vec::new();
    let mut failed = Vec::new();
    let mut fallbacks = Vec::new();
    for (subject, base, found, api) in found {
        if let Some(index) = api {
            fallbacks.push((subject.clone(), base, index));
        }
        for (tag, digest) in found {
            let (s, t, what) = match (&tag, &digest) {
                (Some(tag), _) => (
                    src_repo.clone().with_tag(Some(tag.clone())),
                    dst_repo.clone().with_tag(Some(tag.clone())),
                    tag.clone(),
                ),
                (None, Some(d)) => (
                    src_repo.clone().with_digest(Some(d.clone())),
                    dst_repo.clone(),
                    d.to_string(),
                ),
                (None, None) => continue,
            };
            match Box::pin(copy(client, &s, &t, &nested, Arc::new(Progress::default()))).await {
                Ok(r) => {
                    tracing::info!(subject = %subject.short(), "copied {} referring to {}", r.target, subject.short());
                    out.push(Referrer {
                        subject: subject.clone(),
                        digest: r.target_digest,
                        tag,
                    });
                }
                Err(e) => {
                    tracing::warn!(subject = %subject.short(), "referrer {what} of {} not copied (the image stands; drift watch tries again): {e}", subject.short());
                    failed.push(ReferrerFailure::new(&subject, what, &e));
                }
            }
        }
    }
    for (subject, tag, index) in fallbacks {
        match update_fallback_index(client, &engine.dst, &subject, &tag, &index).await {
            Ok(Some(written)) => out.push(Referrer {
                subject,
                digest: written,
                tag: Some(tag),
            }),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(subject = %subject.short(), "fallback index {tag} not written (the image stands): {e}");
                failed.push(ReferrerFailure::new(&subject, tag, &e));
            }
        }
    }
    (out, failed)
}

/// Makes the referrers in `index` (the source's referrers API answer for `subject`) findable on a
/// target without the referrers API: merges their descriptors, as the source gave them (artifact
/// type, annotations), into the target's `tag` (`sha256-<hex>`) fallback index, keeping what it
/// already lists. Returns the digest of the index written, or `None` when the target has the API
/// (it indexes referrers by their `subject` itself) or already lists them all.
async fn update_fallback_index(
    client: &Client,
    dst: &Repo,
    subject: &Digest,
    tag: &str,
    index: &Manifest,
) -> Result<Option<Digest>> {
    if client.referrers(dst, subject).await?.is_some() {
        return Ok(None);
    }
    let what = format!("fallback index {dst}:{tag}");
    let parse = |bytes: &[u8]| -> Result<serde_json::Value> {
        serde_json::from_slice(bytes).map_err(|e| Error::InvalidManifest {
            reference: what.clone(),
            reason: format!("not JSON: {e}"),
        })
    };
    let source_entries = parse(&index.bytes)?
        .get("manifests")
        .and_then(|m| m.as_array().cloned())
        .unwrap_or_default();
    let mut merged = match client.head_manifest(dst, tag).await? {
        Some(_) => parse(&client.get_manifest(dst, tag, None).await?.bytes)?,
        None => serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [],
        }),
    };
    let Some(entries) = merged.get_mut("manifests").and_then(|m| m.as_array_mut()) else {
        return Err(Error::InvalidManifest {
            reference: what,
            reason: "the target's fallback index has no manifests array".into(),
        });
    };
    let before = entries.len();
    for e in source_entries {
        if !entries.iter().any(|x| x.get("digest") == e.get("digest")) {
            entries.push(e);
        }
    }
    if entries.len() == before {
        return Ok(None);
    }
    let bytes =
        bytes::Bytes::from(serde_json::to_vec(&merged).map_err(|e| Error::Invalid(e.to_string()))?);
    let digest = Digest::sha256_of(&bytes);
    let m = Manifest::new(what, bytes, Some(OCI_INDEX.into()), digest.clone())?;
    client.put_manifest(dst, tag, &m).await?;
    tracing::info!(subject = %subject.short(), "fallback index {dst}:{tag} lists {} referrer(s)", m.manifests.len());
    Ok(Some(digest))
}

#[derive(Debug, Clone, Copy)]
enum BlobOutcome {
    Uploaded,
    Mounted,
    Skipped,
}

/// Resolves `source` to the digest every later step uses: its digest if it names one, else a
/// HEAD of the tag (HEAD does not count against Docker Hub's pull limit).
pub async fn resolve(client: &Client, source: &ImageRef) -> Result<Digest> {
    if let Some(d) = source.digest() {
        return Ok(d.clone());
    }
    let repo = Repo::of(source);
    let tag = source.tag().unwrap_or("latest");
    match client.head_manifest(&repo, tag).await? {
        Some(head) => match head.digest {
            Some(d) => Ok(d),
            // Some registries omit Docker-Content-Digest on HEAD: hash the body instead.
            None => Ok(client.get_manifest(&repo, tag, None).await?.digest),
        },
        None => Err(missing(source, &repo, "HEAD")),
    }
}

fn missing(source: &ImageRef, repo: &Repo, method: &str) -> Error {
    Error::Status {
        method: method.into(),
        url: format!("{source}"),
        status: 404,
        code: Some("MANIFEST_UNKNOWN".into()),
        message: format!("{source} does not exist on {}", repo.registry),
        retry_after: None,
    }
}

/// [`resolve`], reading the tag whole where a manifest GET costs nothing (the registry counts no
/// allowance, [`Client::meters_manifest_gets`]): the bytes hashed are the digest, and a copy needs
/// them next, so the GET by digest that would follow the `HEAD` is saved (one round trip).
async fn resolve_reading(client: &Client, source: &ImageRef) -> Result<(Digest, Option<Manifest>)> {
    let repo = Repo::of(source);
    if source.digest().is_some() || client.meters_manifest_gets(&repo.registry) {
        return Ok((resolve(client, source).await?, None));
    }
    let tag = source.tag().unwrap_or("latest");
    match client.get_manifest(&repo, tag, None).await {
        Ok(m) => Ok((m.digest.clone(), Some(m))),
        Err(e) if e.status() == Some(404) => Err(missing(source, &repo, "GET")),
        Err(e) => Err(e),
    }
}

/// What the target's `tag` names, read whole (its digest is the hash of the bytes served): `None`
/// when there is no such tag, or when it cannot be read as a manifest (a schema 1 manifest, a
/// digest header that disagrees): the copy then goes on as for a missing tag and writes it.
async fn read_tag(client: &Client, dst: &Repo, tag: &str) -> Result<Option<Manifest>> {
    match client.get_manifest(dst, tag, None).await {
        Ok(m) => Ok(Some(m)),
        Err(e @ Error::RateLimited { .. }) => Err(e),
        Err(e) if e.status() == Some(404) => Ok(None),
        Err(e) if e.is_transient() || matches!(e.status(), Some(401 | 403)) => Err(e),
        Err(e) => {
            tracing::debug!("{dst}:{tag} cannot be read as a manifest ({e}); writing it anew");
            Ok(None)
        }
    }
}

/// Copies `source` to `target` keeping every digest, and verifies the target.
///
/// `target` without a tag takes the source's tag; a digest-only source is written by digest only.
pub async fn copy(
    client: &Client,
    source: &ImageRef,
    target: &ImageRef,
    options: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<CopyResult> {
    run(client, source, target, options, progress, false, None, None).await
}

/// Pins the digest a copy resolved its source to before anything else uses it, and may replace
/// it: the service's worker stores it there (the first of a request's jobs to resolve settles it
/// for the others).
pub type Settle<'a> = Box<
    dyn FnOnce(Digest) -> Pin<Box<dyn Future<Output = Result<Digest>> + Send + 'a>> + Send + 'a,
>;

/// [`copy`] (with `platforms`, [`copy_platforms`]) of a source named by tag whose digest `settle`
/// pins as soon as it is resolved: the resolve goes in the same round trip as the target's tag
/// read instead of one before it, and everything after uses the digest `settle` returns. The
/// target is written as for a source named by that digest (a target without a tag gets none).
pub async fn copy_settling(
    client: &Client,
    source: &ImageRef,
    target: &ImageRef,
    options: &CopyOptions,
    platforms: &[PlatformSpec],
    progress: Arc<Progress>,
    settle: Settle<'_>,
) -> Result<CopyResult> {
    let platforms = (!platforms.is_empty()).then_some(platforms);
    run(
        client,
        source,
        target,
        options,
        progress,
        false,
        platforms,
        Some(settle),
    )
    .await
}

/// Copies only the children of `source`'s index for `platforms` (`copy --platform`), each under
/// its official digest, with the attestations that refer to them. With one platform the tag names
/// that child; with several, an index rebuilt from their entries (a new digest, not an official
/// one: the result says so). A platform the index lacks is refused before anything is written. A
/// single-platform image is copied whole when its config names the platform asked for, else refused.
pub async fn copy_platforms(
    client: &Client,
    source: &ImageRef,
    target: &ImageRef,
    options: &CopyOptions,
    platforms: &[PlatformSpec],
    progress: Arc<Progress>,
    dry_run: bool,
) -> Result<CopyResult> {
    run(
        client,
        source,
        target,
        options,
        progress,
        dry_run,
        Some(platforms),
        None,
    )
    .await
}

/// What `--platform` chose: the children of an index, or a single image whose config matches.
enum Subset {
    Index(Box<super::platforms::Selection>),
    Image(String),
}

/// Chooses what `specs` copy of `source` (its top manifest `m`), refusing before anything is written.
async fn choose(
    client: &Client,
    src: &Repo,
    source: &ImageRef,
    m: &Manifest,
    specs: &[PlatformSpec],
    fanout: Option<&Member>,
) -> Result<Subset> {
    let what = source.clone().with_digest(None).to_string();
    match m.kind {
        Kind::Index => Ok(Subset::Index(Box::new(select(&what, m, specs)?))),
        Kind::Image => {
            let config = m.blobs.first().ok_or_else(|| Error::InvalidManifest {
                reference: format!("{src}@{}", m.digest),
                reason: "an image manifest without a config".into(),
            })?;
            let fetch = client.get_small_blob(src, &config.digest, config.size);
            let bytes = match fanout {
                Some(f) => {
                    f.small_blob(src, &config.digest, config.size, fetch)
                        .await?
                }
                None => fetch.await?,
            };
            let Some(p) = config_platform(&bytes) else {
                return Err(Error::Refused {
                    reason: format!(
                        "{what} is a single image whose config names no platform: copy it without --platform"
                    ),
                });
            };
            let shown = show_platform(&p);
            if let Some(spec) = specs
                .iter()
                .find(|s| !s.matches(&p.0, &p.1, p.2.as_deref()))
            {
                return Err(Error::Refused {
                    reason: format!(
                        "{what} is a single image for {shown}, not an index: it has no platform {spec}"
                    ),
                });
            }
            Ok(Subset::Image(shown))
        }
    }
}

/// A dry run of [`copy`]: reads the source as a copy would (every manifest fetched and checked)
/// but only `HEAD`s the target, and writes nothing. The result says what a copy would do: the
/// manifests it would push (`manifests_pushed`), the blobs it would upload, try to mount, or skip,
/// and the bytes it would move (`dry_run: true`). Referrers are not looked up.
pub async fn dry_run(
    client: &Client,
    source: &ImageRef,
    target: &ImageRef,
    options: &CopyOptions,
) -> Result<CopyResult> {
    let progress = Arc::new(Progress::default());
    run(client, source, target, options, progress, true, None, None).await
}

#[allow(clippy::too_many_arguments)] // the entry points above pick among them
async fn run(
    client: &Client,
    source: &ImageRef,
    target: &ImageRef,
    options: &CopyOptions,
    progress: Arc<Progress>,
    dry_run: bool,
    platforms: Option<&[PlatformSpec]>,
    settle: Option<Settle<'_>>,
) -> Result<CopyResult> {
    let started = Instant::now();
    let tag = match (target.tag(), target.digest()) {
        (Some(t), _) => Some(t.to_string()),
        (None, None) if source.digest().is_none() && settle.is_none() => {
            source.tag().map(str::to_string)
        }
        _ => None,
    };
    let dst = Repo::of(target);
    // The target's tag is read while the source's is resolved: one round trip, not two. Read, not
    // only HEADed: when it already names the source's digest, its bytes hashed are the read-back,
    // and a no-op copy is done in that one round trip. (A dry run only HEADs the target.)
    let head_tag = async {
        match (&tag, options.repair) {
            (Some(t), false) if !dry_run => read_tag(client, &dst, t).await.map(|m| {
                let head = m.as_ref().map(|m| super::client::ManifestHead {
                    digest: Some(m.digest.clone()),
                    media_type: Some(m.media_type.clone()),
                });
                (head, m)
            }),
            (Some(t), false) => client.head_manifest(&dst, t).await.map(|h| (h, None)),
            _ => Ok((None, None)),
        }
    };
    // A copy reads the source's tag whole when that is free (its GET by digest is then saved);
    // a dry run, a subset and a repair resolve with a HEAD as before.
    let reading = !dry_run && platforms.is_none_or(<[_]>::is_empty);
    let resolved = async {
        let (d, read) = match reading {
            true => resolve_reading(client, source).await?,
            false => (resolve(client, source).await?, None),
        };
        let d = match settle {
            Some(settle) => settle(d).await?,
            None => d,
        };
        Ok::<_, Error>((read.filter(|m| m.digest == d), d))
    };
    let (resolved, tag_head) = futures_util::future::join(resolved, head_tag).await;
    let (source_read, digest) = resolved?;
    let (tag_head, tag_read) = tag_head?;
    if platforms.is_some() && target.digest().is_some() {
        return Err(Error::Invalid(
            "with --platform the target names a tag or only a repository, not a digest".into(),
        ));
    }
    // With --platform: choose (and refuse) before anything is written.
    let subset = match platforms {
        Some(specs) if !specs.is_empty() => {
            let src = Repo::of(source);
            let fanout = options.fanout.as_ref();
            let m = source_manifest(client, fanout, &src, &digest).await?;
            Some((choose(client, &src, source, &m, specs, fanout).await?, m))
        }
        _ => None,
    };
    if let Some(td) = target.digest()
        && td != &digest
    {
        return Err(Error::Invalid(format!(
            "the target names digest {td} but {source} is {digest}; name the target without a digest"
        )));
    }
    let engine = Engine {
        client,
        src: Repo::of(source),
        dst,
        sem: Gate::new(options.jobs.max(1)),
        small_bytes: Semaphore::new((SMALL_BYTES_HELD / 1024) as usize),
        requests: Semaphore::new(options.jobs.max(1) * REQUESTS_PER_JOB),
        blobs: Mutex::new(HashMap::new()),
        entries: Mutex::new(Vec::new()),
        pushed: Mutex::new(Vec::new()),
        stats: Stats::default(),
        progress,
        manifest_bytes: AtomicU64::new(0),
        dry_run,
        fanout: options.fanout.clone().filter(|_| !dry_run),
    };
    let dst = engine.dst.clone();
    // What the tag names: the source's digest, or with a subset the one child or the rebuilt index.
    let (selection, subset_image) = match subset {
        Some((Subset::Index(sel), index)) => {
            engine.count_manifest_bytes(&index)?;
            (Some(*sel), None)
        }
        Some((Subset::Image(p), _)) => (None, Some(p)),
        None => (None, None),
    };
    let named = match &selection {
        Some(sel) if sel.chosen.len() == 1 => sel.chosen[0].digest.clone(),
        Some(sel) => sel.rebuilt.digest.clone(),
        None => digest.clone(),
    };
    let target_ref = tag.clone().unwrap_or_else(|| digest.to_string());
    let target_name = match &tag {
        Some(t) => format!("{dst}:{t}"),
        None => format!("{dst}@{named}"),
    };

    // Already there? One HEAD answers it; the read-back by digest proves it. (A subset checks
    // each chosen child instead.)
    let head = match (&tag, options.repair || selection.is_some()) {
        (_, true) => None,
        (Some(_), false) => tag_head,
        (None, false) => client.head_manifest(&dst, &target_ref).await?,
    };
    let up_to_date = matches!(head, Some(h) if h.digest.as_ref() == Some(&digest));
    let mut referrers_found = None;
    let top = if up_to_date {
        engine.declare();
        // A dry run reads the source, never the target's body.
        let from = if dry_run { &engine.src } else { &dst };
        let m = match tag_read.filter(|m| m.digest == digest) {
            Some(m) => m,
            None => {
                client
                    .get_manifest(from, &digest.to_string(), Some(&digest))
                    .await?
            }
        };
        engine.note_manifest(&m, None);
        for c in &m.manifests {
            engine.note_child(c);
        }
        engine
            .stats
            .manifests_skipped
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(target = %target_name, digest = %digest, "already up to date");
        engine.progress.finishing.notify_one();
        if options.referrers && options.referrers_when_up_to_date {
            referrers_found = Some(find_referrers_once(client, &engine).await);
        }
        m
    } else if let Some(sel) = &selection {
        let single = sel.chosen.len() == 1;
        let top = if single {
            engine.source_manifest(&sel.chosen[0].digest).await?
        } else {
            engine.note_manifest(&sel.rebuilt, None);
            sel.rebuilt.clone()
        };
        engine.count_manifest_bytes(&sel.rebuilt)?;
        // The chosen children and their attestations, by their official digests.
        let plan = engine.plan(sel.rebuilt.clone(), 0).await?;
        engine.declare();
        if dry_run {
            match single {
                true => {
                    try_join_all(plan.children.iter().map(|c| engine.dry_write(c))).await?;
                }
                false => engine.dry_write(&plan).await?,
            }
        } else {
            let write = async {
                match single {
                    true => {
                        try_join_all(plan.children.iter().map(|c| engine.write(c, None, false)))
                            .await?;
                    }
                    false => engine.write(&plan, None, tag.is_none()).await?,
                }
                if let Some(t) = &tag {
                    engine.progress.finishing.notify_one();
                    engine.put(&top, t).await?;
                    tracing::info!(target = %target_name, digest = %top.digest, "tagged");
                }
                engine.verify(&top, tag.as_deref()).await
            };
            let find = async {
                match options.referrers {
                    true => Some(find_referrers_once(client, &engine).await),
                    false => None,
                }
            };
            let (written, found) = futures_util::future::join(write, find).await;
            written?;
            referrers_found = found;
        }
        top
    } else if dry_run {
        let (top, plan) = engine.plan_top(&digest, false, None).await?;
        if let Some(plan) = &plan {
            engine.dry_write(plan).await?;
        }
        top
    } else {
        let (top, plan) = engine
            .plan_top(&digest, options.repair, source_read)
            .await?;
        engine.declare();
        let write = async {
            match &plan {
                // The top manifest goes up by its tag, last: the registry checks everything it
                // names is there, and the tag appears with it (a PUT by digest first would be one
                // more round trip for the same bytes).
                Some(plan) => engine.write(plan, tag.as_deref(), true).await?,
                None => {
                    if let Some(t) = &tag {
                        engine.progress.finishing.notify_one();
                        engine.put(&top, t).await?;
                    }
                }
            }
            if tag.is_some() {
                tracing::info!(target = %target_name, digest = %digest, "tagged");
            }
            engine.verify(&top, tag.as_deref()).await
        };
        // What refers to the image is looked up on the source while the blobs move.
        let find = async {
            match options.referrers {
                true => Some(find_referrers_once(client, &engine).await),
                false => None,
            }
        };
        let (written, found) = futures_util::future::join(write, find).await;
        written?;
        referrers_found = found;
        top
    };
    let (referrers, referrers_failed) = match referrers_found {
        Some((found, mut lookup_failed)) => {
            let (copied, mut failed) =
                copy_referrers(client, source, target, &engine, options, found).await;
            lookup_failed.append(&mut failed);
            (copied, lookup_failed)
        }
        None => (Vec::new(), Vec::new()),
    };

    let entries = engine.entries.lock().expect("entries poisoned").clone();
    let mut platforms: Vec<String> = entries
        .iter()
        .filter_map(|e| e.platform.clone())
        .filter(|p| !p.starts_with("unknown/"))
        .collect();
    platforms.dedup();
    if let Some(sel) = &selection {
        platforms = sel.chosen.iter().map(|c| c.platform.clone()).collect();
    }
    if let Some(p) = &subset_image {
        platforms = vec![p.clone()];
    }
    let s = &engine.stats;
    Ok(CopyResult {
        source: source.to_string(),
        source_digest: digest.clone(),
        target: target_name,
        target_digest: top.digest.clone(),
        pull: format!("{dst}@{}", top.digest),
        media_type: top.media_type.clone(),
        platforms,
        manifests: entries,
        bytes_total: s.bytes_total.load(Ordering::Relaxed),
        bytes_moved: s.bytes_moved.load(Ordering::Relaxed),
        blobs_uploaded: s.uploaded.load(Ordering::Relaxed),
        blobs_mounted: s.mounted.load(Ordering::Relaxed),
        blobs_skipped: s.skipped.load(Ordering::Relaxed),
        blobs_foreign: s.foreign.load(Ordering::Relaxed),
        manifests_pushed: engine.pushed.lock().expect("pushed poisoned").len(),
        manifests_skipped: s.manifests_skipped.load(Ordering::Relaxed),
        up_to_date,
        referrers,
        referrers_failed,
        duration_ms: started.elapsed().as_millis() as u64,
        dry_run,
        subset: selection.is_some(),
        index_rebuilt: selection.as_ref().map(|s| s.chosen.len() > 1),
        source_index_digest: selection.as_ref().map(|_| digest.clone()),
        children: selection.map(|s| s.chosen).unwrap_or_default(),
    })
}

#[derive(Default)]
struct Stats {
    bytes_total: AtomicU64,
    bytes_moved: AtomicU64,
    uploaded: AtomicUsize,
    mounted: AtomicUsize,
    skipped: AtomicUsize,
    foreign: AtomicUsize,
    manifests_skipped: AtomicUsize,
}

type BlobCell = Arc<OnceCell<BlobOutcome>>;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

struct Engine<'a> {
    client: &'a Client,
    src: Repo,
    dst: Repo,
    /// Byte streams (blob GET → PUT) at once: `--jobs`, the largest blob waiting first.
    sem: Gate,
    /// KiB of small blobs held in memory ([`SMALL_BYTES_HELD`]).
    small_bytes: Semaphore,
    /// Round-trip-bound requests (HEADs, upload POSTs, manifests) at once.
    requests: Semaphore,
    /// One transfer per blob digest, however many manifests name it.
    blobs: Mutex<HashMap<Digest, BlobCell>>,
    entries: Mutex<Vec<ManifestEntry>>,
    /// Manifests written, for the read-back.
    pushed: Mutex<Vec<Digest>>,
    stats: Stats,
    progress: Arc<Progress>,
    /// Manifest bytes fetched so far (capped by [`MAX_TOTAL_MANIFEST_BYTES`]).
    manifest_bytes: AtomicU64,
    /// A dry run: nothing is written.
    dry_run: bool,
    /// The source reads shared with copies of the image to other targets.
    fanout: Option<Member>,
}

/// Manifest `digest` of `src` (verified), fetched once for every copy sharing `fanout`.
async fn source_manifest(
    client: &Client,
    fanout: Option<&Member>,
    src: &Repo,
    digest: &Digest,
) -> Result<Manifest> {
    let reference = digest.to_string();
    let fetch = client.get_manifest(src, &reference, Some(digest));
    match fanout {
        Some(f) => f.manifest(src, digest, fetch).await,
        None => fetch.await,
    }
}

impl Engine<'_> {
    /// Manifest `digest` of the source, verified (once for every copy of the fan-out).
    async fn source_manifest(&self, digest: &Digest) -> Result<Manifest> {
        source_manifest(self.client, self.fanout.as_ref(), &self.src, digest).await
    }

    /// Tells the fan-out which blobs this copy may move, once every manifest is planned.
    fn declare(&self) {
        if let Some(f) = &self.fanout {
            let blobs: Vec<Digest> = self
                .blobs
                .lock()
                .expect("blob map poisoned")
                .keys()
                .cloned()
                .collect();
            f.declare(&self.dst.registry, blobs);
        }
    }

    fn note_manifest(&self, m: &Manifest, platform: Option<String>) {
        self.entries
            .lock()
            .expect("entries poisoned")
            .push(ManifestEntry {
                digest: m.digest.clone(),
                media_type: m.media_type.clone(),
                platform,
                size: m.bytes.len() as u64,
            });
    }

    fn note_child(&self, d: &Descriptor) {
        self.entries
            .lock()
            .expect("entries poisoned")
            .push(ManifestEntry {
                digest: d.digest.clone(),
                media_type: d.media_type.clone(),
                platform: d.platform.as_ref().map(|p| p.to_string()),
                size: d.size,
            });
    }

    /// Fetches the top manifest and plans everything under it, then writes it: no blob moves
    /// before every manifest of the image has been fetched, verified and found acceptable.
    /// Phase 1 for the top manifest: fetches it and plans what the target lacks; no plan when the
    /// target already has the manifest (and so, everything under it). With `repair`, its presence is
    /// not taken as proof that its children are there too.
    ///
    /// `read` is the top manifest when the resolve read it whole: then the target is not asked
    /// whether it has it by digest (its tag does not name it, or the copy would be up to date); the
    /// children's or the blobs' existence checks, in the round trip that follows anyway, answer.
    async fn plan_top(
        &self,
        digest: &Digest,
        repair: bool,
        read: Option<Manifest>,
    ) -> Result<(Manifest, Option<Plan>)> {
        if let Some(m) = read.filter(|m| &m.digest == digest) {
            self.note_manifest(&m, None);
            self.count_manifest_bytes(&m)?;
            let plan = self.plan(m.clone(), 0).await?;
            return Ok((m, Some(plan)));
        }
        // Both at once: whether the target has it decides nothing about fetching it.
        let reference = digest.to_string();
        let on_target = async {
            match repair {
                true => Ok(None),
                false => self.client.head_manifest(&self.dst, &reference).await,
            }
        };
        let (m, on_target) =
            futures_util::future::join(self.source_manifest(digest), on_target).await;
        let m = m?;
        self.note_manifest(&m, None);
        self.count_manifest_bytes(&m)?;
        if on_target?.is_some() {
            self.stats.manifests_skipped.fetch_add(1, Ordering::Relaxed);
            return Ok((m, None));
        }
        let plan = self.plan(m.clone(), 0).await?;
        Ok((m, Some(plan)))
    }

    fn count_manifest_bytes(&self, m: &Manifest) -> Result<()> {
        let total = self
            .manifest_bytes
            .fetch_add(m.bytes.len() as u64, Ordering::Relaxed)
            + m.bytes.len() as u64;
        if total > MAX_TOTAL_MANIFEST_BYTES {
            return Err(Error::InvalidManifest {
                reference: format!("{}@{}", self.src, m.digest),
                reason: format!(
                    "the image's manifests add up to more than {MAX_TOTAL_MANIFEST_BYTES} bytes"
                ),
            });
        }
        Ok(())
    }

    /// Phase 1: fetches (by digest, verified) every manifest `m` names that the target lacks.
    fn plan(&self, m: Manifest, depth: usize) -> BoxFuture<'_, Result<Plan>> {
        Box::pin(async move {
            let mut children = Vec::new();
            match m.kind {
                Kind::Index => {
                    if depth >= MAX_DEPTH {
                        return Err(Error::InvalidManifest {
                            reference: format!("{}@{}", self.src, m.digest),
                            reason: format!("indexes nested deeper than {MAX_DEPTH} levels"),
                        });
                    }
                    let planned =
                        try_join_all(m.manifests.iter().map(|d| self.plan_child(d, depth + 1)))
                            .await?;
                    children = planned.into_iter().flatten().collect();
                }
                Kind::Image => {
                    for b in m.blobs.iter().filter(|b| b.urls.is_empty()) {
                        self.count_blob(b);
                    }
                }
            }
            Ok(Plan {
                manifest: m,
                children,
            })
        })
    }

    async fn plan_child(&self, d: &Descriptor, depth: usize) -> Result<Option<Plan>> {
        self.note_child(d);
        let reference = d.digest.to_string();
        let m = {
            // Both at once: the parent is missing on the target, so its children most likely are
            // too, and the GET no longer waits a round trip for the HEAD's answer.
            let _permit = self.requests.acquire().await.expect("semaphore closed");
            let (on_target, m) = futures_util::future::join(
                self.client.head_manifest(&self.dst, &reference),
                self.source_manifest(&d.digest),
            )
            .await;
            if on_target?.is_some() {
                self.stats.manifests_skipped.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            m?
        };
        if m.bytes.len() as u64 != d.size {
            return Err(Error::SizeMismatch {
                what: format!("manifest {}@{}", self.src, d.digest),
                expected: d.size,
                actual: m.bytes.len() as u64,
            });
        }
        self.count_manifest_bytes(&m)?;
        Ok(Some(self.plan(m, depth).await?))
    }

    /// Phase 2: children first, then the blobs of an image, then the manifest itself by digest
    /// (or by `tag`, for the top one).
    /// `top`: this is the copy's last write ([`Progress::finishing`] is told before it is sent).
    fn write<'s>(
        &'s self,
        plan: &'s Plan,
        tag: Option<&'s str>,
        top: bool,
    ) -> BoxFuture<'s, Result<()>> {
        Box::pin(async move {
            try_join_all(plan.children.iter().map(|c| self.write(c, None, false))).await?;
            if plan.manifest.kind == Kind::Image {
                self.copy_blobs(&plan.manifest).await?;
            }
            let m = &plan.manifest;
            let _permit = self.requests.acquire().await.expect("semaphore closed");
            if top {
                self.progress.finishing.notify_one();
            }
            let digest = m.digest.to_string();
            self.put(m, tag.unwrap_or(&digest)).await?;
            self.pushed
                .lock()
                .expect("pushed poisoned")
                .push(m.digest.clone());
            Ok(())
        })
    }

    async fn copy_blobs(&self, m: &Manifest) -> Result<()> {
        try_join_all(m.blobs.iter().map(|b| async move {
            if !b.urls.is_empty() {
                // Non-distributable: the registry serving it is elsewhere, and so it stays.
                self.stats.foreign.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            self.blob(b).await
        }))
        .await?;
        Ok(())
    }

    /// Counts a blob into the totals once, however many manifests name it.
    fn count_blob(&self, d: &Descriptor) {
        let mut blobs = self.blobs.lock().expect("blob map poisoned");
        if !blobs.contains_key(&d.digest) {
            self.stats.bytes_total.fetch_add(d.size, Ordering::Relaxed);
            self.progress
                .bytes_total
                .fetch_add(d.size, Ordering::Relaxed);
            self.progress.blobs_total.fetch_add(1, Ordering::Relaxed);
            blobs.insert(d.digest.clone(), BlobCell::default());
        }
    }

    async fn blob(&self, d: &Descriptor) -> Result<()> {
        self.count_blob(d);
        let cell = self.blobs.lock().expect("blob map poisoned")[&d.digest].clone();
        cell.get_or_try_init(|| self.transfer(d)).await?;
        if let Some(f) = &self.fanout {
            f.done(&d.digest);
        }
        Ok(())
    }

    async fn transfer(&self, d: &Descriptor) -> Result<BlobOutcome> {
        let outcome = self.transfer_unguarded(d).await?;
        self.tally(d, outcome);
        Ok(outcome)
    }

    /// A dry run's phase 2: what [`Engine::write`] would do, found with `HEAD`s on the target only.
    fn dry_write<'s>(&'s self, plan: &'s Plan) -> BoxFuture<'s, Result<()>> {
        Box::pin(async move {
            try_join_all(plan.children.iter().map(|c| self.dry_write(c))).await?;
            let m = &plan.manifest;
            if m.kind == Kind::Image {
                try_join_all(m.blobs.iter().map(|b| async move {
                    if !b.urls.is_empty() {
                        self.stats.foreign.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    self.count_blob(b);
                    let cell = self.blobs.lock().expect("blob map poisoned")[&b.digest].clone();
                    cell.get_or_try_init(|| async {
                        let _permit = self.requests.acquire().await.expect("semaphore closed");
                        let outcome =
                            if self.client.blob_size(&self.dst, &b.digest).await?.is_some() {
                                BlobOutcome::Skipped
                            } else if self.mount_sources(b).await.iter().any(Option::is_some) {
                                BlobOutcome::Mounted
                            } else {
                                BlobOutcome::Uploaded
                            };
                        self.tally(b, outcome);
                        Ok::<_, Error>(outcome)
                    })
                    .await?;
                    Ok::<_, Error>(())
                }))
                .await?;
            }
            self.pushed
                .lock()
                .expect("pushed poisoned")
                .push(m.digest.clone());
            Ok(())
        })
    }

    /// Where a mount of `d` would be tried: another repository of the target this process put it
    /// in, and a same-registry source.
    async fn mount_sources(&self, d: &Descriptor) -> [Option<Repo>; 2] {
        let known = self
            .client
            .blob_slot(&self.dst.registry, &d.digest)
            .lock()
            .await
            .clone();
        self.mount_candidates(known.as_deref())
    }

    fn mount_candidates(&self, known_repo: Option<&str>) -> [Option<Repo>; 2] {
        let elsewhere_on_target = known_repo.filter(|r| *r != self.dst.name).map(|r| Repo {
            registry: self.dst.registry.clone(),
            name: r.to_string(),
        });
        let same_registry_source = (self.src.registry == self.dst.registry
            && self.src.name != self.dst.name)
            .then(|| self.src.clone());
        [elsewhere_on_target, same_registry_source]
    }

    /// Counts a blob's outcome into the result and the progress.
    fn tally(&self, d: &Descriptor, outcome: BlobOutcome) {
        match outcome {
            BlobOutcome::Uploaded => {
                self.stats.uploaded.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_moved.fetch_add(d.size, Ordering::Relaxed);
            }
            BlobOutcome::Mounted => {
                self.stats.mounted.fetch_add(1, Ordering::Relaxed);
            }
            BlobOutcome::Skipped => {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.progress
            .bytes_done
            .fetch_add(d.size, Ordering::Relaxed);
        self.progress.blobs_done.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            blob = %d.digest.short(),
            size_bytes = d.size,
            outcome = ?outcome,
            "blob {} {}{}",
            d.digest.short(),
            if self.dry_run { "would be " } else { "" },
            match outcome {
                BlobOutcome::Uploaded => "copied",
                BlobOutcome::Mounted => "mounted",
                BlobOutcome::Skipped => "already on the target",
            }
        );
    }

    /// Moves one blob into the target. Process-wide, one copy at a time moves a given blob into a
    /// given registry; a copy that finds the blob moved before (by any copy of this process) into
    /// another repository there mounts it from that repository instead of uploading it again.
    async fn transfer_unguarded(&self, d: &Descriptor) -> Result<BlobOutcome> {
        let slot = self.client.blob_slot(&self.dst.registry, &d.digest);
        let mut known = slot.lock().await;
        if let Some(repo) = known.clone() {
            // Already moved into this registry: a mount (or finding it there) needs no turn of its
            // own, so copies sharing the blob mount it at once instead of one after another.
            drop(known);
            let outcome = self.transfer_locked(d, Some(&repo), false).await?;
            if let Some(shared) = self.client.blob_locations() {
                let digest = d.digest.to_string();
                shared
                    .record(&self.dst.registry, &self.dst.name, &digest)
                    .await;
            }
            return Ok(outcome);
        }
        // Unknown here: maybe another replica put it in another repository of the target (or is
        // putting it there now: then this waits for it). Put nowhere there, it most likely has to
        // move.
        let mut nowhere = false;
        if let Some(shared) = self.client.blob_locations() {
            let digest = d.digest.to_string();
            let repos = shared
                .locate(&self.dst.registry, &digest, &self.dst.name)
                .await;
            nowhere = repos.is_empty();
            *known = repos.into_iter().find(|r| *r != self.dst.name);
        }
        let outcome = match self.transfer_locked(d, known.as_deref(), nowhere).await {
            Ok(o) => o,
            Err(e) => {
                if let Some(shared) = self.client.blob_locations() {
                    shared
                        .abandon(&self.dst.registry, &d.digest.to_string())
                        .await;
                }
                return Err(e);
            }
        };
        *known = Some(self.dst.name.clone());
        if let Some(shared) = self.client.blob_locations() {
            let digest = d.digest.to_string();
            shared
                .record(&self.dst.registry, &self.dst.name, &digest)
                .await;
        }
        Ok(outcome)
    }

    /// `nowhere`: the shared record of blob locations says no copy put `d` anywhere on the target.
    async fn transfer_locked(
        &self,
        d: &Descriptor,
        known_repo: Option<&str>,
        nowhere: bool,
    ) -> Result<BlobOutcome> {
        let mounts = self.mount_candidates(known_repo);
        let no_mount = mounts.iter().all(Option::is_none);
        if no_mount && d.size <= SMALL_BLOB && self.client.fits_one_request(&self.dst, d.size) {
            return self.transfer_small(d).await;
        }
        if no_mount && nowhere && self.fanout.is_none() {
            return self.transfer_fetching(d).await;
        }
        // Whether the target has the blob, and a mount or an upload session for when it has not,
        // asked at once: one round trip instead of two before the bytes move.
        let open = async {
            for from in mounts.into_iter().flatten() {
                match self.client.mount_blob(&self.dst, &from, &d.digest).await {
                    Ok(MountOutcome::Mounted) => return Ok(None),
                    Ok(MountOutcome::Upload(s)) => return Ok(Some(s)),
                    Err(e) => {
                        tracing::debug!(blob = %d.digest.short(), "mount from {from} refused ({e}); trying on")
                    }
                }
            }
            self.client.start_upload(&self.dst).await.map(Some)
        };
        let (present, opened) = {
            use futures_util::future::{Either, select};
            let _permit = self.requests.acquire().await.expect("semaphore closed");
            let head = std::pin::pin!(self.client.blob_size(&self.dst, &d.digest));
            match select(head, std::pin::pin!(open)).await {
                Either::Left((present, open)) => (present, open.await),
                // A mount that answered 201 linked it, whatever the HEAD beside it will say: it is
                // not waited for (distribution may answer a HEAD racing the link 500, and then it
                // would be retried after a backoff).
                Either::Right((Ok(None), _)) => return Ok(BlobOutcome::Mounted),
                Either::Right((opened, head)) => (head.await, opened),
            }
        };
        // A mount that answered 201 linked it, whatever the HEAD sent beside it saw (the two race:
        // the HEAD may land after the mount).
        if matches!(opened, Ok(None)) {
            return Ok(BlobOutcome::Mounted);
        }
        if present?.is_some() {
            return Ok(match opened {
                // The mount answered first and the HEAD then saw what it linked.
                Ok(None) => BlobOutcome::Mounted,
                Ok(Some(s)) => {
                    self.give_back(s);
                    BlobOutcome::Skipped
                }
                Err(_) => BlobOutcome::Skipped,
            });
        }
        match opened? {
            None => Ok(BlobOutcome::Mounted),
            Some(s) => self.stream(d, Some(s)).await,
        }
    }

    /// A blob of at most [`SMALL_BLOB`] bytes with nothing to mount from: round-trip-bound, not a
    /// byte stream. Its `HEAD` on the target, an upload session and the whole blob from the source
    /// (verified) are asked for at once, then one `PUT` closes the session with the bytes: two
    /// round trips instead of three, outside the byte-stream limit. The blob is read before the
    /// target says whether it needs it: at most [`SMALL_BLOB`] bytes spent, within
    /// [`SMALL_BYTES_HELD`] held at once. A `PUT` that fails goes again as a byte stream (which
    /// handles `413`, chunks and retries).
    async fn transfer_small(&self, d: &Descriptor) -> Result<BlobOutcome> {
        // Memory first, then the request slot: nothing holds a slot while it waits for memory.
        let kib = d.size.div_ceil(1024).max(1) as u32;
        let _held = self
            .small_bytes
            .acquire_many(kib)
            .await
            .expect("semaphore closed");
        let permit = self.requests.acquire().await.expect("semaphore closed");
        let (present, opened, fetched) = futures_util::future::join3(
            self.client.blob_size(&self.dst, &d.digest),
            self.client.start_upload(&self.dst),
            self.small_blob(d),
        )
        .await;
        if present?.is_some() {
            if let Ok(s) = opened {
                self.give_back(s);
            }
            return Ok(BlobOutcome::Skipped);
        }
        let (session, bytes) = (opened?, fetched?);
        match self
            .client
            .put_blob_bytes(&self.dst, &session, &d.digest, bytes)
            .await
        {
            Ok(()) => {
                self.progress
                    .bytes_streamed
                    .fetch_add(d.size, Ordering::Relaxed);
                Ok(BlobOutcome::Uploaded)
            }
            Err(e) => {
                tracing::debug!(blob = %d.digest.short(), "one-PUT upload of {} failed ({e}); streaming it instead", d.digest.short());
                self.give_back(session);
                drop(permit);
                self.stream(d, None).await
            }
        }
    }

    /// A blob over [`SMALL_BLOB`] that no copy put anywhere on the target (the shared record of
    /// blob locations says so) and that nothing can be mounted from: it most likely has to move,
    /// so its source `GET` leaves with the target's `HEAD` and the upload `POST` instead of after
    /// their answers, and the `PUT` starts as they come (two round trips before the blob is in
    /// instead of three). It holds a byte stream from the start. Should the `HEAD` find the blob
    /// after all, the read is dropped: at most what arrived by then is spent.
    async fn transfer_fetching(&self, d: &Descriptor) -> Result<BlobOutcome> {
        let _stream = self.sem.acquire(d.size).await;
        let (present, opened, source) = {
            let _permit = self.requests.acquire().await.expect("semaphore closed");
            futures_util::future::join3(
                self.client.blob_size(&self.dst, &d.digest),
                self.client.start_upload(&self.dst),
                BlobSource::open(
                    self.client,
                    &self.src,
                    &d.digest,
                    d.size,
                    Some(self.progress.bytes_streamed.clone()),
                ),
            )
            .await
        };
        if present?.is_some() {
            if let Ok(s) = opened {
                self.give_back(s);
            }
            return Ok(BlobOutcome::Skipped);
        }
        // A read that failed to open is opened again by the stream (which retries).
        self.stream_own(d, Some(opened?), source.ok()).await
    }

    /// Small blob `d` of the source, read whole (once for every copy of the fan-out).
    async fn small_blob(&self, d: &Descriptor) -> Result<bytes::Bytes> {
        let fetch = self.client.get_small_blob(&self.src, &d.digest, d.size);
        match &self.fanout {
            Some(f) => f.small_blob(&self.src, &d.digest, d.size, fetch).await,
            None => fetch.await,
        }
    }

    /// Gives an upload session not needed after all back (best effort, off the critical path).
    fn give_back(&self, s: UploadSession) {
        let (client, dst) = (self.client.clone(), self.dst.clone());
        tokio::spawn(async move { client.cancel_upload(&dst, &s).await });
    }

    /// Streams `d` from the source into `session` (or a new one) within the byte-stream limit,
    /// largest blobs first, retrying with a new session.
    async fn stream(&self, d: &Descriptor, session: Option<UploadSession>) -> Result<BlobOutcome> {
        let _permit = self.sem.acquire(d.size).await;
        // Boxed: a lone copy's stream (and its stack) does not carry the fan-out's upload.
        let session = match Box::pin(self.stream_fed(d, session)).await {
            Ok(()) => return Ok(BlobOutcome::Uploaded),
            Err(session) => session,
        };
        self.stream_own(d, session, None).await
    }

    /// Streams `d` from the source, read by this copy on its own, into `session` (or a new one),
    /// retrying with a new session; `opened` is the source read already open, for the first try.
    async fn stream_own(
        &self,
        d: &Descriptor,
        session: Option<UploadSession>,
        opened: Option<BlobSource>,
    ) -> Result<BlobOutcome> {
        let (session, opened) = (Mutex::new(session), Mutex::new(opened));
        self.client
            .retry_policy()
            .run(&format!("copy blob {}", d.digest.short()), |_| async {
                let s = session.lock().expect("session poisoned").take();
                let s = match s {
                    Some(s) => s,
                    None => self.client.start_upload(&self.dst).await?,
                };
                let opened = opened.lock().expect("opened poisoned").take();
                self.client
                    .stream_blob(
                        &self.src,
                        &self.dst,
                        s,
                        &d.digest,
                        d.size,
                        Some(self.progress.bytes_streamed.clone()),
                        opened,
                    )
                    .await
            })
            .await?;
        Ok(BlobOutcome::Uploaded)
    }

    /// With a fan-out: `d` fed by the shared read of the source into `session` (or a new one).
    /// Gives the session back when there is no shared read for this copy (it reads the source on
    /// its own, as it does after a failed fed upload).
    async fn stream_fed(
        &self,
        d: &Descriptor,
        session: Option<UploadSession>,
    ) -> std::result::Result<(), Option<UploadSession>> {
        let Some(f) = &self.fanout else {
            return Err(session);
        };
        let session = match session {
            Some(s) => s,
            None => self
                .client
                .start_upload(&self.dst)
                .await
                .map_err(|_| None)?,
        };
        let progress = Some(self.progress.bytes_streamed.clone());
        let Some(feed) = f
            .open(self.client, &self.src, &d.digest, d.size, progress)
            .await
        else {
            return Err(Some(session));
        };
        match self
            .client
            .upload_fed(&self.dst, session, d.size, feed)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(blob = %d.digest.short(), "uploading blob {} to {} from the shared read failed ({e}); reading the source on its own", d.digest.short(), self.dst);
                Err(None)
            }
        }
    }

    /// Pushes `m` under `reference`. A registry that says a blob or child is unknown (deleted by
    /// garbage collection since we checked) gets them again, once.
    async fn put(&self, m: &Manifest, reference: &str) -> Result<()> {
        match self.client.put_manifest(&self.dst, reference, m).await {
            Err(e) if matches!(e.code(), Some("MANIFEST_BLOB_UNKNOWN" | "MANIFEST_UNKNOWN")) => {
                if let Some(f) = m.blobs.iter().find(|b| !b.urls.is_empty()) {
                    return Err(Error::Refused {
                        reason: format!(
                            "{} refused manifest {}: it names the non-distributable layer {} (served from {}), which is not copied; allow foreign layers on the target or mirror an image without them",
                            self.dst.registry,
                            m.digest,
                            f.digest,
                            f.urls.join(", ")
                        ),
                    });
                }
                tracing::warn!(manifest = %m.digest.short(), "the target lost content of {} since it was checked ({e}); copying it again", m.digest.short());
                self.repair(m).await?;
                self.client.put_manifest(&self.dst, reference, m).await
            }
            Err(e)
                if (e.code() == Some("MANIFEST_INVALID") || e.status() == Some(415))
                    && artifact_type(m).is_some() =>
            {
                Err(Error::Refused {
                    reason: format!(
                        "{} refused artifact {} of type {} ({e}): allow that artifact type on the registry (Quay: FEATURE_GENERAL_OCI_SUPPORT and ALLOWED_OCI_ARTIFACT_TYPES), or mirror without referrers (--no-referrers, \"referrers\": false)",
                        self.dst.registry,
                        m.digest,
                        artifact_type(m).unwrap_or_default()
                    ),
                })
            }
            other => other,
        }
    }

    /// Copies again everything `m` names that the target lacks, children before parents.
    fn repair<'s>(&'s self, m: &'s Manifest) -> BoxFuture<'s, Result<()>> {
        Box::pin(async move {
            match m.kind {
                Kind::Image => {
                    for b in m.blobs.iter().filter(|b| b.urls.is_empty()) {
                        self.transfer_unguarded(b).await?;
                    }
                }
                Kind::Index => {
                    for d in &m.manifests {
                        let child = self.source_manifest(&d.digest).await?;
                        self.repair(&child).await?;
                        self.client
                            .put_manifest(&self.dst, &d.digest.to_string(), &child)
                            .await?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Reads every written manifest back by digest, and the tag, from the target (telling
    /// [`Progress::finishing`] first, if no write did).
    async fn verify(&self, top: &Manifest, tag: Option<&str>) -> Result<()> {
        self.progress.finishing.notify_one();
        let pushed = self.pushed.lock().expect("pushed poisoned").clone();
        let read_back = try_join_all(pushed.iter().map(|d| async move {
            let _permit = self.requests.acquire().await.expect("semaphore closed");
            self.client
                .get_manifest(&self.dst, &d.to_string(), Some(d))
                .await
                .map_err(|e| read_back_error(d, &self.dst, e))
        }));
        let (read, tagged) = futures_util::future::join(read_back, self.verify_tag(top, tag)).await;
        read?;
        tagged
    }

    /// The tag (if any) resolves to the top manifest on the target.
    async fn verify_tag(&self, top: &Manifest, tag: Option<&str>) -> Result<()> {
        if let Some(tag) = tag {
            let served = match self.client.head_manifest(&self.dst, tag).await? {
                Some(h) if h.digest.is_some() => h.digest,
                Some(_) => Some(self.client.get_manifest(&self.dst, tag, None).await?.digest),
                None => None,
            };
            if served.as_ref() != Some(&top.digest) {
                return Err(Error::Verify {
                    transient: false,
                    reason: format!(
                        "{}:{tag} resolves to {} instead of {}",
                        self.dst,
                        served
                            .map(|d| d.to_string())
                            .unwrap_or_else(|| "nothing".into()),
                        top.digest
                    ),
                });
            }
        }
        Ok(())
    }
}

/// A failure to read `d` back from `dst`: only what was read (a digest mismatch, a manifest that
/// is not there or not valid) is a verdict; a 5xx, a timeout or a cut is worth another try, and a
/// rate limit waits as such.
fn read_back_error(d: &Digest, dst: &Repo, e: Error) -> Error {
    match e {
        Error::RateLimited { .. } => e,
        e => Error::Verify {
            transient: e.is_transient(),
            reason: format!("reading {d} back from {dst}: {e}"),
        },
    }
}

/// The type of an artifact manifest (its config's media type when that is not an image config,
/// or the artifact manifest's own type); `None` for container images and indexes.
fn artifact_type(m: &Manifest) -> Option<String> {
    const IMAGE_CONFIGS: [&str; 2] = [
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    ];
    if m.media_type == super::manifest::OCI_ARTIFACT_MANIFEST {
        return Some(m.media_type.clone());
    }
    match (m.kind, m.blobs.first()) {
        (Kind::Image, Some(config)) if !IMAGE_CONFIGS.contains(&config.media_type.as_str()) => {
            Some(config.media_type.clone())
        }
        _ => None,
    }
}

#[cfg(test)]
mod read_back_tests {
    use super::*;

    #[test]
    fn only_a_verdict_on_the_bytes_is_permanent() {
        let d = Digest::sha256_of(b"m");
        let dst = Repo {
            registry: "r.example".into(),
            name: "a/b".into(),
        };
        let status = |status| Error::Status {
            method: "GET".into(),
            url: "u".into(),
            status,
            code: None,
            message: String::new(),
            retry_after: None,
        };
        let unavailable = read_back_error(&d, &dst, status(503));
        assert!(unavailable.is_transient(), "{unavailable}");
        assert!(unavailable.to_string().contains("reading sha256:"));
        let cut = Error::Truncated {
            what: "m".into(),
            received: 1,
            expected: 2,
        };
        assert!(read_back_error(&d, &dst, cut).is_transient());
        let mismatch = Error::DigestMismatch {
            what: "m".into(),
            expected: d.clone(),
            actual: Digest::sha256_of(b"x"),
        };
        assert!(!read_back_error(&d, &dst, mismatch).is_transient());
        assert!(!read_back_error(&d, &dst, status(404)).is_transient());
    }
}
