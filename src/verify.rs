//! `verify`: checks that a mirror serves exactly the image of an official digest — the top
//! manifest, every child manifest and every blob present and hashing right, each read once and
//! streamed, nothing stored — and, when asked, that the source serves the same digest and that a
//! mirror-mirror service's ledger agrees.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures_util::StreamExt as _;
use serde::Serialize;

use crate::digest::Digest;
use crate::reference::ImageRef;
use crate::registry::manifest::{Descriptor, Kind, Manifest};
use crate::registry::{Client, Error, Repo, copy::MAX_DEPTH};

/// What to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// The mirror reference users pull (`ghcr.io/acme/mirror/…:v1` or `…@sha256:…`).
    pub mirror: ImageRef,
    /// The official digest the mirror must serve.
    pub digest: Digest,
    /// Where the image comes from, which must serve the same digest.
    pub source: Option<ImageRef>,
    /// Base URL of a running `mirror-mirror serve` whose ledger must record this mirror.
    pub ledger: Option<url::Url>,
    /// Bearer token for the ledger (when it has `MIRROR_READ_REQUIRES_TOKEN`).
    pub ledger_token: Option<String>,
    /// Manifests and blobs read at once.
    pub jobs: usize,
}

/// What kind of problem a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The mirror does not have a manifest or blob the image needs.
    Missing,
    /// The mirror serves other bytes (or another size) under a digest.
    Mismatch,
    /// The mirror's tag names another digest.
    TagMoved,
    /// The source serves another digest, or nothing, under the reference given.
    SourceDiffers,
    /// The ledger has no record of this mirror carrying this digest.
    LedgerDisagrees,
    /// A check could not be made (network, authentication, a refusal): nothing is known either way.
    Unchecked,
}

/// One problem, for people (`message`) and tools (`kind`, `what`).
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// What kind.
    pub kind: ProblemKind,
    /// What it is about: `manifest sha256:…`, `blob sha256:… (linux/arm64)`, `tag v1`, `source`, `ledger`.
    pub what: String,
    /// One line saying what is wrong.
    pub message: String,
}

/// What the source check found.
#[derive(Debug, Clone, Serialize)]
pub struct SourceCheck {
    /// The source reference.
    pub reference: String,
    /// The digest it serves now (`None` when it does not exist or could not be read).
    pub digest: Option<Digest>,
    /// Whether that is the official digest.
    pub agrees: bool,
}

/// What the ledger check found.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerCheck {
    /// The service asked.
    pub url: String,
    /// Whether it records this mirror (and source, if given) carrying the digest.
    pub agrees: bool,
    /// The mirrors it records for the digest.
    pub mirrors: Vec<String>,
    /// When it first verified the digest, as it says.
    pub first_verified_at: Option<String>,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `true` when every check passed.
    pub ok: bool,
    /// The one-line verdict.
    pub verdict: String,
    /// The mirror reference checked.
    pub mirror: String,
    /// The official digest.
    pub digest: Digest,
    /// The digest the mirror's tag names, when the reference has a tag.
    pub tag_digest: Option<Digest>,
    /// Manifests read and hashed (the top one and every child).
    pub manifests: usize,
    /// Blobs streamed and hashed.
    pub blobs: usize,
    /// Bytes of blobs streamed.
    pub blob_bytes: u64,
    /// Non-distributable layers (with `urls`), which live elsewhere and are not checked.
    pub foreign_blobs: usize,
    /// The platforms of the image (`linux/amd64`, …).
    pub platforms: Vec<String>,
    /// The source check, with `--source`.
    pub source: Option<SourceCheck>,
    /// The ledger check, with `--ledger`.
    pub ledger: Option<LedgerCheck>,
    /// What is wrong, if anything.
    pub problems: Vec<Problem>,
    /// Wall time.
    pub duration_ms: u64,
}

impl Report {
    /// The exit status for CI: 0 verified, 1 something is missing or different, 3 a check could
    /// not be made (and nothing was found wrong). 2 is left to usage errors.
    pub fn exit_code(&self) -> u8 {
        if self.ok {
            0
        } else if self
            .problems
            .iter()
            .any(|p| p.kind != ProblemKind::Unchecked)
        {
            1
        } else {
            3
        }
    }
}

/// A manifest still to read, with what it is for people.
struct Pending {
    digest: Digest,
    label: String,
    depth: usize,
}

/// A registry error as a problem about `what`.
fn problem(what: &str, err: &Error) -> Problem {
    let kind = match err {
        Error::Status { status: 404, .. } => ProblemKind::Missing,
        Error::DigestMismatch { .. }
        | Error::SizeMismatch { .. }
        | Error::Truncated { .. }
        | Error::ManifestTooLarge { .. }
        | Error::InvalidManifest { .. }
        | Error::Schema1 { .. } => ProblemKind::Mismatch,
        _ => ProblemKind::Unchecked,
    };
    let message = match kind {
        ProblemKind::Missing => format!("{what} is missing on the mirror"),
        ProblemKind::Mismatch => format!("{what} on the mirror is not the official content: {err}"),
        _ => format!("{what} could not be checked: {err}"),
    };
    Problem {
        kind,
        what: what.to_string(),
        message,
    }
}

/// Runs every check; registry and ledger failures become problems in the report, never errors.
pub async fn verify(client: &Client, opts: &Options) -> Report {
    let started = Instant::now();
    let repo = Repo::of(&opts.mirror);
    let jobs = opts.jobs.max(1);
    let mut problems = Vec::new();

    // The tag, when the reference has one: it must name the official digest.
    let mut tag_digest = None;
    if let Some(tag) = opts.mirror.tag() {
        match client.head_manifest(&repo, tag).await {
            Ok(Some(head)) => {
                let d = match head.digest {
                    Some(d) => Some(d),
                    // No Docker-Content-Digest on HEAD: hash the body.
                    None => match client.get_manifest(&repo, tag, None).await {
                        Ok(m) => Some(m.digest),
                        Err(e) => {
                            problems.push(problem(&format!("tag {tag}"), &e));
                            None
                        }
                    },
                };
                if let Some(d) = &d
                    && d != &opts.digest
                {
                    problems.push(Problem {
                        kind: ProblemKind::TagMoved,
                        what: format!("tag {tag}"),
                        message: format!(
                            "tag {tag} on the mirror names {d}, not {}: pull by digest ({repo}@{})",
                            opts.digest, opts.digest
                        ),
                    });
                }
                tag_digest = d;
            }
            Ok(None) => problems.push(Problem {
                kind: ProblemKind::Missing,
                what: format!("tag {tag}"),
                message: format!("tag {tag} is missing on the mirror"),
            }),
            Err(e) => problems.push(problem(&format!("tag {tag}"), &e)),
        }
    }

    // Every manifest once, by digest, level by level; then every blob once, streamed.
    let mut seen_manifests: HashSet<Digest> = HashSet::new();
    let mut blobs: Vec<(Descriptor, String)> = Vec::new();
    let mut seen_blobs: HashSet<Digest> = HashSet::new();
    let mut platforms = Vec::new();
    let mut foreign = 0;
    let mut level = vec![Pending {
        digest: opts.digest.clone(),
        label: format!("manifest {}", opts.digest),
        depth: 0,
    }];
    seen_manifests.insert(opts.digest.clone());
    while !level.is_empty() {
        let fetched: Vec<(Pending, Result<Manifest, Error>)> = futures_util::stream::iter(level)
            .map(|p| async {
                let r = client
                    .get_manifest(&repo, &p.digest.to_string(), Some(&p.digest))
                    .await;
                (p, r)
            })
            .buffered(jobs)
            .collect()
            .await;
        let mut next = Vec::new();
        for (p, r) in fetched {
            let m = match r {
                Ok(m) => m,
                Err(e) => {
                    problems.push(problem(&p.label, &e));
                    continue;
                }
            };
            match m.kind {
                Kind::Index => {
                    if p.depth >= MAX_DEPTH {
                        problems.push(Problem {
                            kind: ProblemKind::Mismatch,
                            what: p.label.clone(),
                            message: format!(
                                "{} nests indexes deeper than {MAX_DEPTH}: not an image mirror-mirror copies",
                                p.label
                            ),
                        });
                        continue;
                    }
                    for d in &m.manifests {
                        let platform = d.platform.as_ref().map(|p| p.to_string());
                        if let Some(pl) = &platform
                            && !pl.starts_with("unknown/")
                            && p.depth == 0
                        {
                            platforms.push(pl.clone());
                        }
                        if seen_manifests.insert(d.digest.clone()) {
                            next.push(Pending {
                                digest: d.digest.clone(),
                                label: match &platform {
                                    Some(pl) => format!("manifest {} ({pl})", d.digest),
                                    None => format!("manifest {}", d.digest),
                                },
                                depth: p.depth + 1,
                            });
                        }
                    }
                }
                Kind::Image => {
                    let of = p
                        .label
                        .split_once(" (")
                        .map(|(_, pl)| format!(" ({pl}"))
                        .unwrap_or_default();
                    for b in &m.blobs {
                        if !b.urls.is_empty() {
                            foreign += 1;
                            continue;
                        }
                        if seen_blobs.insert(b.digest.clone()) {
                            blobs.push((b.clone(), format!("blob {}{of}", b.digest)));
                        }
                    }
                }
            }
        }
        level = next;
    }
    let blob_bytes = AtomicU64::new(0);
    let blob_problems: Vec<Problem> = futures_util::stream::iter(blobs.iter())
        .map(|(d, label)| {
            let (repo, blob_bytes) = (&repo, &blob_bytes);
            async move {
                match client.hash_blob(repo, &d.digest, d.size).await {
                    Ok(Some(n)) => {
                        blob_bytes.fetch_add(n, Ordering::Relaxed);
                        None
                    }
                    Ok(None) => Some(Problem {
                        kind: ProblemKind::Missing,
                        what: label.clone(),
                        message: format!("{label} is missing on the mirror"),
                    }),
                    Err(e) => Some(problem(label, &e)),
                }
            }
        })
        .buffer_unordered(jobs)
        .filter_map(|p| async move { p })
        .collect()
        .await;
    problems.extend(blob_problems);

    let source = match &opts.source {
        Some(src) => Some(check_source(client, src, &opts.digest, &mut problems).await),
        None => None,
    };
    let ledger = match &opts.ledger {
        Some(url) => Some(check_ledger(url, opts, &mut problems).await),
        None => None,
    };

    let ok = problems.is_empty();
    let mut report = Report {
        ok,
        verdict: String::new(),
        mirror: opts.mirror.to_string(),
        digest: opts.digest.clone(),
        tag_digest,
        manifests: seen_manifests.len(),
        blobs: blobs.len(),
        blob_bytes: blob_bytes.into_inner(),
        foreign_blobs: foreign,
        platforms,
        source,
        ledger,
        problems,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    report.verdict = verdict(&report);
    report
}

/// The one-line verdict.
fn verdict(r: &Report) -> String {
    if r.ok {
        let mut s = format!(
            "OK {} serves {}: {} manifest(s), {} blob(s) ({}) present and matching",
            r.mirror,
            r.digest,
            r.manifests,
            r.blobs,
            crate::cmd::human_bytes(r.blob_bytes)
        );
        if r.source.is_some() {
            s.push_str("; the source serves the same digest");
        }
        if r.ledger.is_some() {
            s.push_str("; the ledger agrees");
        }
        return s;
    }
    let first = &r.problems[0].message;
    let more = match r.problems.len() {
        1 => String::new(),
        n => format!(" (and {} more problem(s))", n - 1),
    };
    let head = if r.exit_code() == 3 {
        "UNCHECKED"
    } else {
        "FAIL"
    };
    format!("{head} {} for {}: {first}{more}", r.mirror, r.digest)
}

async fn check_source(
    client: &Client,
    src: &ImageRef,
    want: &Digest,
    problems: &mut Vec<Problem>,
) -> SourceCheck {
    let repo = Repo::of(src);
    // By digest: it must be there; by tag: it must name the digest (a HEAD either way).
    let reference = match src.digest() {
        Some(d) => d.to_string(),
        None => src.tag().unwrap_or("latest").to_string(),
    };
    let found = match client.head_manifest(&repo, &reference).await {
        Ok(Some(head)) => match (head.digest, src.digest()) {
            (Some(d), _) => Ok(Some(d)),
            (None, Some(d)) => Ok(Some(d.clone())),
            (None, None) => client
                .get_manifest(&repo, &reference, None)
                .await
                .map(|m| Some(m.digest)),
        },
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    let digest = match found {
        Ok(d) => d,
        Err(e) => {
            problems.push(Problem {
                kind: ProblemKind::Unchecked,
                what: "source".into(),
                message: format!("the source {src} could not be checked: {e}"),
            });
            return SourceCheck {
                reference: src.to_string(),
                digest: None,
                agrees: false,
            };
        }
    };
    let agrees = digest.as_ref() == Some(want);
    if !agrees {
        problems.push(Problem {
            kind: ProblemKind::SourceDiffers,
            what: "source".into(),
            message: match &digest {
                Some(d) => format!("the source {src} serves {d}, not {want}"),
                None => format!("the source {src} does not exist"),
            },
        });
    }
    SourceCheck {
        reference: src.to_string(),
        digest,
        agrees,
    }
}

async fn check_ledger(base: &url::Url, opts: &Options, problems: &mut Vec<Problem>) -> LedgerCheck {
    let mut check = LedgerCheck {
        url: base.to_string(),
        agrees: false,
        mirrors: Vec::new(),
        first_verified_at: None,
    };
    let unchecked = |message: String| Problem {
        kind: ProblemKind::Unchecked,
        what: "ledger".into(),
        message,
    };
    let url = match base.join(&format!("digests/{}", opts.digest)) {
        Ok(u) => u,
        Err(e) => {
            problems.push(unchecked(format!("bad ledger URL {base}: {e}")));
            return check;
        }
    };
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("a plain HTTP client builds");
    let mut req = http.get(url.clone());
    if let Some(t) = &opts.ledger_token {
        req = req.bearer_auth(t);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            problems.push(unchecked(format!(
                "the ledger at {base} did not answer: {e}"
            )));
            return check;
        }
    };
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        problems.push(Problem {
            kind: ProblemKind::LedgerDisagrees,
            what: "ledger".into(),
            message: format!(
                "the ledger at {base} has no record of {}: it never mirrored it",
                opts.digest
            ),
        });
        return check;
    }
    if !status.is_success() {
        problems.push(unchecked(format!(
            "the ledger at {base} answered GET {} with HTTP {status}{}",
            url.path(),
            if status == reqwest::StatusCode::UNAUTHORIZED {
                " (give a read token with --ledger-token)"
            } else {
                ""
            }
        )));
        return check;
    }
    let body: serde_json::Value = match resp.json().await {
        Ok(b) => b,
        Err(e) => {
            problems.push(unchecked(format!(
                "the ledger at {base} answered with something that is not JSON: {e}"
            )));
            return check;
        }
    };
    check.first_verified_at = body["first_verified_at"].as_str().map(String::from);
    let records = body["records"].as_array().cloned().unwrap_or_default();
    let mirror_repo = opts.mirror.repo_name();
    let source_repo = opts.source.as_ref().map(|s| s.repo_name());
    for r in &records {
        if let Some(m) = r["mirror"].as_str()
            && !check.mirrors.iter().any(|x| x == m)
        {
            check.mirrors.push(m.to_string());
        }
    }
    check.agrees = records.iter().any(|r| {
        r["mirror"].as_str() == Some(mirror_repo.as_str())
            && r["digest"].as_str() == Some(opts.digest.to_string().as_str())
            && source_repo.as_deref().is_none_or(|s| {
                r["source"].as_str().is_some_and(|rs| {
                    rs.starts_with(&format!("{s}:")) || rs.starts_with(&format!("{s}@"))
                })
            })
    });
    if !check.agrees {
        problems.push(Problem {
            kind: ProblemKind::LedgerDisagrees,
            what: "ledger".into(),
            message: format!(
                "the ledger at {base} records {} for {}, not for {mirror_repo}{}",
                opts.digest,
                if check.mirrors.is_empty() {
                    "no mirror".to_string()
                } else {
                    check.mirrors.join(", ")
                },
                source_repo
                    .map(|s| format!(" from {s}"))
                    .unwrap_or_default()
            ),
        });
    }
    check
}
