//! The store's vocabulary: typed records and state enums, mapped to TEXT (and JSON) only at the
//! backends' edge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::drift::Policy;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting to be claimed (maybe not before `run_at`, maybe behind an older job on its tag).
    Queued,
    /// Claimed by a worker holding a lease.
    Running,
    /// Copied, verified, recorded in the ledger.
    Succeeded,
    /// Failed for good (the reason is in `last_error`).
    Failed,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 4] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
    ];

    /// The name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown job state {s:?}"))
    }
}

/// What drift watch found wrong with a mirrored tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// The source tag names another digest now.
    UpstreamMoved,
    /// The source tag no longer exists.
    UpstreamGone,
    /// A manifest of the image (or the tag) is gone from the target or names another digest.
    Missing,
}

impl DriftKind {
    /// Every kind.
    pub const ALL: [DriftKind; 3] = [
        DriftKind::UpstreamMoved,
        DriftKind::UpstreamGone,
        DriftKind::Missing,
    ];

    /// The name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::UpstreamMoved => "upstream_moved",
            DriftKind::UpstreamGone => "upstream_gone",
            DriftKind::Missing => "missing",
        }
    }
}

impl FromStr for DriftKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DriftKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown drift kind {s:?}"))
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: i64,
    /// The source as requested, canonical.
    pub source: String,
    /// The digest the source resolved to on the first attempt.
    pub source_digest: Option<String>,
    pub target_repo: String,
    /// None for a digest-only source.
    pub target_tag: Option<String>,
    pub state: JobState,
    pub attempts: i64,
    pub max_attempts: i64,
    /// Not claimable before this time (unix ms, the database's clock).
    pub run_at: i64,
    pub lease_expires_at: Option<i64>,
    pub last_error: Option<String>,
    /// Who asked: `{"kind":"token","name":"ci"}`, `{"kind":"github",…}`, `{"kind":"drift",…}`.
    pub requested_by: Value,
    pub bytes_done: i64,
    pub bytes_total: i64,
    pub blobs_done: i64,
    pub blobs_total: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Whether referrers (signatures, attestations) are copied too.
    pub referrers: bool,
    /// Drift policy asked for; none means the service default.
    pub policy: Option<Policy>,
    /// Re-check every manifest on the target (drift repair), not only the top one.
    pub repair: bool,
    /// How its referrers went, once it succeeded with referrers on.
    pub referrers_state: Option<ReferrersState>,
    /// What could not be looked up or copied (`[{"subject", "reference", "error", "transient"}]`).
    pub referrers_failed: Option<Value>,
    /// Only these platforms of an index (none: the whole image).
    pub platforms: Option<Platforms>,
}

/// A claimed job and the lease token that lets its worker write it.
#[derive(Debug, Clone)]
pub struct Lease {
    pub job: Job,
    pub token: String,
}

/// A request stored, or joined to a live job.
#[derive(Debug, Clone)]
pub struct Enqueued {
    pub job: Job,
    pub dedupe: Dedupe,
}

impl Enqueued {
    /// Whether a new job row was written (workers should be woken).
    pub fn created(&self) -> bool {
        matches!(self.dedupe, Dedupe::New | Dedupe::QueuedAfter(_))
    }
}

/// Jobs per state and the age of the oldest queued job, for metrics.
#[derive(Debug, Clone, Default)]
pub struct JobStats {
    /// Only states with jobs are listed.
    pub by_state: Vec<(JobState, i64)>,
    /// Milliseconds since the oldest queued job was queued.
    pub oldest_queued_ms: Option<i64>,
}

/// A ledger record to append after a verified copy.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub job_id: i64,
    pub source_repo: String,
    pub source_ref: String,
    /// The source tag.
    pub tag: Option<String>,
    pub source_digest: String,
    pub mirror_repo: String,
    pub mirror_digest: String,
    pub media_type: String,
    /// The image's manifests (`digest`, `media_type`, `platform`, `size`), top first, then its
    /// referrers (`digest`, `referrer_of`, `tag`). Every `digest` is findable by `by_digest`.
    pub manifests: Vec<Value>,
    pub size_bytes: i64,
    pub requested_by: Value,
    pub verified_at: i64,
    /// The tag written on the target (may differ from `tag`).
    pub mirror_tag: Option<String>,
    /// Drift policy in force for the tag; none means the service default.
    pub policy: Option<Policy>,
    /// Only some platforms of the source index were copied (none: the whole image).
    pub subset: Option<Subset>,
}

/// A stored ledger record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    pub id: i64,
    pub job_id: i64,
    pub source_repo: String,
    pub source_ref: String,
    pub tag: Option<String>,
    pub source_digest: String,
    pub mirror_repo: String,
    pub mirror_digest: String,
    pub media_type: String,
    pub manifests: Vec<Value>,
    pub size_bytes: i64,
    pub requested_by: Value,
    pub verified_at: i64,
    pub mirror_tag: Option<String>,
    pub policy: Option<Policy>,
    /// Only some platforms of the source index (`source_digest`) were copied: then
    /// `mirror_digest` is the one child, or an index rebuilt from the children (not official).
    pub subset: Option<Subset>,
}

/// A platform subset as the ledger records it: the source index (`source_digest` of its record)
/// was not copied; these children were, each under its official digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subset {
    /// The platforms copied, as the source index lists them (`linux/arm64/v8`).
    pub platforms: Vec<String>,
    /// One per platform copied, in the order asked.
    pub children: Vec<SubsetChild>,
}

impl Subset {
    /// Whether the tag names an index rebuilt from the children (several platforms), whose
    /// digest no official index has, rather than the one child itself.
    pub fn index_rebuilt(&self) -> bool {
        self.children.len() > 1
    }
}

/// One child of a subset: its platform, official digest and the attestations copied with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubsetChild {
    pub platform: String,
    pub digest: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attestations: Vec<String>,
}

/// The platforms a request asks for (`os/arch[/variant]`, checked at the edge), sorted and
/// without repeats: requests naming the same set in another order are the same request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Platforms(Vec<String>);

impl Platforms {
    /// The set `names` form; none when it is empty (an empty set would copy nothing).
    pub fn new(names: impl IntoIterator<Item = String>) -> Option<Platforms> {
        let mut v: Vec<String> = names.into_iter().collect();
        v.sort();
        v.dedup();
        (!v.is_empty()).then_some(Platforms(v))
    }

    /// The names, sorted.
    pub fn names(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for Platforms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

/// A problem to record (see `Store::record_drift_and_enqueue`).
#[derive(Debug, Clone)]
pub struct NewDrift {
    pub mirror_repo: String,
    pub mirror_tag: Option<String>,
    pub source_repo: String,
    pub source_tag: Option<String>,
    pub kind: DriftKind,
    pub recorded_digest: String,
    pub observed_digest: Option<String>,
    /// What is missing on the target (`["sha256:…", "tag"]`).
    pub missing: Option<Vec<String>>,
    pub policy: Policy,
}

/// A problem drift watch found, as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drift {
    pub id: i64,
    pub mirror_repo: String,
    pub mirror_tag: Option<String>,
    pub source_repo: String,
    pub source_tag: Option<String>,
    pub kind: DriftKind,
    pub recorded_digest: String,
    pub observed_digest: Option<String>,
    pub missing: Option<Vec<String>>,
    pub policy: Policy,
    pub job_id: Option<i64>,
    pub detected_at: i64,
    pub last_seen_at: i64,
    pub resolved_at: Option<i64>,
}

/// What `record_drift_and_enqueue` did.
#[derive(Debug)]
pub struct DriftRecorded {
    /// The open row, with the job queued for it.
    pub drift: Drift,
    /// Seen for the first time.
    pub new: bool,
    /// Its notice was stored in the outbox (wake the sender).
    pub noticed: bool,
    /// The job asked for: stored, joined, or refused (the drift row stands either way).
    pub queued: Option<Result<Enqueued, super::EnqueueError>>,
}

/// The answer to a GitHub delivery.
#[derive(Debug)]
pub enum Delivery {
    /// Handled before: the answer given then.
    Before { status: u16, response: Value },
    /// Handled now: its jobs, and the answer stored for redeliveries.
    New {
        enqueued: Vec<Enqueued>,
        response: Value,
    },
}

/// A periodic round that runs once per interval across replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundKind {
    /// Drift watch.
    Drift,
    /// The mirror-list sync.
    Sync,
}

impl RoundKind {
    /// The name used in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RoundKind::Drift => "drift",
            RoundKind::Sync => "sync",
        }
    }
}

/// A round this replica won the right to run (see `Store::claim_round`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundSlot {
    pub kind: RoundKind,
    /// floor(database clock in ms / interval in ms).
    pub slot: i64,
}

/// A round as recorded: who ran it, when, what it found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Round {
    pub kind: RoundKind,
    pub slot: i64,
    pub replica: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub result: Option<Value>,
}

/// How a succeeded job's referrers went; the image's success stands either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReferrersState {
    /// Every referrer found was copied (none found counts).
    Copied,
    /// Some could not be looked up or copied; drift watch tries again.
    Failed,
}

impl ReferrersState {
    /// The name in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ReferrersState::Copied => "copied",
            ReferrersState::Failed => "failed",
        }
    }
}

impl FromStr for ReferrersState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "copied" => Ok(ReferrersState::Copied),
            "failed" => Ok(ReferrersState::Failed),
            _ => Err(format!("unknown referrers state {s:?}")),
        }
    }
}

/// A succeeded job's referrers: the state and, as JSON, what failed.
#[derive(Debug, Clone)]
pub struct JobReferrers {
    pub state: ReferrersState,
    /// `[{"subject", "reference", "error", "transient"}]`.
    pub failed: Value,
}

/// A request to mirror, before it is a job.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub source: String,
    pub target_repo: String,
    pub target_tag: Option<String>,
    /// Who asked: `{"kind":"token","name":"ci"}`, `{"kind":"github",…}`, `{"kind":"drift",…}`.
    pub requested_by: Value,
    pub max_attempts: i64,
    pub referrers: bool,
    /// Drift policy for the mirrored tag; none means the service default.
    pub policy: Option<Policy>,
    /// Re-check every manifest on the target (drift repair), not only the top one.
    pub repair: bool,
    /// Only these platforms of an index (none: the whole image). A different set is a different
    /// request: it never joins a job for another set.
    pub platforms: Option<Platforms>,
}

/// Progress counters written with each heartbeat.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProgressRow {
    pub bytes_done: i64,
    pub bytes_total: i64,
    pub blobs_done: i64,
    pub blobs_total: i64,
}

/// How a request met the jobs already live for the same source and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dedupe {
    /// No live job: a new one was stored.
    New,
    /// Joined a live job that will copy what the request asked for, options unchanged.
    Joined,
    /// Joined the queued job and widened its options (referrers on, the request's policy).
    Merged,
    /// The live job is running and already pinned to the digest it resolved, or was asked for
    /// less, or (queued or running) for other platforms: a new job was queued to run after it
    /// (one writer per target tag).
    QueuedAfter(i64),
}

impl Dedupe {
    /// The word used in API answers.
    pub fn as_str(&self) -> &'static str {
        match self {
            Dedupe::New => "new",
            Dedupe::Joined => "joined",
            Dedupe::Merged => "merged",
            Dedupe::QueuedAfter(_) => "queued_after",
        }
    }
}

/// What a notice announces; sent as `X-Mirror-Event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NoticeEvent {
    /// A job succeeded or failed for good.
    Job,
    /// Drift watch found a problem for the first time.
    Drift,
    /// Every target of a request to several targets is done (succeeded, or failed for good).
    Request,
}

impl NoticeEvent {
    /// The name in the database and the header.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeEvent::Job => "job",
            NoticeEvent::Drift => "drift",
            NoticeEvent::Request => "request",
        }
    }
}

impl fmt::Display for NoticeEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NoticeEvent {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "job" => Ok(NoticeEvent::Job),
            "drift" => Ok(NoticeEvent::Drift),
            "request" => Ok(NoticeEvent::Request),
            _ => Err(format!("unknown notice event {s:?}")),
        }
    }
}

/// Where a notice is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NoticeState {
    /// To be sent (again) at `next_attempt_at`.
    Pending,
    Delivered,
    /// Every attempt failed; kept to be seen (`GET /notices?state=failed`).
    Failed,
}

impl NoticeState {
    /// Every state, for validating filters.
    pub const ALL: [NoticeState; 3] = [
        NoticeState::Pending,
        NoticeState::Delivered,
        NoticeState::Failed,
    ];

    /// The name in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeState::Pending => "pending",
            NoticeState::Delivered => "delivered",
            NoticeState::Failed => "failed",
        }
    }
}

impl fmt::Display for NoticeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NoticeState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NoticeState::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| format!("notice state {s:?} is not one of pending, delivered, failed"))
    }
}

/// A notice to store.
#[derive(Debug, Clone)]
pub struct NewNotice {
    pub event: NoticeEvent,
    /// The JSON body, exactly as it is signed and sent.
    pub body: String,
}

/// A notice as stored.
#[derive(Debug, Clone)]
pub struct Notice {
    pub id: i64,
    pub event: NoticeEvent,
    /// The JSON body, exactly as it is signed and sent.
    pub body: String,
    pub state: NoticeState,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub delivered_at: Option<i64>,
}

/// How the database answered a readiness probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterState {
    /// It took a write at once.
    Idle,
    /// Busy with writes in progress (SQLite's one writer held, every PostgreSQL connection in
    /// use): load, not a fault.
    Busy,
}

/// The current time as unix milliseconds, the unit every time column uses (this process's
/// clock: for records and messages; leases and due times use the database's).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One request for several targets (or one), before it is jobs: `jobs` are `(target name, job)`
/// in the order the targets were named.
#[derive(Debug, Clone)]
pub struct NewRequest {
    /// The source as requested, canonical.
    pub source: String,
    pub requested_by: Value,
    pub jobs: Vec<(String, NewJob)>,
}

/// A request stored: its id (none when every target refused it) and each target's answer.
#[derive(Debug)]
pub struct RequestEnqueued {
    pub id: Option<i64>,
    pub jobs: Vec<(String, Result<Enqueued, super::EnqueueError>)>,
}

/// A request as stored, with the job of each target.
#[derive(Debug, Clone, Serialize)]
pub struct Request {
    pub id: i64,
    pub source: String,
    /// The digest every target gets, once the first job resolved the source.
    pub source_digest: Option<String>,
    pub requested_by: Value,
    pub created_at: i64,
    /// `(target name, job)`, in the order the targets were named.
    pub jobs: Vec<(String, Job)>,
}

impl Request {
    /// Where the request is as a whole: `succeeded` (every target), `failed` (every target,
    /// for good), `partial` (some target succeeded and another failed for good or waits to try
    /// again after a failed attempt), `queued` (no target started), else `running`.
    pub fn state(&self) -> &'static str {
        let jobs = || self.jobs.iter().map(|(_, j)| j);
        let every = |s: JobState| jobs().all(|j| j.state == s);
        let troubled = |j: &Job| {
            j.state == JobState::Failed || (j.state == JobState::Queued && j.last_error.is_some())
        };
        if every(JobState::Succeeded) {
            "succeeded"
        } else if every(JobState::Failed) {
            "failed"
        } else if jobs().any(|j| j.state == JobState::Succeeded) && jobs().any(troubled) {
            "partial"
        } else if every(JobState::Queued) && !jobs().any(troubled) {
            "queued"
        } else {
            "running"
        }
    }
}

/// Where a request's target landed: its job's ledger record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landed {
    pub job_id: i64,
    pub mirror_repo: String,
    pub mirror_digest: String,
}

impl Job {
    /// The notice of this job's end (`X-Mirror-Event: job`), from the job as it ended (state,
    /// digest, error) and, when it succeeded, where it landed.
    pub fn end_notice(&self, landed: Option<&Landed>) -> NewNotice {
        let pull = landed.map(|l| {
            serde_json::json!({
                "by_tag": self.target_tag.as_ref().map(|t| format!("{}:{t}@{}", l.mirror_repo, l.mirror_digest)),
                "by_digest": format!("{}@{}", l.mirror_repo, l.mirror_digest),
            })
        });
        NewNotice {
            event: NoticeEvent::Job,
            body: serde_json::json!({
                "event": "job",
                "job_id": self.id,
                "requested_by": self.requested_by,
                "state": self.state.as_str(),
                "source": self.source,
                "source_digest": self.source_digest,
                "pull": pull,
                "error": if self.state == JobState::Failed { self.last_error.clone() } else { None },
            })
            .to_string(),
        }
    }
}

impl Request {
    /// Whether every target's job is over: succeeded, or failed for good.
    pub fn finished(&self) -> bool {
        self.jobs
            .iter()
            .all(|(_, j)| matches!(j.state, JobState::Succeeded | JobState::Failed))
    }

    /// The request's one completion notice, once [`Request::finished`]: every target's outcome
    /// (its job, state, pull lines from its ledger record in `landed`, or its error).
    pub fn completion_notice(&self, landed: &[Landed]) -> NewNotice {
        let targets: Vec<Value> = self
            .jobs
            .iter()
            .map(|(name, job)| {
                let pull = landed.iter().find(|l| l.job_id == job.id).map(|l| {
                    serde_json::json!({
                        "by_tag": job.target_tag.as_ref().map(|t| format!("{}:{t}@{}", l.mirror_repo, l.mirror_digest)),
                        "by_digest": format!("{}@{}", l.mirror_repo, l.mirror_digest),
                    })
                });
                serde_json::json!({
                    "target_name": name,
                    "job_id": job.id,
                    "state": job.state,
                    "target": match &job.target_tag {
                        Some(t) => format!("{}:{t}", job.target_repo),
                        None => job.target_repo.clone(),
                    },
                    "platforms": job.platforms,
                    "pull": if job.state == JobState::Succeeded { pull } else { None },
                    "error": if job.state == JobState::Failed { job.last_error.clone() } else { None },
                })
            })
            .collect();
        NewNotice {
            event: NoticeEvent::Request,
            body: serde_json::json!({
                "event": "request",
                "request_id": self.id,
                "requested_by": self.requested_by,
                "state": self.state(),
                "source": self.source,
                "source_digest": self.source_digest,
                "targets": targets,
            })
            .to_string(),
        }
    }
}
