//! `mirror-mirror serve`: validate the configuration, open the database, start the workers and the
//! HTTP API, and shut down in order (stop claiming, give copies a grace period, release leases).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio_util::sync::CancellationToken;

use crate::config::ServeArgs;
use crate::drift::{DriftConfig, Watch};
use crate::http::{self, ApiConfig, ApiToken, AppState, GithubConfig};
use crate::mapping::{AllowList, TargetPrefix, Targets};
use crate::notify::Notifier;
use crate::registry::CopyOptions;
use crate::registry::guard::NetworkPolicy;
use crate::store::{Enqueuer, Store};
use crate::sync::{Sync, SyncConfig};
use crate::worker::{WorkerConfig, Workers};

/// Parses `MIRROR_API_TOKENS`: comma-separated `token` or `name=token`.
pub fn parse_tokens(s: &str) -> Result<Vec<ApiToken>> {
    let mut out = Vec::new();
    for (i, entry) in s
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .enumerate()
    {
        let (name, secret) = match entry.split_once('=') {
            Some((n, t)) => (n.trim().to_string(), t.trim()),
            None => (format!("token-{}", i + 1), entry),
        };
        if name.is_empty() {
            bail!(
                "MIRROR_API_TOKENS entry {} has an empty name before '='",
                i + 1
            );
        }
        if secret.len() < 16 {
            bail!(
                "MIRROR_API_TOKENS entry {} ({name}) is shorter than 16 characters; use a long random token (openssl rand -hex 32)",
                i + 1
            );
        }
        out.push(ApiToken::new(&name, secret));
    }
    if out.is_empty() {
        bail!(
            "MIRROR_API_TOKENS has no tokens; set it to name=token,… (openssl rand -hex 32 makes one)"
        );
    }
    Ok(out)
}

/// Runs the service until Ctrl-C or SIGTERM.
pub async fn run(args: ServeArgs) -> Result<()> {
    // An empty value (a compose file's `MIRROR_TARGET=`) is no value.
    let named = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
    let mut targets = match (named(&args.target), named(&args.targets)) {
        (Some(_), Some(_)) => bail!(
            "MIRROR_TARGET and MIRROR_TARGETS are both set; set MIRROR_TARGETS (name=prefix,…) alone, or MIRROR_TARGET for one target"
        ),
        (None, Some(list)) => {
            Targets::parse(&list).map_err(|e| anyhow::anyhow!("MIRROR_TARGETS: {e}"))?
        }
        (Some(one), None) => Targets::single(
            TargetPrefix::parse(&one).map_err(|e| anyhow::anyhow!("MIRROR_TARGET: {e}"))?,
        ),
        (None, None) => bail!(
            "MIRROR_TARGET is not set: name the repository prefix mirrors go under, such as ghcr.io/acme/mirror (or MIRROR_TARGETS=name=prefix,… for several)"
        ),
    };
    let registries = crate::cmd::registries(&args.registry)?;
    for t in targets.iter_mut() {
        let layout = match args.target_layout {
            Some(l) => l,
            None => registries
                .get(&t.prefix.registry)
                .layout()
                .unwrap_or_default(),
        };
        t.prefix = t.prefix.clone().with_layout(layout);
    }
    let tokens = parse_tokens(args.api_tokens.as_deref().context(
        "MIRROR_API_TOKENS is not set: POST /mirror needs at least one bearer token (name=token,…)",
    )?)?;
    let allowed_sources = AllowList::parse(&args.allowed_sources)
        .map_err(|e| anyhow::anyhow!("MIRROR_ALLOWED_SOURCES: {e}"))?;
    let split = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect()
    };
    let github = GithubConfig {
        secrets: args
            .github_webhook_secrets
            .as_deref()
            .map(split)
            .unwrap_or_default(),
        event_types: split(&args.github_event_types),
        repositories: args.github_repositories.as_deref().map(split),
    };
    if github.event_types.is_empty() {
        bail!("MIRROR_GITHUB_EVENT_TYPES is empty; name at least one event type (default: mirror)");
    }
    if let Some(r) = &github.repositories
        && let Some(bad) = r.iter().find(|p| p.split('/').count() != 2)
    {
        bail!("MIRROR_GITHUB_REPOSITORIES entry {bad:?} is not owner/repo or owner/*");
    }
    if github.secrets.is_empty() {
        tracing::warn!(
            "MIRROR_GITHUB_WEBHOOK_SECRETS is not set: POST /webhooks/github answers 503"
        );
    }
    let notifier = match (&args.notify_url, &args.notify_secret) {
        (Some(url), secret) => Some(
            Notifier::new(
                url,
                secret.as_deref().unwrap_or(""),
                args.notify_max_attempts,
            )
            .map_err(|e| anyhow::anyhow!(e))?,
        ),
        (None, Some(_)) => {
            bail!("MIRROR_NOTIFY_SECRET is set but MIRROR_NOTIFY_URL is not; set both or neither")
        }
        (None, None) => None,
    };
    let store = Store::open(&args.database)
        .await?
        .with_notices(notifier.is_some());
    let replica = replica_name();
    // Only public addresses, except the hosts the operator named: exact allow-listed sources and
    // the target.
    let mut trusted = allowed_sources.exact_hosts();
    trusted.extend(targets.iter().map(|t| t.prefix.registry.clone()));
    // The targets' credentials read the mirror namespaces and the trusted sources only.
    let prefixes: Vec<(String, String)> = targets
        .iter()
        .map(|t| (t.prefix.registry.clone(), t.prefix.path.clone()))
        .collect();
    let reach = crate::registry::trust::CredentialReach::for_targets(
        &prefixes,
        &args.trusted_source_credentials,
    )
    .map_err(anyhow::Error::msg)?;
    for t in targets.iter().filter(|t| t.prefix.path.is_empty()) {
        tracing::warn!(
            "target {} has no path: the whole of {} is the mirror's namespace, so its credentials can read any source there; put the mirrors under a path (such as {}/acme/mirror) to keep its private repositories out of requests' reach",
            t.name,
            t.prefix.registry,
            t.prefix.registry
        );
    }
    let client = crate::cmd::client(&args.registry, NetworkPolicy::public_only(trusted), reach)?
        // Blobs any replica put on the target are mounted from where they are, not uploaded.
        .with_blob_locations(Arc::new(crate::worker::StoreLocations::new(store.clone())));
    let workers = Workers::new(
        store.clone(),
        client.clone(),
        WorkerConfig {
            workers: args.workers as usize,
            lease: Duration::from_secs(args.lease),
            copy: CopyOptions {
                referrers: args.referrers,
                jobs: args.jobs as usize,
                repair: false,
                // A retried job still copies what refers to the image.
                referrers_when_up_to_date: true,
                fanout: None,
            },
            ..WorkerConfig::default()
        },
    )
    .with_notifier(notifier.clone());
    let drift = Watch::new(
        store.clone(),
        client.clone(),
        DriftConfig {
            interval: (args.drift_interval > 0).then(|| Duration::from_secs(args.drift_interval)),
            policy: args.drift_policy,
            concurrency: 4,
            max_attempts: args.max_attempts as i64,
            referrers: args.referrers,
        },
        workers.wake.clone(),
        notifier.clone(),
        &replica,
    );
    drift.refresh_open().await?;
    let sync = match &args.sync_file {
        None => None,
        Some(file) => Some(
            Sync::new(
                store.clone(),
                client.clone(),
                SyncConfig {
                    file: file.clone(),
                    interval: (args.sync_interval > 0)
                        .then(|| Duration::from_secs(args.sync_interval)),
                    targets: targets.clone(),
                    allowed_sources: allowed_sources.clone(),
                    max_attempts: args.max_attempts as i64,
                },
                workers.wake.clone(),
                &replica,
            )
            .map_err(|e| anyhow::anyhow!("MIRROR_SYNC_FILE: the mirror list was refused:\n{e}"))?,
        ),
    };
    let stop = CancellationToken::new();
    let state = AppState {
        store: store.clone(),
        config: Arc::new(ApiConfig {
            targets: targets.clone(),
            tokens,
            allowed_sources,
            read_requires_token: args.read_requires_token,
            max_attempts: args.max_attempts as i64,
            github,
        }),
        enqueuer: Enqueuer::start(store.clone()),
        workers_alive: workers.alive.clone(),
        workers_expected: args.workers as usize,
        drift: drift.clone(),
        client: client.clone(),
        sync: sync.clone(),
        stopping: stop.clone(),
        reads: Arc::new(crate::http::cache::ReadCache::new(
            usize::try_from(args.read_cache_mib).unwrap_or(usize::MAX) << 20,
            Duration::from_secs(args.read_cache_max_age),
        )),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("MIRROR_LISTEN: cannot listen on {}", args.listen))?;
    let abort = CancellationToken::new();
    let mut handles = workers.spawn(stop.clone(), abort.clone());
    handles.extend(drift.spawn(stop.clone()));
    handles.extend(sync.map(|s| s.spawn(stop.clone())));
    handles.extend(notifier.map(|n| n.spawn(store.clone(), stop.clone())));
    tracing::info!(
        listen = %listener.local_addr()?,
        targets = %targets.repos(),
        workers = args.workers,
        database = store.backend(),
        replica = %replica,
        "mirror-mirror serving on http://{}",
        listener.local_addr()?
    );
    let shutdown = {
        let stop = stop.clone();
        async move {
            wait_for_signal().await;
            // From here `/readyz` answers 503 and nothing new is claimed.
            stop.cancel();
            if args.shutdown_drain > 0 {
                tracing::info!(
                    drain_s = args.shutdown_drain,
                    "shutting down: /readyz answers 503; still serving for {}s (MIRROR_SHUTDOWN_DRAIN) while load balancers stop sending traffic; no new jobs are claimed",
                    args.shutdown_drain
                );
                // A second signal ends the drain early.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(args.shutdown_drain)) => {}
                    _ = wait_for_signal() => tracing::info!("second signal: the drain ends now"),
                }
            }
            tracing::info!(
                "shutting down: the listener closes; no new jobs are claimed; running copies get {}s",
                args.shutdown_grace
            );
        }
    };
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")?;
    let all = futures_util::future::join_all(handles);
    tokio::pin!(all);
    if tokio::time::timeout(Duration::from_secs(args.shutdown_grace), &mut all)
        .await
        .is_err()
    {
        tracing::warn!("grace period over: returning running jobs to the queue");
        abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), all).await;
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// This process's name in the rounds it runs: the host (the pod's name on Kubernetes) and pid.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
