//! The declarative mirror list, kept in sync: on start, on a schedule and on `POST /sync`, every
//! entry of `MIRROR_SYNC_FILE` is expanded to tags and whatever is not mirrored as upstream has it
//! goes through the same queue and ledger as any request.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::drift::Policy;
use crate::mapping::{AllowList, Targets};
use crate::mirrorlist::{self, Entry, MirrorList};
use crate::registry::{Client, Repo};
use crate::rounds::{RoundStatus, Rounds, Trigger};
use crate::store::{self, NewJob, RoundKind, Store, now_ms};

/// Tags asked for per page when listing a source's tags.
const TAG_PAGE: usize = 1000;

/// Syncs asked for by `POST /sync` claim a slot this short: they run here, now.
const ROUND_SLOT: Duration = Duration::from_millis(1);

/// How the mirror list is kept.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// The YAML file.
    pub file: PathBuf,
    /// Time between syncs; `None`: only at start and on `POST /sync`.
    pub interval: Option<Duration>,
    /// Where mirrors go, and which sources may be mirrored (as for `POST /mirror`).
    pub targets: Targets,
    pub allowed_sources: AllowList,
    /// Attempts given to the jobs a sync queues.
    pub max_attempts: i64,
}

/// What one sync did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// The sync's id (as `POST /sync` answered it).
    pub id: u64,
    /// Start, RFC 3339.
    pub started_at: String,
    pub duration_ms: u64,
    /// Entries in the file.
    pub entries: usize,
    /// Tags (and digests) the entries selected.
    pub selected: usize,
    /// Already mirrored as upstream has them (or pinned).
    pub up_to_date: usize,
    /// Jobs queued (or found already queued).
    pub queued: usize,
    /// What went wrong, each naming the line of its entry; the rest of the file still syncs.
    pub errors: Vec<String>,
}

/// The mirror list's keeper.
#[derive(Clone)]
pub struct Sync {
    store: Store,
    client: Client,
    config: Arc<SyncConfig>,
    wake: Arc<Notify>,
    /// Syncs asked for and running: one at a time, in the background, stopped at shutdown.
    rounds: Rounds,
    /// Names this replica in the rounds it runs.
    replica: Arc<str>,
}

impl Sync {
    /// Loads and checks the file once, so a bad file stops start-up with the line at fault.
    pub fn new(
        store: Store,
        client: Client,
        config: SyncConfig,
        wake: Arc<Notify>,
        replica: &str,
    ) -> Result<Sync, String> {
        let list = mirrorlist::load(&config.file).map_err(|e| e.to_string())?;
        check_allowed(&config, &list)?;
        Ok(Sync {
            store,
            client,
            config: Arc::new(config),
            wake,
            rounds: Rounds::default(),
            replica: replica.into(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &SyncConfig {
        &self.config
    }

    /// The last finished sync, on whichever replica it ran.
    pub async fn last_report(&self) -> Option<Report> {
        match self.store.last_round(RoundKind::Sync).await {
            Ok(r) => r
                .and_then(|r| r.result)
                .and_then(|v| serde_json::from_value(v).ok()),
            Err(e) => {
                tracing::warn!("reading the last mirror list sync failed: {e}");
                None
            }
        }
    }

    /// The sync running now and the one queued behind it.
    pub fn current_rounds(&self) -> (Option<RoundStatus>, Option<RoundStatus>) {
        (self.rounds.running(), self.rounds.queued())
    }

    /// Asks for a sync now; returns at once with its id and state (a sync already queued is
    /// joined). It runs in the background after the running one; `GET /sync` shows it.
    pub fn request(&self, trigger: Trigger) -> (RoundStatus, Option<tokio::task::JoinHandle<()>>) {
        let sync = self.clone();
        // The start's and the schedule's syncs run once per interval across replicas (the first
        // to claim the slot); one asked for runs here, now.
        let slot = match (trigger, self.config.interval) {
            (Trigger::Start | Trigger::Schedule, Some(every)) => every,
            _ => ROUND_SLOT,
        };
        self.rounds.request(trigger, move |id| async move {
            let slot = match sync
                .store
                .claim_round(RoundKind::Sync, slot, &sync.replica)
                .await
            {
                Ok(Some(slot)) => slot,
                Ok(None) => {
                    tracing::debug!(
                        round.id = id,
                        "mirror list sync {id}: another replica runs this slot's sync"
                    );
                    return;
                }
                Err(e) => {
                    tracing::error!(round.id = id, "mirror list sync {id} not started: {e}");
                    return;
                }
            };
            match sync.run(id).await {
                Ok(report) => {
                    let result = serde_json::to_value(&report).unwrap_or(Value::Null);
                    if let Err(e) = sync.store.finish_round(slot, &result).await {
                        tracing::warn!(
                            round.id = id,
                            "mirror list sync {id}: recording its report failed: {e}"
                        );
                    }
                }
                Err(e) => tracing::error!(round.id = id, "mirror list sync {id} failed: {e}"),
            }
        })
    }

    /// Syncs now, then every interval, until `stop` is cancelled, which also stops the sync
    /// running then and any asked for by `POST /sync`.
    pub fn spawn(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let sync = self.clone();
        tokio::spawn(async move {
            let mut trigger = Trigger::Start;
            loop {
                if let (_, Some(round)) = sync.request(trigger) {
                    tokio::select! {
                        _ = round => {}
                        _ = stop.cancelled() => break,
                    }
                }
                trigger = Trigger::Schedule;
                let Some(every) = sync.config.interval else {
                    stop.cancelled().await;
                    break;
                };
                // Slots are floor(database clock / interval): wake a little past the next
                // boundary, so the claim lands in the new slot.
                let wait = match sync.store.next_round_in(every).await {
                    Ok(w) => w + Duration::from_millis(5),
                    Err(e) => {
                        tracing::warn!("sync schedule: reading the database clock failed: {e}");
                        every
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => break,
                }
            }
            sync.rounds.shutdown();
        })
    }

    /// Reads the file again and queues whatever is not mirrored as upstream has it. A file that
    /// no longer parses is reported (with its lines) and nothing is queued. Callers go through
    /// [`Sync::request`], which runs one at a time.
    async fn run(&self, id: u64) -> Result<Report, store::Error> {
        let started = std::time::Instant::now();
        let mut report = Report {
            id,
            started_at: crate::http::rfc3339(now_ms()),
            ..Report::default()
        };
        let list = match mirrorlist::load(&self.config.file)
            .map_err(|e| e.to_string())
            .and_then(|l| check_allowed(&self.config, &l).map(|()| l))
        {
            Ok(list) => list,
            Err(e) => {
                tracing::error!("mirror list {} not synced: {e}", self.config.file.display());
                report.errors.push(e);
                crate::metrics::METRICS.sync_errors.add(1);
                return Ok(self.finish(report, started));
            }
        };
        report.entries = list.entries.len();
        for entry in &list.entries {
            if let Err(e) = self.sync_entry(entry, &mut report).await? {
                let e = format!("{}:{}: {e}", self.config.file.display(), entry.line);
                tracing::warn!("{e}");
                crate::metrics::METRICS.sync_errors.add(1);
                report.errors.push(e);
            }
        }
        Ok(self.finish(report, started))
    }

    fn finish(&self, mut report: Report, started: std::time::Instant) -> Report {
        report.duration_ms = started.elapsed().as_millis() as u64;
        crate::metrics::METRICS.sync_runs.add(1);
        tracing::info!(
            entries = report.entries,
            selected = report.selected,
            up_to_date = report.up_to_date,
            queued = report.queued,
            errors = report.errors.len(),
            duration_ms = report.duration_ms,
            "mirror list synced"
        );
        report
    }

    /// One entry: the outer error is the database's; the inner one is this entry's (reported, and
    /// the sync goes on).
    async fn sync_entry(
        &self,
        entry: &Entry,
        report: &mut Report,
    ) -> Result<Result<(), String>, store::Error> {
        let targets = match self.config.targets.select(entry.targets.as_deref()) {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        let mut problems = Vec::new();
        for t in targets {
            let target_repo = match t.prefix.repo_for(&entry.source) {
                Ok(r) => r,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            if let Err(e) = self.sync_entry_to(entry, &target_repo, report).await? {
                problems.push(e);
            }
        }
        Ok(if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        })
    }

    /// One entry into one target repository (see [`Sync::sync_entry`]).
    async fn sync_entry_to(
        &self,
        entry: &Entry,
        target_repo: &str,
        report: &mut Report,
    ) -> Result<Result<(), String>, store::Error> {
        let source = &entry.source;
        let target_repo = target_repo.to_string();
        let repo = Repo::of(source);
        // One pinned digest: mirrored once, by digest.
        if let Some(digest) = source.digest() {
            report.selected += 1;
            let done = self
                .store
                .by_digest(&digest.to_string())
                .await?
                .iter()
                .any(|r| r.mirror_repo == target_repo && r.source_digest == digest.to_string());
            if done {
                report.up_to_date += 1;
                return Ok(Ok(()));
            }
            let job = self.job(entry, source.to_string(), &target_repo, source.tag());
            return self.enqueue(job, report).await;
        }
        let tags = if entry.needs_listing() {
            match self.client.list_tags(&repo, TAG_PAGE).await {
                Ok(available) => entry.select(&available),
                Err(e) => {
                    return Ok(Err(format!(
                        "listing the tags of {}: {e}",
                        source.repo_name()
                    )));
                }
            }
        } else {
            entry.select(&[])
        };
        report.selected += tags.len();
        let mut problems = Vec::new();
        for tag in tags {
            let current = self.store.by_repo_tag(&target_repo, &tag).await?;
            let record = current.iter().find(|r| r.mirror_repo == target_repo);
            // Mirrored before and pinned: it stays (drift watch records any move upstream).
            if record.is_some() && entry.policy == Policy::Pin {
                report.up_to_date += 1;
                continue;
            }
            // A HEAD (which Docker Hub does not count) says whether upstream has the tag, and
            // whether it still names what was mirrored.
            match self.client.head_manifest(&repo, &tag).await {
                Ok(None) => {
                    problems.push(format!(
                        "{}:{tag} does not exist upstream",
                        source.repo_name()
                    ));
                    continue;
                }
                Ok(Some(head))
                    if record.is_some_and(|r| {
                        head.digest
                            .as_ref()
                            .is_some_and(|d| d.to_string() == r.source_digest)
                    }) =>
                {
                    report.up_to_date += 1;
                    continue;
                }
                Ok(Some(_)) => {}
                Err(e) => {
                    problems.push(format!("{}:{tag}: {e}", source.repo_name()));
                    continue;
                }
            }
            let reference = source.clone().with_tag(Some(tag.clone()));
            let job = self.job(entry, reference.to_string(), &target_repo, Some(&tag));
            if let Err(e) = self.enqueue(job, report).await? {
                problems.push(e);
            }
        }
        Ok(if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        })
    }

    fn job(&self, entry: &Entry, source: String, target_repo: &str, tag: Option<&str>) -> NewJob {
        NewJob {
            source,
            target_repo: target_repo.to_string(),
            target_tag: tag.map(str::to_string),
            requested_by: json!({
                "kind": "sync",
                "file": self.config.file.display().to_string(),
                "line": entry.line,
            }),
            max_attempts: self.config.max_attempts,
            referrers: entry.referrers,
            policy: Some(entry.policy),
            repair: false,
        }
    }

    /// Queues `job`; a refusal (its mirror name belongs to another source) is reported, not fatal.
    async fn enqueue(
        &self,
        job: NewJob,
        report: &mut Report,
    ) -> Result<Result<(), String>, store::Error> {
        let queued = match self.store.enqueue(&job).await {
            Ok(q) => q,
            Err(store::EnqueueError::Store(e)) => return Err(e),
            Err(refused) => return Ok(Err(refused.to_string())),
        };
        let (j, created) = (queued.job.clone(), queued.created());
        report.queued += 1;
        if created {
            crate::metrics::METRICS.sync_jobs.add(1);
            self.wake.notify_one();
            tracing::info!(
                job.id = j.id,
                "job {} queued by the mirror list: {} → {}",
                j.id,
                j.source,
                j.target_repo
            );
        }
        Ok(Ok(()))
    }
}

/// Every entry's source must be allowed, as for a request, and its targets configured.
fn check_allowed(config: &SyncConfig, list: &MirrorList) -> Result<(), String> {
    let unknown: Vec<String> = list
        .entries
        .iter()
        .filter_map(|e| {
            config
                .targets
                .select(e.targets.as_deref())
                .err()
                .map(|why| format!("{}:{}: {why}", config.file.display(), e.line))
        })
        .collect();
    if !unknown.is_empty() {
        return Err(unknown.join("\n"));
    }
    let refused: Vec<String> = list
        .entries
        .iter()
        .filter(|e| !config.allowed_sources.allows(&e.source))
        .map(|e| {
            format!(
                "{}:{}: source {} is not in MIRROR_ALLOWED_SOURCES; add {} (or a prefix of it) there, or drop the entry",
                config.file.display(),
                e.line,
                e.source.repo_name(),
                e.source.registry()
            )
        })
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(refused.join("\n"))
    }
}
