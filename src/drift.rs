//! Drift watch: re-checks every mirrored tag against its source and the target, records what moved or
//! went missing, and queues the jobs that follow or repair it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::digest::Digest;
use crate::notify::Notifier;
use crate::reference::ImageRef;
use crate::registry::{self, Client, Repo};
use crate::rounds::{RoundStatus, Rounds, Trigger};
use crate::store::{
    self, Drift, DriftKind, NewDrift, NewJob, NewNotice, NoticeEvent, Record, RoundKind, Store,
    now_ms,
};

/// What to do when a source tag moves upstream after it was mirrored.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Mirror the tag's new digest (a drift record is kept of the move).
    #[default]
    Follow,
    /// Keep the mirrored digest; record the move and leave the tag on the target alone.
    Pin,
}

impl Policy {
    /// The name used in configuration, the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Follow => "follow",
            Policy::Pin => "pin",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "follow" => Ok(Policy::Follow),
            "pin" => Ok(Policy::Pin),
            other => Err(format!(
                "drift policy {other:?} is not known: use \"follow\" (mirror the new digest) or \"pin\" (keep the mirrored one)"
            )),
        }
    }
}

/// Rounds asked for by `POST /drift/check` claim a slot this short: they always run, unless
/// one asked for on another replica runs within the same moment.
const ROUND_SLOT: Duration = Duration::from_millis(1);

/// How drift watch runs.
#[derive(Debug, Clone)]
pub struct DriftConfig {
    /// Time between rounds; `None` turns the schedule off (`POST /drift/check` still runs one).
    pub interval: Option<Duration>,
    /// Policy for tags whose requests did not choose one.
    pub policy: Policy,
    /// Mirrored tags checked at once.
    pub concurrency: usize,
    /// Attempts given to the jobs drift watch queues.
    pub max_attempts: i64,
    /// Whether referrers travel with images (`MIRROR_REFERRERS`): then each round also looks up
    /// what refers to each image upstream and copies what the mirror lacks.
    pub referrers: bool,
}

/// What one round found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Round {
    /// The round's id (as `POST /drift/check` answered it).
    pub id: u64,
    /// Start, RFC 3339.
    pub started_at: String,
    pub duration_ms: u64,
    /// Mirrored tags and digest-only mirrors checked.
    pub checked: usize,
    /// Checked and found as mirrored.
    pub in_sync: usize,
    pub upstream_moved: usize,
    pub upstream_gone: usize,
    pub missing: usize,
    /// Checks that could not reach a registry (retried next round).
    pub errors: usize,
    /// Jobs queued to follow or repair (or to copy referrers).
    pub jobs_queued: usize,
    /// Images with referrers upstream the mirror lacks (or whose copy had failed): each gets a job.
    pub referrers_missing: usize,
}

/// Drift watch: shared by the schedule and `POST /drift/check`.
#[derive(Clone)]
pub struct Watch {
    store: Store,
    client: Client,
    config: Arc<DriftConfig>,
    wake: Arc<Notify>,
    notifier: Option<Notifier>,
    /// Rounds asked for and running: one at a time, in the background, stopped at shutdown.
    rounds: Rounds,
    /// The drift version ([`store::LedgerVersions::drift`]) at which none was open, or
    /// [`UNKNOWN`]: while drift stays at that version, lookups (`GET /images`) skip the drift
    /// query. Set after a round that leaves none open; any change to drift since, by a round
    /// here or on another replica, moves the version and lookups query again. A round here sets
    /// it to [`UNKNOWN`] before it records any.
    none_open_at: Arc<AtomicU64>,
    /// Names this replica in the rounds it runs.
    replica: Arc<str>,
}

/// No drift version is known at which none was open.
const UNKNOWN: u64 = u64::MAX;

/// What checking one mirrored tag found.
#[derive(Default)]
struct Findings {
    /// The digest the source tag names now, when it moved.
    moved_to: Option<Digest>,
    gone: bool,
    /// What is missing (or wrong) on the target: manifest digests, and "tag".
    missing: Vec<String>,
    /// Referrers upstream that the mirror lacks (added after the image was mirrored), and ones
    /// whose copy failed: a job copies them.
    referrers: Vec<String>,
}

impl Watch {
    /// Drift watch over the ledger in `store`, looking with `client`; `wake` is rung after
    /// queueing; `replica` names this process in the rounds it runs.
    pub fn new(
        store: Store,
        client: Client,
        config: DriftConfig,
        wake: Arc<Notify>,
        notifier: Option<Notifier>,
        replica: &str,
    ) -> Watch {
        Watch {
            store,
            client,
            config: Arc::new(config),
            wake,
            notifier,
            rounds: Rounds::default(),
            none_open_at: Arc::new(AtomicU64::new(UNKNOWN)),
            replica: replica.into(),
        }
    }

    /// Whether any drift may be open (false means none is).
    pub fn maybe_open(&self) -> bool {
        self.store.versions().drift() != Some(self.none_open_at.load(Ordering::SeqCst))
    }

    /// Keeps "none open" current when drift changes elsewhere (a round on another replica, a job
    /// settling it): once a second, when the drift version moved since the last look and drift
    /// may be open, reads again whether any is. Ends at `stop`.
    async fn follow(self, stop: CancellationToken) {
        let mut seen = self.store.versions().drift();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
            let now = self.store.versions().drift();
            if now.is_some() && now != seen && self.maybe_open() {
                seen = now;
                if let Err(e) = self.refresh_open().await {
                    tracing::debug!("reading whether drift is open failed: {e}");
                }
            }
        }
    }

    /// Reads from the database whether any drift is open (at start, and after each round).
    pub async fn refresh_open(&self) -> Result<(), store::Error> {
        // The version first: a change while the query runs moves it past what is stored here.
        let version = self.store.versions().drift();
        let open = !self.store.open_drift_counts().await?.is_empty();
        let at = match (open, version) {
            (false, Some(v)) => v,
            _ => UNKNOWN,
        };
        self.none_open_at.store(at, Ordering::SeqCst);
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> &DriftConfig {
        &self.config
    }

    /// The last finished round, on whichever replica it ran.
    pub async fn last_round(&self) -> Option<Round> {
        match self.store.last_round(RoundKind::Drift).await {
            Ok(r) => r
                .and_then(|r| r.result)
                .and_then(|v| serde_json::from_value(v).ok()),
            Err(e) => {
                tracing::warn!("reading the last drift round failed: {e}");
                None
            }
        }
    }

    /// The round running now and the one queued behind it.
    pub fn current_rounds(&self) -> (Option<RoundStatus>, Option<RoundStatus>) {
        (self.rounds.running(), self.rounds.queued())
    }

    /// Asks for a round now; returns at once with its id and state (a round already queued is
    /// joined). It runs in the background after the running one; `GET /drift` shows it.
    pub fn request_round(
        &self,
        trigger: Trigger,
    ) -> (RoundStatus, Option<tokio::task::JoinHandle<()>>) {
        let watch = self.clone();
        // A scheduled round runs once per interval across replicas (the first to claim the
        // slot); one asked for runs here, now.
        let slot = match (trigger, self.config.interval) {
            (Trigger::Schedule, Some(every)) => every,
            _ => ROUND_SLOT,
        };
        self.rounds.request(trigger, move |id| async move {
            let slot = match watch
                .store
                .claim_round(RoundKind::Drift, slot, &watch.replica)
                .await
            {
                Ok(Some(slot)) => slot,
                Ok(None) => {
                    tracing::debug!(
                        round.id = id,
                        "drift round {id}: another replica runs this slot's round"
                    );
                    return;
                }
                Err(e) => {
                    tracing::error!(round.id = id, "drift round {id} not started: {e}");
                    return;
                }
            };
            match watch.round(id).await {
                Ok(round) => {
                    let result = serde_json::to_value(&round).unwrap_or(Value::Null);
                    if let Err(e) = watch.store.finish_round(slot, &result).await {
                        tracing::warn!(
                            round.id = id,
                            "drift round {id}: recording its result failed: {e}"
                        );
                    }
                }
                Err(e) => tracing::error!(round.id = id, "drift round {id} failed: {e}"),
            }
        })
    }

    /// Runs a round every interval (if set) until `stop` is cancelled, which also stops the round
    /// running then and any asked for by `POST /drift/check`. Always `Some`.
    pub fn spawn(&self, stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.config.interval;
        let watch = self.clone();
        tokio::spawn(self.clone().follow(stop.clone()));
        Some(tokio::spawn(async move {
            let Some(every) = every else {
                stop.cancelled().await;
                watch.rounds.shutdown();
                return;
            };
            loop {
                // Slots are floor(database clock / interval): every replica wakes at the start
                // of the next one, and the first to claim it runs the round.
                let wait = match watch.store.next_round_in(every).await {
                    // A little past the boundary, so the claim lands in the new slot.
                    Ok(w) => w + Duration::from_millis(5),
                    Err(e) => {
                        tracing::warn!("drift schedule: reading the database clock failed: {e}");
                        every
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => break,
                }
                if let (_, Some(round)) = watch.request_round(Trigger::Schedule) {
                    tokio::select! {
                        _ = round => {}
                        _ = stop.cancelled() => break,
                    }
                }
            }
            watch.rounds.shutdown();
        }))
    }

    /// Re-checks every mirrored tag now: HEAD the source tag, HEAD each mirrored manifest on the
    /// target; records drift and queues the jobs the policy asks for. Callers go through
    /// [`Watch::request_round`], which runs one at a time.
    async fn round(&self, id: u64) -> Result<Round, store::Error> {
        let started = std::time::Instant::now();
        let mut round = Round {
            id,
            started_at: crate::http::rfc3339(now_ms()),
            ..Round::default()
        };
        let watched = self.store.watched().await?;
        tracing::info!(
            round.id = id,
            images = watched.len(),
            "drift round {id} started"
        );
        let checks = futures_util::stream::iter(watched.into_iter().map(|r| async move {
            let found = self.check(&r).await;
            (r, found)
        }))
        .buffer_unordered(self.config.concurrency.max(1));
        tokio::pin!(checks);
        while let Some((record, found)) = checks.next().await {
            round.checked += 1;
            crate::metrics::METRICS.drift_checks.add(1);
            match found {
                Err(e) => {
                    round.errors += 1;
                    crate::metrics::METRICS.drift_check_errors.add(1);
                    tracing::warn!(
                        mirror = %record.mirror_repo,
                        "drift check of {} failed (tried again next round): {e}",
                        describe(&record)
                    );
                }
                Ok(f) => self.settle(&record, f, &mut round).await?,
            }
        }
        self.refresh_open().await?;
        round.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            checked = round.checked,
            upstream_moved = round.upstream_moved,
            upstream_gone = round.upstream_gone,
            missing = round.missing,
            errors = round.errors,
            jobs_queued = round.jobs_queued,
            duration_ms = round.duration_ms,
            "drift round finished"
        );
        Ok(round)
    }

    /// Looks at one mirrored tag (or digest-only mirror) upstream and on the target.
    async fn check(&self, r: &Record) -> Result<Findings, String> {
        let mut f = Findings::default();
        let source = ImageRef::parse(&r.source_repo)
            .map_err(|e| format!("recorded source {:?} is invalid: {e}", r.source_repo))?;
        let recorded = Digest::parse(&r.source_digest)
            .map_err(|e| format!("recorded digest {:?} is invalid: {e}", r.source_digest))?;
        // Upstream: HEAD, never GET (Docker Hub counts GETs against the pull limit).
        if let Some(tag) = &r.tag {
            let src = Repo::of(&source);
            match self
                .client
                .head_manifest(&src, tag)
                .await
                .map_err(|e| e.to_string())?
            {
                None => f.gone = true,
                Some(head) => {
                    let now = match head.digest {
                        Some(d) => d,
                        None => registry::resolve(
                            &self.client,
                            &source.clone().with_tag(Some(tag.clone())),
                        )
                        .await
                        .map_err(|e| e.to_string())?,
                    };
                    if now != recorded {
                        f.moved_to = Some(now);
                    }
                }
            }
        }
        // Target: the tag still names the mirrored digest, and every manifest is there. For a
        // platform subset that is the child (or the rebuilt index), not the source index, which
        // was never written.
        let mirror = ImageRef::parse(&r.mirror_repo)
            .map_err(|e| format!("recorded mirror {:?} is invalid: {e}", r.mirror_repo))?;
        let mirrored = Digest::parse(&r.mirror_digest)
            .map_err(|e| format!("recorded digest {:?} is invalid: {e}", r.mirror_digest))?;
        let dst = Repo::of(&mirror);
        let mut top_checked = false;
        if let Some(tag) = r.mirror_tag.as_ref().or(r.tag.as_ref()) {
            match self
                .client
                .head_manifest(&dst, tag)
                .await
                .map_err(|e| e.to_string())?
            {
                Some(head) if head.digest.as_ref() == Some(&mirrored) => top_checked = true,
                Some(head) if head.digest.is_none() => {}
                _ => f.missing.push("tag".into()),
            }
        }
        for digest in image_manifests(r)
            .into_iter()
            .filter(|d| !(top_checked && d == &r.mirror_digest))
        {
            if self
                .client
                .head_manifest(&dst, &digest)
                .await
                .map_err(|e| e.to_string())?
                .is_none()
            {
                f.missing.push(digest);
            }
        }
        // Referrers are looked up for the image the copy wrote on top: the source image, or the
        // one child of a subset; an index rebuilt from several has no upstream to ask.
        let subject = match &r.subset {
            None => Some(&recorded),
            Some(s) if !s.index_rebuilt() => Some(&mirrored),
            Some(_) => None,
        };
        if let (true, false, Some(subject)) = (self.config.referrers, f.gone, subject) {
            // Not reaching the referrers does not spoil what was found about the image.
            match self.missing_referrers(r, &source, subject).await {
                Ok(missing) => f.referrers = missing,
                Err(e) => tracing::warn!(
                    mirror = %r.mirror_repo,
                    "drift check of {}'s referrers failed (tried again next round): {e}",
                    describe(r)
                ),
            }
        }
        Ok(f)
    }

    /// What refers to the image upstream now and is not on the mirror as recorded — a signature
    /// added after the copy — plus referrers whose copy failed. Costs one referrers-API GET and
    /// four HEADs (the fallback and cosign tags) upstream; nothing when the job turned referrers
    /// off.
    async fn missing_referrers(
        &self,
        r: &Record,
        source: &ImageRef,
        subject: &Digest,
    ) -> Result<Vec<String>, String> {
        let wanted = self
            .store
            .get(r.job_id)
            .await
            .map_err(|e| e.to_string())?
            .is_none_or(|j| j.referrers);
        if !wanted {
            return Ok(Vec::new());
        }
        let recorded: Vec<&Value> = r
            .manifests
            .iter()
            .filter(|e| e.get("referrer_of").is_some())
            .collect();
        let mut out: Vec<String> = recorded
            .iter()
            .filter(|e| e.get("state").and_then(Value::as_str) == Some("failed"))
            .filter_map(|e| e.get("reference").and_then(Value::as_str))
            .map(|reference| format!("{reference} (failed before)"))
            .collect();
        let upstream = registry::copy::upstream_referrers(&self.client, &Repo::of(source), subject)
            .await
            .map_err(|e| format!("looking up referrers upstream: {e}"))?;
        let copied = |tag: &Option<String>, digest: &Digest| {
            recorded.iter().any(|e| {
                e.get("state").and_then(Value::as_str) != Some("failed")
                    && e.get("digest").and_then(Value::as_str) == Some(&digest.to_string())
                    && (tag.is_none() || e.get("tag").and_then(Value::as_str) == tag.as_deref())
            })
        };
        for (tag, digest) in upstream {
            if !copied(&tag, &digest) {
                out.push(match tag {
                    Some(t) => format!("{t} ({})", digest.short()),
                    None => digest.to_string(),
                });
            }
        }
        Ok(out)
    }

    /// Records what `f` found for `r`, queues what the policy asks for, resolves what is gone.
    async fn settle(&self, r: &Record, f: Findings, round: &mut Round) -> Result<(), store::Error> {
        let policy = r.policy.unwrap_or(self.config.policy);
        let mirror_tag = r.mirror_tag.clone().or_else(|| r.tag.clone());
        let base = NewDrift {
            mirror_repo: r.mirror_repo.clone(),
            mirror_tag: mirror_tag.clone(),
            source_repo: r.source_repo.clone(),
            source_tag: r.tag.clone(),
            kind: DriftKind::Missing,
            recorded_digest: r.source_digest.clone(),
            observed_digest: None,
            missing: None,
            policy,
        };
        let mut seen = Vec::new();
        // Jobs for the tag copy what its request asked for: referrers or not, these platforms.
        let (referrers, platforms) = match self.store.get(r.job_id).await? {
            Some(job) => (job.referrers, job.platforms),
            None => (
                true,
                r.subset
                    .as_ref()
                    .and_then(|s| store::Platforms::new(s.platforms.clone())),
            ),
        };
        // The tag keeps the policy its request chose; none stays none (the service default
        // then), so a change of MIRROR_DRIFT_POLICY still applies to it.
        let chosen = r.policy;
        let job = |source: String, repair: bool| NewJob {
            source,
            target_repo: r.mirror_repo.clone(),
            target_tag: mirror_tag.clone(),
            requested_by: Value::Null,
            max_attempts: self.config.max_attempts,
            referrers,
            policy: chosen,
            repair,
            platforms: platforms.clone(),
        };
        let followed = f.moved_to.is_some() && policy == Policy::Follow;
        if let (Some(now), Some(tag)) = (&f.moved_to, &r.tag) {
            round.upstream_moved += 1;
            let d = NewDrift {
                kind: DriftKind::UpstreamMoved,
                observed_digest: Some(now.to_string()),
                ..base.clone()
            };
            let follow = followed.then(|| job(format!("{}:{tag}", r.source_repo), false));
            seen.push(self.record(d, follow, round).await?);
        }
        if f.gone {
            round.upstream_gone += 1;
            let d = NewDrift {
                kind: DriftKind::UpstreamGone,
                ..base.clone()
            };
            seen.push(self.record(d, None, round).await?);
        }
        if !f.missing.is_empty() {
            round.missing += 1;
            let d = NewDrift {
                kind: DriftKind::Missing,
                missing: Some(f.missing.clone()),
                ..base.clone()
            };
            // Following a moved tag rewrites the tag anyway; otherwise put back exactly what was
            // mirrored, pinned by digest.
            let source = match &r.tag {
                Some(tag) => format!("{}:{tag}@{}", r.source_repo, r.source_digest),
                None => format!("{}@{}", r.source_repo, r.source_digest),
            };
            let repair = (!followed).then(|| job(source, true));
            seen.push(self.record(d, repair, round).await?);
        }
        // New or failed referrers of an image that is otherwise fine: a job for the recorded
        // digest copies them (the image is up to date, so only referrers move).
        if !f.referrers.is_empty() && f.missing.is_empty() && !followed {
            round.referrers_missing += 1;
            let source = match &r.tag {
                Some(tag) => format!("{}:{tag}@{}", r.source_repo, r.source_digest),
                None => format!("{}@{}", r.source_repo, r.source_digest),
            };
            let mut j = job(source, false);
            j.referrers = true;
            j.requested_by =
                json!({ "kind": "drift", "reason": "referrers", "referrers": f.referrers });
            match self.store.enqueue(&j).await {
                Ok(q) => {
                    round.jobs_queued += 1;
                    if q.created() {
                        crate::metrics::METRICS.drift_jobs.add(1);
                        self.wake.notify_one();
                    }
                    tracing::info!(
                        job.id = q.job.id,
                        "job {} queued by drift watch to copy referrers of {}: {}",
                        q.job.id,
                        describe(r),
                        f.referrers.join(", ")
                    );
                }
                Err(store::EnqueueError::Store(e)) => return Err(e),
                Err(refused) => tracing::warn!("no referrers job for {}: {refused}", describe(r)),
            }
        }
        if seen.is_empty() {
            round.in_sync += 1;
        }
        self.store
            .resolve_unseen_drift(
                &r.mirror_repo,
                mirror_tag.as_deref(),
                &r.source_digest,
                &seen,
            )
            .await?;
        Ok(())
    }

    /// Stores one drift row and, when `job` is given, the job that follows or repairs it (one
    /// transaction); announces drift seen for the first time. Returns the row id.
    async fn record(
        &self,
        d: NewDrift,
        job: Option<NewJob>,
        round: &mut Round,
    ) -> Result<i64, store::Error> {
        self.none_open_at.store(UNKNOWN, Ordering::SeqCst);
        let build = |row: &Drift| NewNotice {
            event: NoticeEvent::Drift,
            body: notice(row).to_string(),
        };
        let notice = self
            .notifier
            .as_ref()
            .map(|_| &build as &(dyn Fn(&Drift) -> NewNotice + Sync));
        let recorded = self.store.record_drift_and_enqueue(&d, job, notice).await?;
        let (row, new) = (recorded.drift, recorded.new);
        if let (true, Some(n)) = (recorded.noticed, &self.notifier) {
            n.wake();
        }
        let queued = match recorded.queued {
            Some(Ok(q)) => Some((q.created(), q.job)),
            Some(Err(refused)) => {
                tracing::warn!(
                    drift.id = row.id,
                    "drift {}: no job queued: {refused}",
                    row.id
                );
                None
            }
            None => None,
        };
        let kind = d.kind.as_str();
        if let Some((created, j)) = queued {
            round.jobs_queued += 1;
            if created {
                crate::metrics::METRICS.drift_jobs.add(1);
                self.wake.notify_one();
                tracing::info!(
                    job.id = j.id,
                    drift.id = row.id,
                    "job {} queued by drift watch: {} → {}",
                    j.id,
                    j.source,
                    j.target_repo
                );
            }
        }
        if new {
            *crate::metrics::METRICS
                .drift_found
                .lock()
                .expect("metrics poisoned")
                .entry(kind)
                .or_default() += 1;
            tracing::warn!(
                drift.id = row.id,
                kind,
                "drift: {}{} {} (recorded {}{})",
                row.mirror_repo,
                row.mirror_tag
                    .as_deref()
                    .map(|t| format!(":{t}"))
                    .unwrap_or_default(),
                kind,
                row.recorded_digest,
                row.observed_digest
                    .as_deref()
                    .map(|o| format!(", upstream now {o}"))
                    .unwrap_or_default()
            );
        }
        Ok(row.id)
    }
}

/// A drift row as the API and the notices show it.
pub fn view(d: &Drift) -> Value {
    json!({
        "id": d.id,
        "kind": d.kind,
        "source": match &d.source_tag {
            Some(t) => format!("{}:{t}", d.source_repo),
            None => format!("{}@{}", d.source_repo, d.recorded_digest),
        },
        "mirror": d.mirror_repo,
        "mirror_tag": d.mirror_tag,
        "recorded_digest": d.recorded_digest,
        "observed_digest": d.observed_digest,
        "missing": d.missing,
        "policy": d.policy,
        "job_id": d.job_id,
        "job": d.job_id.map(|id| format!("/jobs/{id}")),
        "detected_at": crate::http::rfc3339(d.detected_at),
        "last_seen_at": crate::http::rfc3339(d.last_seen_at),
        "resolved_at": d.resolved_at.map(crate::http::rfc3339),
    })
}

/// The signed notice sent when drift is first seen: the row, as `"event": "drift"`.
pub fn notice(d: &Drift) -> Value {
    let mut n = view(d);
    n["event"] = json!("drift");
    n["drift_id"] = json!(d.id);
    n
}

/// The image's own manifests (top first, then platforms), without referrers.
fn image_manifests(r: &Record) -> Vec<String> {
    let mut out = vec![r.mirror_digest.clone()];
    for e in &r.manifests {
        if e.get("referrer_of").is_none()
            && let Some(d) = e.get("digest").and_then(Value::as_str)
            && !out.iter().any(|o| o == d)
        {
            out.push(d.to_string());
        }
    }
    out
}

fn describe(r: &Record) -> String {
    match &r.tag {
        Some(t) => format!("{}:{t}", r.source_repo),
        None => format!("{}@{}", r.source_repo, r.source_digest),
    }
}
