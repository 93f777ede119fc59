//! The one-shot commands: glue between the command line and the library.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;

use anyhow::{Context as _, Result};

use crate::config::{CopyArgs, ImportArgs, RegistryArgs, VerifyArgs};
use crate::reference::ImageRef;
use crate::registry::client::UploadLimits;
use crate::registry::connect::TransportConfig;
use crate::registry::credentials::CredentialStore;
use crate::registry::guard::NetworkPolicy;
use crate::registry::proxy::ProxyConfig;
use crate::registry::retry::RetryPolicy;
use crate::registry::settings::Registries;
use crate::registry::tls::CertsDirs;
use crate::registry::trust::CredentialReach;
use crate::registry::{Client, ClientConfig, CopyOptions, Progress};

/// An error and its causes on one line, each said once: a cause whose text is already in the
/// line (registry errors carry their causes in their own message) is not repeated, nor is the
/// URL that reqwest adds to its messages.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let mut s = cause.to_string();
        if let Some(r) = cause.downcast_ref::<reqwest::Error>()
            && let Some(url) = r.url()
        {
            s = s.replace(&format!(" for url ({url})"), "");
        }
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// The registries file (`MIRROR_REGISTRIES_FILE`), checked whole; empty without one.
pub fn registries(args: &RegistryArgs) -> Result<Arc<Registries>> {
    match &args.registries_file {
        None => Ok(Arc::default()),
        Some(path) => Registries::load(path).map(Arc::new).map_err(|e| {
            anyhow::anyhow!("MIRROR_REGISTRIES_FILE: the registries file was refused:\n{e}")
        }),
    }
}

/// Builds the registry client from the shared flags, the registries file, the proxy variables and
/// the stored credentials (used where `reach` allows).
pub fn client(
    args: &RegistryArgs,
    network: NetworkPolicy,
    reach: CredentialReach,
) -> Result<Client> {
    let credentials = CredentialStore::load().context("loading registry credentials")?;
    let uploads = UploadLimits {
        chunk_size: args.chunk_size,
        max_body: None,
    };
    uploads
        .check()
        .map_err(|e| anyhow::anyhow!("--chunk-size (MIRROR_CHUNK_SIZE): {e}"))?;
    let proxy = ProxyConfig::from_env();
    proxy.check().map_err(anyhow::Error::msg)?;
    let registries = registries(args)?;
    // The registries file's chunk size and body limit per registry; the flag for the rest.
    let upload_limits = registries
        .iter()
        .filter(|(_, s)| s.chunk_size().is_some() || s.max_body().is_some())
        .map(|(host, s)| {
            let limits = UploadLimits {
                chunk_size: s.chunk_size().or(uploads.chunk_size),
                max_body: s.max_body(),
            };
            (host.to_string(), limits)
        })
        .collect();
    let transport = TransportConfig {
        certs: CertsDirs {
            extra: args.certs_dir.clone(),
            system: args
                .system_certs_dirs
                .iter()
                .filter(|d| !d.as_os_str().is_empty())
                .cloned()
                .collect(),
        },
        registries,
        insecure: Vec::new(),
    };
    let config = ClientConfig {
        transport,
        credential_reach: reach,
        insecure_registries: args.insecure_registries.clone(),
        retry: RetryPolicy {
            max_attempts: args.retries,
            ..RetryPolicy::default()
        },
        network: network.with_proxy(proxy),
        rate_limit_max_wait: std::time::Duration::from_secs(args.rate_limit_max_wait),
        default_upload_limits: uploads,
        upload_limits,
        ..ClientConfig::default()
    };
    Ok(Client::new(config, credentials)?)
}

/// `mirror-mirror copy`: copies, prints the pull line (or the JSON result) on stdout.
pub async fn copy(args: CopyArgs) -> Result<()> {
    let source = ImageRef::parse_source(&args.source)
        .with_context(|| format!("source {:?} is not a valid image reference", args.source))?;
    let target = match args.layout {
        None => ImageRef::parse(&args.target)
            .with_context(|| format!("target {:?} is not a valid image reference", args.target))?,
        Some(layout) => {
            let prefix = crate::mapping::TargetPrefix::parse(&args.target)
                .map_err(|e| anyhow::anyhow!("target prefix: {e}"))?
                .with_layout(layout);
            let repo = prefix.repo_for(&source).map_err(anyhow::Error::msg)?;
            ImageRef::parse(&repo)
                .with_context(|| format!("mapped target {repo:?} is not a valid reference"))?
                .with_tag(source.tag().map(str::to_string))
        }
    };
    // The user names the registries here, as with crane: no address restriction.
    // The one user owns both credentials and names both images: no credential reach either.
    let client = client(
        &args.registry,
        NetworkPolicy::permissive(),
        CredentialReach::unrestricted(),
    )?;
    let options = CopyOptions {
        jobs: args.jobs as usize,
        referrers: !args.no_referrers,
        repair: false,
        referrers_when_up_to_date: false,
        fanout: None,
    };
    if args.dry_run {
        let plan = if args.platforms.is_empty() {
            crate::registry::dry_run(&client, &source, &target, &options).await
        } else {
            crate::registry::copy::copy_platforms(
                &client,
                &source,
                &target,
                &options,
                &args.platforms,
                Arc::new(Progress::default()),
                true,
            )
            .await
        }
        .with_context(|| format!("planning a copy of {source} to {target}"))?;
        let mut out = std::io::stdout().lock();
        if args.json {
            serde_json::to_writer_pretty(&mut out, &plan)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", dry_run_line(&plan))?;
        }
        return Ok(());
    }
    let progress = Arc::new(Progress::default());
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(draw_progress(progress.clone())));
    let result = if args.platforms.is_empty() {
        crate::registry::copy(&client, &source, &target, &options, progress).await
    } else {
        crate::registry::copy::copy_platforms(
            &client,
            &source,
            &target,
            &options,
            &args.platforms,
            progress,
            false,
        )
        .await
    };
    if let Some(bar) = bar {
        bar.abort();
        eprint!("\r\x1b[K");
    }
    let result = result.with_context(|| format!("copying {source} to {}", target))?;
    tracing::info!(
        "{} {} → {} ({}): {} manifest(s), {} platform(s), blobs {} copied / {} mounted / {} already there, {} moved in {:.1}s",
        if result.up_to_date {
            "up to date"
        } else {
            "copied"
        },
        result.source,
        result.target,
        result.source_digest,
        result.manifests.len(),
        result.platforms.len(),
        result.blobs_uploaded,
        result.blobs_mounted,
        result.blobs_skipped,
        human_bytes(result.bytes_moved),
        result.duration_ms as f64 / 1000.0,
    );
    if result.subset {
        for c in &result.children {
            eprintln!(
                "platform {}: {}@{} (official digest, as listed in {})",
                c.platform,
                result.pull.split('@').next().unwrap_or_default(),
                c.digest,
                result.source_digest,
            );
        }
        if result.index_rebuilt == Some(true) {
            eprintln!(
                "warning: {} names a REBUILT index {} holding only {}: it is NOT an official digest (the official index is {}); each child above keeps its official digest",
                result.target,
                result.target_digest,
                result.platforms.join(", "),
                result.source_digest,
            );
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &result)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", result.pull)?;
    }
    Ok(())
}

/// `mirror-mirror import`: copies the SQLite store into the empty PostgreSQL one and prints what
/// it moved, one line.
pub async fn import(args: ImportArgs) -> Result<()> {
    let moved = crate::store::import::sqlite_to_postgres(&args.from, &args.to).await?;
    println!(
        "imported {} into {}: {moved}",
        args.from,
        redact_url(&args.to)
    );
    Ok(())
}

/// `url` without its password, to print.
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// `mirror-mirror verify`: prints the verdict line (or the JSON report) on stdout, each problem
/// on stderr; returns the exit status (0 verified, 1 missing or different, 3 could not check).
pub async fn verify(args: VerifyArgs) -> Result<u8> {
    let digest = match (&args.digest, args.mirror.digest()) {
        (Some(d), Some(r)) if d != r => {
            eprintln!("error: MIRROR_REF names {r} but --digest says {d}: give one digest");
            return Ok(2);
        }
        (Some(d), _) | (None, Some(d)) => d.clone(),
        (None, None) => {
            eprintln!(
                "error: give the official digest: --digest sha256:… (or MIRROR_REF@sha256:…)"
            );
            return Ok(2);
        }
    };
    let client = client(
        &args.registry,
        NetworkPolicy::permissive(),
        CredentialReach::unrestricted(),
    )?;
    let options = crate::verify::Options {
        mirror: args.mirror.clone().with_digest(None),
        digest,
        source: args.source.clone(),
        ledger: args.ledger.clone(),
        ledger_token: args.ledger_token.as_ref().map(|t| t.0.clone()),
        jobs: args.jobs as usize,
    };
    let report = crate::verify::verify(&client, &options).await;
    for p in &report.problems {
        eprintln!("problem: {}", p.message);
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", report.verdict)?;
    }
    Ok(report.exit_code())
}

/// The one-line summary of a dry run.
pub fn dry_run_line(p: &crate::registry::CopyResult) -> String {
    if p.up_to_date {
        return format!(
            "dry run: {} already serves {} ({}): nothing to copy",
            p.target, p.source_digest, p.source
        );
    }
    format!(
        "dry run: {} → {} ({}): {} manifest(s) to push, {} already there; blobs {} to upload / {} to mount / {} already there; {} to move; nothing written",
        p.source,
        p.target,
        p.source_digest,
        p.manifests_pushed,
        p.manifests_skipped,
        p.blobs_uploaded,
        p.blobs_mounted,
        p.blobs_skipped,
        human_bytes(p.bytes_moved),
    )
}

/// Redraws a one-line progress bar on the terminal until aborted.
async fn draw_progress(p: Arc<Progress>) {
    use std::sync::atomic::Ordering::Relaxed;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let total = p.bytes_total.load(Relaxed);
        let done = p
            .bytes_streamed
            .load(Relaxed)
            .max(p.bytes_done.load(Relaxed))
            .min(total);
        let width = 30;
        let filled = if total == 0 {
            0
        } else {
            (done as f64 / total as f64 * width as f64) as usize
        };
        eprint!(
            "\r\x1b[K[{}{}] {} / {}  blobs {}/{}",
            "#".repeat(filled.min(width)),
            " ".repeat(width - filled.min(width)),
            human_bytes(done),
            human_bytes(total),
            p.blobs_done.load(Relaxed),
            p.blobs_total.load(Relaxed),
        );
    }
}

/// `1.5 MiB`-style sizes for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
