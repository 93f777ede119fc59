//! The worker loop: claim a job, copy it under a renewed lease, record it in the ledger or schedule
//! a retry. Nothing here knows about HTTP.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::digest::Digest;
use crate::notify::Notifier;
use crate::reference::ImageRef;
use crate::registry::fanout::{Fanout, Member};
use crate::registry::{self, Client, CopyOptions, Progress};
use crate::store::{
    Job, JobReferrers, JobState, Landed, Lease, NewRecord, ProgressRow, ReferrersState, Store,
    Subset, SubsetChild, now_ms,
};

/// The store's `blob_location` as the copy engine's shared record of where blobs are on
/// targets: a copy on any replica mounts what another uploaded, and a blob one replica is moving
/// now is waited for (the store's `blob_claim`) instead of uploaded again. A failed look-up or
/// write costs at most an upload, so it is logged, not fatal.
pub struct StoreLocations {
    store: Store,
    /// The claims this process holds: (registry, digest) → token, and the task renewing it.
    held: std::sync::Mutex<
        std::collections::HashMap<(String, String), (String, tokio::task::AbortHandle)>,
    >,
}

impl StoreLocations {
    /// The record in `store`.
    pub fn new(store: Store) -> StoreLocations {
        StoreLocations {
            store,
            held: Default::default(),
        }
    }

    async fn release(&self, registry: &str, digest: &str) {
        let held = self
            .held
            .lock()
            .expect("claims poisoned")
            .remove(&(registry.to_string(), digest.to_string()));
        if let Some((token, renewing)) = held {
            renewing.abort();
            self.drop_claim(registry, digest, &token).await;
        }
    }

    /// Gives up the claim `token` on `digest` at `registry` (logged if it fails: it expires).
    async fn drop_claim(&self, registry: &str, digest: &str, token: &str) {
        if let Err(e) = self.store.release_blob_claim(registry, digest, token).await {
            tracing::warn!(
                "releasing the claim on {digest} at {registry} failed (it expires in {} s): {e}",
                BLOB_CLAIM.as_secs()
            );
        }
    }
}

/// Repositories tried per blob before uploading it.
const MOUNT_CANDIDATES: i64 = 4;

/// A claim on a blob in flight: renewed every third of it while the transfer runs.
const BLOB_CLAIM: Duration = Duration::from_secs(30);

/// How often a copy waiting for another replica's transfer looks again.
const BLOB_WAIT_POLL: Duration = Duration::from_millis(200);

/// Longest a copy waits for another replica's transfer before it uploads the blob itself (a
/// holder whose copy was dropped mid-transfer keeps renewing until [`BLOB_HOLD`]).
const BLOB_WAIT: Duration = Duration::from_secs(300);

/// Longest a claim is renewed.
const BLOB_HOLD: Duration = Duration::from_secs(900);

impl registry::locations::BlobLocations for StoreLocations {
    fn locate<'a>(
        &'a self,
        registry: &'a str,
        digest: &'a str,
        repo: &'a str,
    ) -> registry::locations::Pending<'a, Vec<String>> {
        Box::pin(async move {
            let mut waited = false;
            let deadline = tokio::time::Instant::now() + BLOB_WAIT;
            loop {
                match self
                    .store
                    .blob_repos(registry, digest, MOUNT_CANDIDATES)
                    .await
                {
                    Ok(repos) if !repos.is_empty() => {
                        if waited {
                            tracing::debug!(
                                blob = digest,
                                "another replica moved {digest} into {registry}; mounting it"
                            );
                        }
                        return repos;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(
                            "looking up where {digest} is on {registry} failed (it is uploaded if missing): {e}"
                        );
                        return Vec::new();
                    }
                }
                let token = hex::encode(rand::random::<[u8; 16]>());
                match self
                    .store
                    .claim_blob(registry, digest, repo, &token, BLOB_CLAIM)
                    .await
                {
                    Ok(None) => {
                        // A transfer that ended between the look-up above and this claim recorded
                        // the blob before releasing its claim: look once more, or it goes up twice.
                        if let Ok(repos) = self
                            .store
                            .blob_repos(registry, digest, MOUNT_CANDIDATES)
                            .await
                            && !repos.is_empty()
                        {
                            self.drop_claim(registry, digest, &token).await;
                            return repos;
                        }
                        let (store, r, d, t) = (
                            self.store.clone(),
                            registry.to_string(),
                            digest.to_string(),
                            token.clone(),
                        );
                        let renewing = tokio::spawn(async move {
                            let until = tokio::time::Instant::now() + BLOB_HOLD;
                            while tokio::time::Instant::now() < until {
                                tokio::time::sleep(BLOB_CLAIM / 3).await;
                                match store.renew_blob_claim(&r, &d, &t, BLOB_CLAIM).await {
                                    Ok(true) => {}
                                    Ok(false) => return,
                                    Err(e) => tracing::warn!(
                                        "renewing the claim on {d} at {r} failed: {e}"
                                    ),
                                }
                            }
                        });
                        self.held.lock().expect("claims poisoned").insert(
                            (registry.to_string(), digest.to_string()),
                            (token, renewing.abort_handle()),
                        );
                        return Vec::new();
                    }
                    Ok(Some(holder)) if tokio::time::Instant::now() < deadline => {
                        if !waited {
                            tracing::debug!(
                                blob = digest,
                                "another replica is moving {digest} into {registry}/{holder}; waiting to mount it"
                            );
                        }
                        waited = true;
                        tokio::time::sleep(BLOB_WAIT_POLL).await;
                    }
                    Ok(Some(holder)) => {
                        tracing::warn!(
                            "{registry}/{holder} has been getting {digest} for {} s; uploading it here too",
                            BLOB_WAIT.as_secs()
                        );
                        return Vec::new();
                    }
                    Err(e) => {
                        tracing::warn!(
                            "claiming the move of {digest} into {registry} failed (uploading it): {e}"
                        );
                        return Vec::new();
                    }
                }
            }
        })
    }

    fn record<'a>(
        &'a self,
        registry: &'a str,
        repo: &'a str,
        digest: &'a str,
    ) -> registry::locations::Pending<'a, ()> {
        Box::pin(async move {
            if let Err(e) = self
                .store
                .record_blobs(registry, repo, &[digest.to_string()])
                .await
            {
                tracing::warn!("recording that {registry}/{repo} holds {digest} failed: {e}");
            }
            self.release(registry, digest).await;
        })
    }

    fn abandon<'a>(
        &'a self,
        registry: &'a str,
        digest: &'a str,
    ) -> registry::locations::Pending<'a, ()> {
        Box::pin(self.release(registry, digest))
    }
}

/// How the workers run.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Copies running at once.
    pub workers: usize,
    /// Lease length; renewed every third of it while a copy runs.
    pub lease: Duration,
    /// How often idle workers look for due jobs (they are also woken on enqueue).
    pub poll: Duration,
    /// Concurrency inside one copy.
    pub copy: CopyOptions,
    /// First backoff after a transient failure; doubles per attempt, capped at `max_backoff`.
    pub backoff: Duration,
    /// Ceiling of the backoff between attempts.
    pub max_backoff: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            workers: 4,
            lease: Duration::from_secs(30),
            poll: Duration::from_secs(2),
            copy: CopyOptions::default(),
            backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(600),
        }
    }
}

/// What the workers share.
#[derive(Clone)]
pub struct Workers {
    store: Store,
    client: Client,
    config: Arc<WorkerConfig>,
    /// Rung on enqueue so an idle worker starts at once.
    pub wake: Arc<Notify>,
    /// Worker tasks currently running their loop (for `/readyz`).
    pub alive: Arc<std::sync::atomic::AtomicUsize>,
    notifier: Option<Notifier>,
}

impl Workers {
    /// Workers over `store` (woken by its enqueues), copying with `client`.
    pub fn new(store: Store, client: Client, config: WorkerConfig) -> Workers {
        Workers {
            wake: store.wake(),
            store,
            client,
            config: Arc::new(config),
            alive: Arc::default(),
            notifier: None,
        }
    }

    /// Stores a completion notice in the outbox with each job's result, and wakes `notifier`'s
    /// sender.
    pub fn with_notifier(mut self, notifier: Option<Notifier>) -> Workers {
        self.notifier = notifier;
        self
    }

    /// Starts the worker tasks. They stop claiming when `stop` is cancelled and finish the copy in
    /// hand; when `abort` is cancelled they drop it and give the job back to the queue.
    pub fn spawn(
        &self,
        stop: CancellationToken,
        abort: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.config.workers.max(1))
            .map(|n| {
                let w = self.clone();
                let (stop, abort) = (stop.clone(), abort.clone());
                let supervisor = supervise(n, stop.clone(), RESTART_PAUSE, move || {
                    let (w, stop, abort) = (w.clone(), stop.clone(), abort.clone());
                    async move { w.run(n, stop, abort).await }
                });
                tokio::spawn(async move {
                    supervisor.await;
                })
            })
            .collect()
    }

    async fn run(&self, n: usize, stop: CancellationToken, abort: CancellationToken) {
        tracing::debug!(worker = n, "worker started");
        // Counted while this loop runs, and uncounted however it ends (a panic included), so
        // `/readyz` sees a dead worker.
        let _alive = Alive::new(&self.alive);
        // The last job's tail: once only its last write is left (the top manifest), that write's
        // answer, the read-back, referrers and ledger write go on beside the next job's copy (one
        // tail at a time, under its own lease).
        let mut tail: Option<tokio::task::JoinHandle<()>> = None;
        while !stop.is_cancelled() {
            // The lease runs from before the claim was sent: the worker's idea of its expiry is
            // never later than the database's.
            let claimed_at = Instant::now();
            match self.store.claim_group(self.config.lease).await {
                Ok(mut leases) if !leases.is_empty() => {
                    let lease = leases.remove(0);
                    if leases.is_empty() {
                        let span = tracing::info_span!("job", job.id = lease.job.id, image.src = %lease.job.source);
                        let progress = Arc::new(Progress::default());
                        let mut job = tokio::spawn({
                            let (w, abort, progress) =
                                (self.clone(), abort.clone(), progress.clone());
                            async move {
                                w.run_job(lease, claimed_at, &abort, None, progress)
                                    .instrument(span)
                                    .await
                            }
                        });
                        let finishing = tokio::select! {
                            ended = &mut job => {
                                rethrow(ended);
                                false
                            }
                            _ = progress.finishing.notified() => true,
                        };
                        if let Some(last) = tail.take() {
                            rethrow(last.await);
                        }
                        if finishing {
                            tail = Some(job);
                        }
                    } else {
                        // Boxed: the group's futures stay off the worker loop's own state (and stack).
                        Box::pin(self.run_together(lease, leases, claimed_at, &abort)).await;
                    }
                }
                Ok(_) => {
                    let wait = match self.store.next_due().await {
                        Ok(Some(due)) => due,
                        _ => self.config.poll,
                    }
                    .min(self.config.poll);
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => {}
                    }
                }
                Err(e) => {
                    tracing::error!(worker = n, "claiming a job failed: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(self.config.poll) => {}
                        _ = stop.cancelled() => {}
                    }
                }
            }
        }
        if let Some(last) = tail {
            rethrow(last.await);
        }
        tracing::debug!(worker = n, "worker stopped");
    }

    /// Jobs of one request (its targets) claimed together: the source resolved once, then one
    /// copy per target, each under its own lease and with its own result, sharing the source
    /// reads (a [`Fanout`]: each manifest and blob read from the source once for all of them).
    async fn run_together(
        &self,
        lead: Lease,
        others: Vec<Lease>,
        claimed_at: Instant,
        abort: &CancellationToken,
    ) {
        tracing::info!(
            "job {}: copying with job(s) {} of the same request, reading the source once",
            lead.job.id,
            others
                .iter()
                .map(|l| l.job.id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.settle_request_digest(&lead).await;
        let fanout = Fanout::new(1 + others.len());
        let runs = std::iter::once(lead)
            .chain(others)
            .enumerate()
            .map(|(i, lease)| {
                let span = tracing::info_span!("job", job.id = lease.job.id, image.src = %lease.job.source);
                let progress = Arc::new(Progress::default());
                self.run_job(lease, claimed_at, abort, Some(fanout.member(i)), progress)
                    .instrument(span)
            });
        futures_util::future::join_all(runs).await;
    }

    /// Resolves the source of `lead`'s request once, for the jobs claimed with it: each then finds
    /// the request's digest settled. A failure is left to each job's own resolve, which reports it.
    async fn settle_request_digest(&self, lead: &Lease) {
        let job = &lead.job;
        if job.source_digest.is_some()
            || !matches!(self.store.request_digest(job.id).await, Ok(None))
        {
            return;
        }
        let Ok(source) = ImageRef::parse_source(&job.source) else {
            return;
        };
        // Within a third of the lease: the jobs' heartbeats start after it (a source throttling
        // us leaves the resolve to each job, under its renewed lease).
        let resolved = tokio::time::timeout(
            self.config.lease / 3,
            registry::resolve(&self.client, &source),
        )
        .await;
        match resolved {
            Err(_) => tracing::debug!(
                "job {}: resolving {} for the request took too long (each target resolves it)",
                job.id,
                job.source
            ),
            Ok(Ok(d)) => {
                if let Err(e) = self
                    .store
                    .settle_request_digest(job.id, &d.to_string())
                    .await
                {
                    tracing::warn!(
                        "job {}: storing the request's digest failed (each target resolves it): {e}",
                        job.id
                    );
                }
            }
            Ok(Err(e)) => tracing::debug!(
                "job {}: resolving {} for the request failed (each target tries on its own): {e}",
                job.id,
                job.source
            ),
        }
    }

    async fn run_job(
        &self,
        lease: Lease,
        claimed_at: Instant,
        abort: &CancellationToken,
        fanout: Option<Member>,
        progress: Arc<Progress>,
    ) {
        let job = &lease.job;
        tracing::info!(
            attempt = job.attempts,
            "job {} started: {} → {}",
            job.id,
            job.source,
            job.target_repo
        );
        let started = std::time::Instant::now();
        let lost = CancellationToken::new();
        let heartbeat = AbortOnDrop(tokio::spawn(keep_lease(
            self.store.clone(),
            lease.clone(),
            progress.clone(),
            lost.clone(),
            claimed_at,
            self.config.lease,
        )));
        let outcome = tokio::select! {
            r = self.copy(&lease, progress.clone(), fanout) => Some(r),
            _ = lost.cancelled() => None,
            _ = abort.cancelled() => {
                drop(heartbeat);
                match self.store.release(&lease).await {
                    Ok(_) => tracing::info!("job {}: shutting down; returned to the queue", job.id),
                    Err(e) => tracing::error!("job {}: could not release its lease at shutdown (it expires on its own): {e}", job.id),
                }
                return;
            }
        };
        drop(heartbeat);
        let Some(outcome) = outcome else { return };
        let m = &crate::metrics::METRICS;
        // What the metrics count once the result is written (and only then: a worker that lost
        // its lease finished nothing).
        let mut copied = None;
        let mut finished = false;
        let (written, noticed) = match outcome {
            Ok((record, result)) => {
                copied = Some((
                    result.bytes_moved,
                    result.blobs_uploaded as u64,
                    result.blobs_mounted as u64,
                    result.blobs_skipped as u64,
                ));
                finished = true;
                let notice = self.notifier.is_some().then(|| {
                    let ended = Job {
                        state: JobState::Succeeded,
                        source_digest: Some(record.source_digest.clone()),
                        last_error: None,
                        ..job.clone()
                    };
                    ended.end_notice(Some(&Landed {
                        job_id: job.id,
                        mirror_repo: record.mirror_repo.clone(),
                        mirror_digest: record.mirror_digest.clone(),
                    }))
                });
                // Referrers are their own step: whatever happened to them, the image stands.
                let referrers = (self.config.copy.referrers && job.referrers).then(|| {
                    if !result.referrers_failed.is_empty() {
                        tracing::warn!(
                            failed = result.referrers_failed.len(),
                            "job {}: the image is mirrored; {} referrer(s) could not be copied (drift watch tries again)",
                            job.id,
                            result.referrers_failed.len()
                        );
                    }
                    JobReferrers {
                        state: if result.referrers_failed.is_empty() {
                            ReferrersState::Copied
                        } else {
                            ReferrersState::Failed
                        },
                        failed: serde_json::to_value(&result.referrers_failed)
                            .unwrap_or_else(|_| serde_json::json!([])),
                    }
                });
                let r = self
                    .store
                    .succeed_with_record(
                        &lease,
                        &record,
                        progress_row(&progress),
                        referrers.as_ref(),
                        notice.as_ref(),
                    )
                    .await;
                if let Ok(true) = r {
                    tracing::info!(digest = %record.source_digest, "job {} succeeded: {}@{}", job.id, record.mirror_repo, record.source_digest);
                }
                (r, notice.is_some())
            }
            Err(JobError::RateLimited(msg, after)) => {
                tracing::warn!(
                    delay_ms = after.as_millis() as u64,
                    "job {} waits for a registry's rate limit; back in the queue, attempt not counted: {msg}",
                    job.id
                );
                (self.store.defer(&lease, &msg, after).await, false)
            }
            Err(JobError::Transient(msg)) if job.attempts < job.max_attempts => {
                let delay = self.backoff(job.attempts as u32);
                tracing::warn!(
                    delay_ms = delay.as_millis() as u64,
                    "job {} attempt {} failed, will retry: {msg}",
                    job.id,
                    job.attempts
                );
                (self.store.retry_later(&lease, &msg, delay).await, false)
            }
            Err(JobError::Transient(msg) | JobError::Permanent(msg)) => {
                tracing::error!("job {} failed: {msg}", job.id);
                finished = true;
                let notice = self.notifier.is_some().then(|| {
                    let ended = Job {
                        state: JobState::Failed,
                        last_error: Some(msg.clone()),
                        ..job.clone()
                    };
                    ended.end_notice(None)
                });
                (
                    self.store.fail(&lease, &msg, notice.as_ref()).await,
                    notice.is_some(),
                )
            }
        };
        match written {
            Ok(true) => {
                if let Some((bytes, uploaded, mounted, skipped)) = copied {
                    m.bytes_copied.add(bytes);
                    m.blobs_uploaded.add(uploaded);
                    m.blobs_mounted.add(mounted);
                    m.blobs_skipped.add(skipped);
                }
                if finished {
                    m.job_finished(started.elapsed().as_secs_f64());
                }
                if let (Some(n), true) = (&self.notifier, noticed) {
                    n.wake();
                }
            }
            Ok(false) => tracing::warn!(
                "job {}: lease lost before the result was written; another worker owns it",
                job.id
            ),
            Err(e) => tracing::error!("job {}: writing the result failed: {e}", job.id),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        registry::retry::backoff(self.config.backoff, self.config.max_backoff, attempt)
    }

    /// One attempt: resolve (first time only), copy the pinned digest, build the ledger record.
    async fn copy(
        &self,
        lease: &Lease,
        progress: Arc<Progress>,
        fanout: Option<Member>,
    ) -> Result<(NewRecord, registry::CopyResult), JobError> {
        let job = &lease.job;
        let source = ImageRef::parse_source(&job.source).map_err(|e| {
            JobError::Permanent(format!("stored source {:?} is invalid: {e}", job.source))
        })?;
        // The digest copied: the job's, or its request's when a sibling settled it; else the copy
        // resolves the source while it reads the target's tag (one round trip), and pins what it
        // resolved as the request's digest before anything else uses it.
        let digest =
            match &job.source_digest {
                Some(d) => Some(Digest::parse(d).map_err(|e| {
                    JobError::Permanent(format!("stored digest {d:?} is invalid: {e}"))
                })?),
                None => match self.store.request_digest(job.id).await.map_err(|e| {
                    JobError::Transient(format!("reading the request's digest: {e}"))
                })? {
                    Some(d) => Some(self.pin(lease, &d).await?),
                    None => None,
                },
            };
        let source_for_copy = match &digest {
            Some(d) => source.clone().with_digest(Some(d.clone())),
            None => source.clone(),
        };
        let target_text = match &job.target_tag {
            Some(t) => format!("{}:{t}", job.target_repo),
            None => job.target_repo.clone(),
        };
        let target = ImageRef::parse(&target_text).map_err(|e| {
            JobError::Permanent(format!("stored target {target_text:?} is invalid: {e}"))
        })?;
        let options = registry::CopyOptions {
            referrers: self.config.copy.referrers && job.referrers,
            repair: job.repair,
            fanout,
            ..self.config.copy.clone()
        };
        let specs: Vec<registry::platforms::PlatformSpec> = job
            .platforms
            .iter()
            .flat_map(|p| p.names())
            .map(|p| {
                p.parse().map_err(|e| {
                    JobError::Permanent(format!("stored platform {p:?} is invalid: {e}"))
                })
            })
            .collect::<Result<_, _>>()?;
        // Why pinning failed, when it did (the copy only sees that it did).
        let pin_failed: std::sync::Mutex<Option<JobError>> = Default::default();
        let result = match digest {
            Some(_) if specs.is_empty() => {
                registry::copy(&self.client, &source_for_copy, &target, &options, progress).await
            }
            Some(_) => {
                registry::copy::copy_platforms(
                    &self.client,
                    &source_for_copy,
                    &target,
                    &options,
                    &specs,
                    progress,
                    false,
                )
                .await
            }
            None => {
                let failed = &pin_failed;
                let settle: registry::copy::Settle<'_> = Box::new(move |resolved| {
                    Box::pin(async move {
                        let settled = async {
                            let d = self
                                .store
                                .settle_request_digest(job.id, &resolved.to_string())
                                .await
                                .map_err(|e| {
                                    JobError::Transient(format!(
                                        "storing the request's digest: {e}"
                                    ))
                                })?;
                            self.pin(lease, &d).await
                        };
                        settled.await.map_err(|e| {
                            let text = match &e {
                                JobError::Transient(m)
                                | JobError::Permanent(m)
                                | JobError::RateLimited(m, _) => m.clone(),
                            };
                            *failed.lock().expect("pin_failed poisoned") = Some(e);
                            registry::Error::Invalid(text)
                        })
                    })
                });
                registry::copy::copy_settling(
                    &self.client,
                    &source_for_copy,
                    &target,
                    &options,
                    &specs,
                    progress,
                    settle,
                )
                .await
            }
        }
        .map_err(|e| {
            pin_failed
                .lock()
                .expect("pin_failed poisoned")
                .take()
                .unwrap_or_else(|| JobError::from(e))
        })?;
        // A subset says what was left out: the children copied, by their official digests.
        let subset = result.subset.then(|| Subset {
            platforms: result.platforms.clone(),
            children: result
                .children
                .iter()
                .map(|c| SubsetChild {
                    platform: c.platform.clone(),
                    digest: c.digest.to_string(),
                    attestations: c.attestations.iter().map(ToString::to_string).collect(),
                })
                .collect(),
        });
        let record = NewRecord {
            job_id: job.id,
            source_repo: source.repo_name(),
            source_ref: job.source.clone(),
            tag: source
                .tag()
                .map(str::to_string)
                .filter(|_| job.target_tag.is_some()),
            source_digest: result.source_digest.to_string(),
            mirror_repo: job.target_repo.clone(),
            mirror_digest: result.target_digest.to_string(),
            media_type: result.media_type.clone(),
            manifests: result
                .manifests
                .iter()
                .map(|m| serde_json::to_value(m).unwrap_or_default())
                .chain(result.referrers.iter().map(|r| {
                    serde_json::json!({ "digest": r.digest, "referrer_of": r.subject, "tag": r.tag, "state": "copied" })
                }))
                .chain(result.referrers_failed.iter().map(|f| {
                    serde_json::json!({ "referrer_of": f.subject, "reference": f.reference, "state": "failed", "error": f.error })
                }))
                .collect(),
            size_bytes: result.bytes_total as i64,
            requested_by: job.requested_by.clone(),
            verified_at: now_ms(),
            mirror_tag: job.target_tag.clone(),
            policy: job.policy,
            subset,
        };
        Ok((record, result))
    }
}

impl Workers {
    /// Pins `settled`, the request's digest, as the job's (the lease still held).
    async fn pin(&self, lease: &Lease, settled: &str) -> Result<Digest, JobError> {
        let job = &lease.job;
        let d = Digest::parse(settled).map_err(|e| {
            JobError::Permanent(format!("the request's digest {settled:?} is invalid: {e}"))
        })?;
        tracing::info!(digest = %d, "job {}: {} resolved to {d}", job.id, job.source);
        match self.store.set_source_digest(lease, &d.to_string()).await {
            Ok(true) => Ok(d),
            Ok(false) => Err(JobError::Permanent("lease lost".into())),
            Err(e) => Err(JobError::Transient(format!(
                "storing the resolved digest: {e}"
            ))),
        }
    }
}

/// Pause before a panicked worker task is started again (so a panic on every claim does not spin).
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// One unit in a count of running tasks, taken back when dropped (also by a panic's unwinding).
struct Alive(Arc<std::sync::atomic::AtomicUsize>);

impl Alive {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Alive {
        count.fetch_add(1, Ordering::SeqCst);
        Alive(count.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A task that is aborted when this is dropped: a job's heartbeat ends with the job however the
/// job ends, a panic included, so its lease runs out and it goes back to the queue.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A job's task ended: a panic in it goes on unwinding through its worker (which the supervisor
/// then starts again), as if the job had run on the worker's own task.
fn rethrow(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Runs the task `start` makes, in a task of its own, until it returns or `stop` is cancelled;
/// when it panics, logs the panic, counts it in `mirror_worker_restarts_total` and starts it
/// again after `pause`. Returns how many times it was restarted.
async fn supervise<F, Fut>(n: usize, stop: CancellationToken, pause: Duration, start: F) -> usize
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut restarts = 0;
    loop {
        match tokio::spawn(start()).await {
            Ok(()) => return restarts,
            Err(e) if e.is_panic() => {
                let panic = e.into_panic();
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                crate::metrics::METRICS.worker_restarts.add(1);
                tracing::error!(
                    worker = n,
                    "worker {n} panicked: {msg}; its job (if any) goes back to the queue when its lease runs out; restarting the worker in {} ms",
                    pause.as_millis()
                );
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.cancelled() => return restarts,
                }
                restarts += 1;
            }
            Err(_) => return restarts,
        }
    }
}

/// Renews `lease` every third of its length while the copy runs. When it cannot be renewed — the
/// job was taken over (lost), or renewals keep failing or hanging until the lease runs out — it
/// cancels `lost`, which stops the copy: a worker never copies or writes past its lease.
async fn keep_lease(
    store: Store,
    lease: Lease,
    progress: Arc<Progress>,
    lost: CancellationToken,
    claimed_at: Instant,
    duration: Duration,
) {
    let every = duration / 3;
    let mut valid_until = claimed_at + duration;
    loop {
        tokio::time::sleep_until((Instant::now() + every).min(valid_until)).await;
        if Instant::now() >= valid_until {
            break;
        }
        let sent = Instant::now();
        let renewal = store.heartbeat(&lease, duration, progress_row(&progress));
        match tokio::time::timeout_at(valid_until, renewal).await {
            Ok(Ok(true)) => valid_until = sent + duration,
            Ok(Ok(false)) => {
                tracing::warn!(
                    "job {}: lease lost; abandoning the copy and writing nothing",
                    lease.job.id
                );
                lost.cancel();
                return;
            }
            Ok(Err(e)) => tracing::warn!(
                remaining_ms = valid_until
                    .saturating_duration_since(Instant::now())
                    .as_millis() as u64,
                "job {}: renewing the lease failed (the copy stops when the lease runs out unless a renewal succeeds): {e}",
                lease.job.id
            ),
            Err(_) => break,
        }
    }
    tracing::warn!(
        "job {}: the lease could not be renewed before it ran out; abandoning the copy and writing nothing",
        lease.job.id
    );
    lost.cancel();
}

fn progress_row(p: &Progress) -> ProgressRow {
    ProgressRow {
        bytes_done: p.bytes_done.load(Ordering::Relaxed) as i64,
        bytes_total: p.bytes_total.load(Ordering::Relaxed) as i64,
        blobs_done: p.blobs_done.load(Ordering::Relaxed) as i64,
        blobs_total: p.blobs_total.load(Ordering::Relaxed) as i64,
    }
}

/// Why an attempt failed, sorted for the retry decision.
enum JobError {
    Transient(String),
    Permanent(String),
    /// A registry's rate limit holds requests for this long: run again then, attempt not counted.
    RateLimited(String, Duration),
}

impl From<registry::Error> for JobError {
    fn from(e: registry::Error) -> Self {
        if let registry::Error::RateLimited { retry_after, .. } = e {
            JobError::RateLimited(e.to_string(), retry_after)
        } else if e.is_transient() {
            JobError::Transient(e.to_string())
        } else {
            JobError::Permanent(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn a_job_that_panics_stops_renewing_its_lease() {
        let renewals = Arc::new(AtomicUsize::new(0));
        let r = renewals.clone();
        let job = tokio::spawn(async move {
            let _heartbeat = AbortOnDrop(tokio::spawn(async move {
                loop {
                    r.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
            tokio::time::sleep(Duration::from_millis(30)).await;
            panic!("a job panics");
        });
        assert!(job.await.unwrap_err().is_panic());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let after = renewals.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            renewals.load(Ordering::SeqCst),
            after,
            "renewed after the panic"
        );
    }

    #[tokio::test]
    async fn a_panicked_worker_is_uncounted_and_started_again() {
        let alive = Arc::new(AtomicUsize::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let restarts_before = crate::metrics::METRICS.worker_restarts.get();
        let (a, r, s) = (alive.clone(), runs.clone(), stop.clone());
        let supervisor = tokio::spawn(supervise(
            0,
            stop.clone(),
            Duration::from_millis(10),
            move || {
                let (alive, runs, stop) = (a.clone(), r.clone(), s.clone());
                async move {
                    let _alive = Alive::new(&alive);
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("injected");
                    }
                    stop.cancelled().await;
                }
            },
        ));
        // The first run panics: the count drops back, then the second run counts itself.
        let deadline = Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) < 2 || alive.load(Ordering::SeqCst) != 1 {
            assert!(
                Instant::now() < deadline,
                "the worker was not started again"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(crate::metrics::METRICS.worker_restarts.get() > restarts_before);
        stop.cancel();
        assert_eq!(supervisor.await.unwrap(), 1, "restarted once");
        assert_eq!(
            alive.load(Ordering::SeqCst),
            0,
            "a stopped worker is uncounted"
        );
    }

    #[test]
    fn a_panic_unwinding_through_a_worker_lowers_the_running_count() {
        let alive = Arc::new(AtomicUsize::new(0));
        let a = alive.clone();
        let r = std::panic::catch_unwind(move || {
            let _alive = Alive::new(&a);
            assert_eq!(a.load(Ordering::SeqCst), 1);
            panic!("injected");
        });
        assert!(r.is_err());
        assert_eq!(alive.load(Ordering::SeqCst), 0);
    }
}
