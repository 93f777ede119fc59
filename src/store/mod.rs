//! The one place with SQL and transactions: an interface of units of work over the queue, the
//! ledger and drift, with a SQLite backend (one machine, embedded) and a PostgreSQL one (N
//! replicas on one database). Callers see typed records and state enums, never a pool, a
//! transaction or a row.
//!
//! `Store` is an enum over the backends rather than a trait object: the methods are async, the
//! backends are two and known, and an enum needs no boxing of every future.

pub mod import;
pub mod postgres;
pub mod sqlite;
mod types;
mod versions;

use std::sync::Arc;
use std::time::Duration;

pub use types::*;
pub use versions::LedgerVersions;

use crate::reference::ImageRef;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `MIRROR_DATABASE` is not something we can open.
    #[error("MIRROR_DATABASE {location:?}: {reason}")]
    Config { location: String, reason: String },
    /// The database cannot be reached or opened.
    #[error(
        "MIRROR_DATABASE {location}: cannot open the database: {source}; check the URL (or path) and that the server is up and accepts connections"
    )]
    Unreachable {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    /// Applying the migrations failed.
    #[error("MIRROR_DATABASE {location}: applying migrations failed: {source}")]
    Migrate {
        location: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A statement failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A row holds what the code never writes (a state, a policy, JSON that does not parse).
    #[error("the database holds an unexpected {what}: {value}")]
    Corrupt { what: &'static str, value: String },
    /// The database is up but not ready (migrations missing, writes refused).
    #[error("database not ready: {0}")]
    NotReady(String),
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
    /// An import cannot start (what is wrong and what to do).
    #[error("{0}")]
    Import(String),
}

/// Why a request was not stored as a job.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The mirror repository already belongs to another source repository.
    #[error(
        "mirror repository {mirror_repo} belongs to {owner}; {requested} cannot be written there (name another target)"
    )]
    Owned {
        mirror_repo: String,
        owner: String,
        requested: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] Error),
}

impl From<sqlx::Error> for EnqueueError {
    fn from(e: sqlx::Error) -> Self {
        EnqueueError::Store(Error::Database(e))
    }
}

/// The store: SQLite or PostgreSQL behind the same units of work. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

/// Calls the same method on whichever backend this is.
macro_rules! each {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Store::Sqlite(s) => s.$method($($arg),*).await,
            Store::Postgres(s) => s.$method($($arg),*).await,
        }
    };
}

impl Store {
    /// Opens the database `location` names — `postgres://…` or `postgresql://…` for PostgreSQL,
    /// a file path or `sqlite:` URL for SQLite — and applies its migrations.
    pub async fn open(location: &str) -> Result<Store, Error> {
        if location.starts_with("postgres://") || location.starts_with("postgresql://") {
            Ok(Store::Postgres(postgres::PgStore::open(location).await?))
        } else {
            Ok(Store::Sqlite(sqlite::SqliteStore::open(location).await?))
        }
    }

    /// Jobs the rescue fails (their worker stopped and no attempts are left) announce their end
    /// in the outbox as a worker's would, and end their request's: set when notices are
    /// configured.
    pub fn with_notices(mut self, on: bool) -> Store {
        match &mut self {
            Store::Sqlite(s) => s.announce = on,
            Store::Postgres(s) => s.announce = on,
        }
        self
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Rung when a job was queued, here or (PostgreSQL) on another replica: an idle worker
    /// waits on it, with a poll as the fallback.
    pub fn wake(&self) -> Arc<tokio::sync::Notify> {
        match self {
            Store::Sqlite(s) => s.wake.clone(),
            Store::Postgres(s) => s.wake.clone(),
        }
    }

    /// The ledger's change counters: answers built from the ledger stay current while
    /// [`LedgerVersions::ledger`] answers the version they were built at.
    pub fn versions(&self) -> &LedgerVersions {
        match self {
            Store::Sqlite(s) => &s.versions,
            Store::Postgres(s) => &s.versions,
        }
    }

    /// Whether the database has every migration applied and takes writes (for `/readyz`),
    /// answering within about a second: a busy writer (SQLite) or a pool in full use
    /// (PostgreSQL) is [`WriterState::Busy`], load rather than a fault.
    pub async fn ready(&self) -> Result<WriterState, Error> {
        each!(self.ready())
    }

    /// Closes the pools (at shutdown).
    pub async fn close(&self) {
        each!(self.close())
    }

    /// Stores a job, or joins the live job for the same source and target (see [`Dedupe`]); the
    /// mirror repository is claimed for the job's source repository the first time.
    pub async fn enqueue(&self, new: &NewJob) -> Result<Enqueued, EnqueueError> {
        let mut out = self.enqueue_many(std::slice::from_ref(new)).await?;
        out.pop().expect("one answer per request")
    }

    /// [`Store::enqueue`] for several requests in one transaction (one fsync: group commit). A
    /// request refused for its target gets its refusal without failing its neighbours; a
    /// database error fails them all.
    pub async fn enqueue_many(
        &self,
        new: &[NewJob],
    ) -> Result<Vec<Result<Enqueued, EnqueueError>>, Error> {
        each!(self.enqueue_many(new))
    }

    /// Stores requests: each target's job (new, or a live one joined, as [`Store::enqueue`]),
    /// and the request with its jobs, all in one transaction. A target refused (another source
    /// owns its mirror name) gets its refusal and the others go on; a request every target
    /// refused is not stored.
    pub async fn enqueue_requests(
        &self,
        requests: &[NewRequest],
    ) -> Result<Vec<RequestEnqueued>, Error> {
        each!(self.enqueue_requests(requests))
    }

    /// One request by id, with the job of each target.
    pub async fn request(&self, id: i64) -> Result<Option<Request>, Error> {
        each!(self.request(id))
    }

    /// The digest the request of job `job_id` settled on, if a job of it resolved the source.
    pub async fn request_digest(&self, job_id: i64) -> Result<Option<String>, Error> {
        each!(self.request_digest(job_id))
    }

    /// Settles the request of job `job_id` on `digest` unless one of its jobs settled it
    /// first; returns the request's digest (`digest` itself for a job of no request).
    pub async fn settle_request_digest(&self, job_id: i64, digest: &str) -> Result<String, Error> {
        each!(self.settle_request_digest(job_id, digest))
    }

    /// The source repository a mirror repository belongs to, if it was ever used.
    pub async fn owner(&self, mirror_repo: &str) -> Result<Option<String>, Error> {
        each!(self.owner(mirror_repo))
    }

    /// Claims the next due job for `lease` (by the database's clock), first putting back jobs
    /// whose lease expired (their worker died, on any replica). A job waits while an older live
    /// job writes the same target tag.
    pub async fn claim(&self, lease: Duration) -> Result<Option<Lease>, Error> {
        each!(self.claim(lease))
    }

    /// [`Store::claim`], with the other queued, due jobs of the claimed job's requests (its other
    /// targets), claimed in the same transaction, each with its own lease: one copy reads the
    /// source once for all of them. The claimed job comes first; empty when nothing is due. A
    /// sibling that waits for an older job writing its tag stays queued; one another replica
    /// claimed first runs on its own there.
    pub async fn claim_group(&self, lease: Duration) -> Result<Vec<Lease>, Error> {
        each!(self.claim_group(lease))
    }

    /// Renews the lease and records progress. False when the lease is lost: stop writing.
    pub async fn heartbeat(
        &self,
        lease: &Lease,
        duration: Duration,
        p: ProgressRow,
    ) -> Result<bool, Error> {
        each!(self.heartbeat(lease, duration, p))
    }

    /// Stores the digest the source resolved to. False when the lease is lost.
    pub async fn set_source_digest(&self, lease: &Lease, digest: &str) -> Result<bool, Error> {
        each!(self.set_source_digest(lease, digest))
    }

    /// Marks the job succeeded (with how its referrers went), appends its ledger record, stores
    /// its notice in the outbox and resolves the drift it was queued for, in one transaction.
    /// False (and nothing written) when the lease is lost.
    pub async fn succeed_with_record(
        &self,
        lease: &Lease,
        record: &NewRecord,
        p: ProgressRow,
        referrers: Option<&JobReferrers>,
        notice: Option<&NewNotice>,
    ) -> Result<bool, Error> {
        let written = each!(self.succeed_with_record(lease, record, p, referrers, notice));
        if let Ok(true) = written {
            // The drift it settles was open, so whether any is open was not known: only the
            // record counts.
            self.versions().record_changed();
        }
        written
    }

    /// Back to the queue until `after` has passed, with the error that made it wait.
    pub async fn retry_later(
        &self,
        lease: &Lease,
        error: &str,
        after: Duration,
    ) -> Result<bool, Error> {
        each!(self.retry_later(lease, error, after))
    }

    /// Back to the queue to run `after` from now without spending an attempt (a rate limit
    /// cut the attempt short); keeps the reason it waits.
    pub async fn defer(&self, lease: &Lease, error: &str, after: Duration) -> Result<bool, Error> {
        each!(self.defer(lease, error, after))
    }

    /// Failed for good, with the reason (and its notice stored in the same transaction).
    pub async fn fail(
        &self,
        lease: &Lease,
        error: &str,
        notice: Option<&NewNotice>,
    ) -> Result<bool, Error> {
        each!(self.fail(lease, error, notice))
    }

    /// Back to the queue at shutdown without spending an attempt.
    pub async fn release(&self, lease: &Lease) -> Result<bool, Error> {
        each!(self.release(lease))
    }

    /// One job by id.
    pub async fn get(&self, id: i64) -> Result<Option<Job>, Error> {
        each!(self.get(id))
    }

    /// Jobs newest first, optionally in one state, with ids below `before` (for paging).
    pub async fn list(
        &self,
        state: Option<JobState>,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<Job>, Error> {
        each!(self.list(state, limit, before))
    }

    /// Jobs per state and the age of the oldest queued job.
    pub async fn stats(&self) -> Result<JobStats, Error> {
        each!(self.stats())
    }

    /// How long until the next claimable job is due (by the database's clock); none when no
    /// job waits (a job behind an older one on its tag is not counted).
    pub async fn next_due(&self) -> Result<Option<Duration>, Error> {
        each!(self.next_due())
    }

    /// A GitHub delivery as one unit: answered as before if `delivery_id` was handled, else
    /// `jobs` are enqueued (all or none: a refusal fails the delivery) and the answer
    /// `respond` builds from them is stored with them.
    pub async fn deliver(
        &self,
        delivery_id: &str,
        jobs: &[NewJob],
        respond: &(dyn Fn(&[Enqueued]) -> serde_json::Value + Sync),
    ) -> Result<Delivery, EnqueueError> {
        each!(self.deliver(delivery_id, jobs, respond))
    }

    /// Every record of a repository (its source or mirror name), newest first.
    pub async fn by_repo(&self, repo: &str) -> Result<Vec<Record>, Error> {
        each!(self.by_repo(repo))
    }

    /// Every record of one tag (the source's tag, or the mirror's own), newest first.
    pub async fn by_repo_tag(&self, repo: &str, tag: &str) -> Result<Vec<Record>, Error> {
        each!(self.by_repo_tag(repo, tag))
    }

    /// Records whose image is `digest` or names it (a platform manifest, a referrer), oldest first.
    pub async fn by_digest(&self, digest: &str) -> Result<Vec<Record>, Error> {
        each!(self.by_digest(digest))
    }

    /// The newest record of each mirrored tag (or digest-only image), newest first, filtered by
    /// a substring of the source or mirror repository.
    pub async fn latest(&self, query: Option<&str>, limit: i64) -> Result<Vec<Record>, Error> {
        each!(self.latest(query, limit))
    }

    /// The newest record of every mirrored tag and digest-only mirror: what drift watch checks.
    pub async fn watched(&self) -> Result<Vec<Record>, Error> {
        each!(self.watched())
    }

    /// Records `d` as open drift (or marks the open row for the same problem seen again) and,
    /// when `job` is given, enqueues it to follow or repair the drift — its `requested_by`
    /// becomes `{"kind":"drift","drift_id":…,"reason":…}` — and notes it on the row; one
    /// transaction. Drift seen for the first time is announced: `notice` builds the notice
    /// from the row, stored in the outbox in the same transaction.
    pub async fn record_drift_and_enqueue(
        &self,
        d: &NewDrift,
        job: Option<NewJob>,
        notice: Option<&(dyn Fn(&Drift) -> NewNotice + Sync)>,
    ) -> Result<DriftRecorded, Error> {
        let written = each!(self.record_drift_and_enqueue(d, job, notice));
        self.versions().drift_changed();
        written
    }

    /// Resolves the open drift of one mirrored tag (or digest-only mirror) that the latest check
    /// did not see again (`seen` are the ids it did see).
    pub async fn resolve_unseen_drift(
        &self,
        mirror_repo: &str,
        mirror_tag: Option<&str>,
        recorded_digest: &str,
        seen: &[i64],
    ) -> Result<u64, Error> {
        let resolved =
            each!(self.resolve_unseen_drift(mirror_repo, mirror_tag, recorded_digest, seen));
        if let Ok(n) = resolved
            && n > 0
        {
            self.versions().drift_changed();
        }
        resolved
    }

    /// Open drift of a repository (source or mirror name), newest first.
    pub async fn open_drift(&self, repo: &str) -> Result<Vec<Drift>, Error> {
        each!(self.open_drift(repo))
    }

    /// Drift rows newest first: open ones unless `all`, ids below `before`.
    pub async fn list_drift(
        &self,
        all: bool,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<Drift>, Error> {
        each!(self.list_drift(all, limit, before))
    }

    /// Open drift by kind.
    pub async fn open_drift_counts(&self) -> Result<Vec<(DriftKind, i64)>, Error> {
        each!(self.open_drift_counts())
    }
}

impl Store {
    /// Whether this replica runs the `kind` round of the current slot (floor(database clock /
    /// `interval`)): exactly one caller per slot across every replica gets it. `replica` names
    /// the caller in the record.
    pub async fn claim_round(
        &self,
        kind: RoundKind,
        interval: Duration,
        replica: &str,
    ) -> Result<Option<RoundSlot>, Error> {
        each!(self.claim_round(kind, interval, replica))
    }

    /// How long until the next slot of `interval` begins (by the database's clock).
    pub async fn next_round_in(&self, interval: Duration) -> Result<Duration, Error> {
        each!(self.next_round_in(interval))
    }

    /// Records what the round of `slot` found.
    pub async fn finish_round(
        &self,
        slot: RoundSlot,
        result: &serde_json::Value,
    ) -> Result<(), Error> {
        each!(self.finish_round(slot, result))
    }

    /// The last finished round of `kind`, on whichever replica it ran.
    pub async fn last_round(&self, kind: RoundKind) -> Result<Option<Round>, Error> {
        each!(self.last_round(kind))
    }
}

impl Store {
    /// Notes that `digests` are in `repo` on the target `registry` (written or found there by a
    /// copy), for copies on any replica to mount from.
    pub async fn record_blobs(
        &self,
        registry: &str,
        repo: &str,
        digests: &[String],
    ) -> Result<(), Error> {
        each!(self.record_blobs(registry, repo, digests))
    }

    /// Repositories on `registry` known to hold `digest`, most recently seen first (at most
    /// `limit`): where a copy tries a cross-repository mount before uploading.
    pub async fn blob_repos(
        &self,
        registry: &str,
        digest: &str,
        limit: i64,
    ) -> Result<Vec<String>, Error> {
        each!(self.blob_repos(registry, digest, limit))
    }

    /// Claims the move of `digest` into `repo` on `registry` for `lease` under `token`: none
    /// when the caller now holds it (nobody did, or the holder's lease ran out), else the
    /// repository the holder is moving it into (the caller waits, then mounts from there). On
    /// SQLite one process owns the file and its copy engine already moves a blob into a
    /// registry once at a time: always the caller's.
    pub async fn claim_blob(
        &self,
        registry: &str,
        digest: &str,
        repo: &str,
        token: &str,
        lease: Duration,
    ) -> Result<Option<String>, Error> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => s.claim_blob(registry, digest, repo, token, lease).await,
        }
    }

    /// Extends a held claim; false when it is no longer the caller's.
    pub async fn renew_blob_claim(
        &self,
        registry: &str,
        digest: &str,
        token: &str,
        lease: Duration,
    ) -> Result<bool, Error> {
        match self {
            Store::Sqlite(_) => Ok(true),
            Store::Postgres(s) => s.renew_blob_claim(registry, digest, token, lease).await,
        }
    }

    /// Ends a held claim (the blob moved, or its move failed).
    pub async fn release_blob_claim(
        &self,
        registry: &str,
        digest: &str,
        token: &str,
    ) -> Result<(), Error> {
        match self {
            Store::Sqlite(_) => Ok(()),
            Store::Postgres(s) => s.release_blob_claim(registry, digest, token).await,
        }
    }

    /// Forgets that `repo` holds `digest` (a mount from it failed: garbage collection removed it).
    pub async fn forget_blob(&self, registry: &str, repo: &str, digest: &str) -> Result<(), Error> {
        each!(self.forget_blob(registry, repo, digest))
    }
}

impl Store {
    /// Takes up to `limit` due notices for sending: each is not due again for `lease` (so
    /// another replica's sender skips it) unless its attempt is recorded first.
    pub async fn claim_notices(&self, limit: i64, lease: Duration) -> Result<Vec<Notice>, Error> {
        each!(self.claim_notices(limit, lease))
    }

    /// Gives a taken notice back, due now, its attempt not counted (a sender stopping).
    pub async fn release_notice(&self, id: i64) -> Result<(), Error> {
        each!(self.release_notice(id))
    }

    /// How long until the next pending notice is due.
    pub async fn next_notice_in(&self) -> Result<Option<Duration>, Error> {
        each!(self.next_notice_in())
    }

    /// Marks notice `id` delivered (its attempt counted).
    pub async fn notice_delivered(&self, id: i64) -> Result<(), Error> {
        each!(self.notice_delivered(id))
    }

    /// Records a failed attempt: pending again after `retry_after`, or failed for good when it
    /// is none.
    pub async fn notice_failed(
        &self,
        id: i64,
        error: &str,
        retry_after: Option<Duration>,
    ) -> Result<(), Error> {
        each!(self.notice_failed(id, error, retry_after))
    }

    /// Notices newest first, optionally in one state, with ids below `before` (for paging).
    pub async fn notices(
        &self,
        state: Option<NoticeState>,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<Notice>, Error> {
        each!(self.notices(state, limit, before))
    }

    /// Notices per state, for metrics.
    pub async fn notice_counts(&self) -> Result<Vec<(NoticeState, i64)>, Error> {
        each!(self.notice_counts())
    }
}

/// The source repository of a job's source reference (`docker.io/library/nginx`).
pub(crate) fn source_repo(source: &str) -> String {
    ImageRef::parse_source(source)
        .map(|r| r.repo_name())
        .unwrap_or_else(|_| source.to_string())
}

/// What an enqueue does, given the live jobs of the same source and target (newest first).
#[derive(Debug, PartialEq)]
pub(crate) enum Decision {
    /// Join this job as it is.
    Join(usize),
    /// Join the queued job `index` and widen its options.
    Merge {
        index: usize,
        referrers: bool,
        policy: Option<Policy>,
        repair: bool,
    },
    /// Store a new job (after the running one, if any).
    Insert { after: Option<i64> },
}

/// Issue 12's dedupe rules: join the newest queued job (widening its options to cover both
/// requests); else join the running one if it copies what this request names now with at least
/// the options asked for; else a new job, queued after the running one.
///
/// Platforms are not an option to widen: a subset and the whole image (or two subsets) write
/// different manifests under the tag. Only jobs for the same set, newer than any job for
/// another set, can carry the request; else it is a new job after the newest live one, so the
/// tag ends as the newest request asked.
pub(crate) fn decide(live: &[Job], new: &NewJob) -> Decision {
    let same = live
        .iter()
        .take_while(|j| j.platforms == new.platforms)
        .count();
    if same == 0 {
        return Decision::Insert {
            after: live.first().map(|j| j.id),
        };
    }
    let live = &live[..same];
    if let Some(index) = live.iter().position(|j| j.state == JobState::Queued) {
        let queued = &live[index];
        let referrers = queued.referrers || new.referrers;
        let policy = new.policy.or(queued.policy);
        let repair = queued.repair || new.repair;
        if (referrers, policy, repair) == (queued.referrers, queued.policy, queued.repair) {
            return Decision::Join(index);
        }
        return Decision::Merge {
            index,
            referrers,
            policy,
            repair,
        };
    }
    let Some(running) = live.first() else {
        return Decision::Insert { after: None };
    };
    let same_content = new.source.contains('@') || running.source_digest.is_none();
    let covers = (running.referrers || !new.referrers)
        && (running.repair || !new.repair)
        && new.policy.is_none_or(|p| running.policy == Some(p));
    if same_content && covers {
        Decision::Join(0)
    } else {
        Decision::Insert {
            after: Some(running.id),
        }
    }
}

type EnqueueReply = tokio::sync::oneshot::Sender<Result<RequestEnqueued, Error>>;

/// Group commit for enqueues: requests arriving together share one transaction and one fsync
/// (one `COMMIT` with `synchronous_commit=on` on PostgreSQL), so a `202` still means "durable"
/// without a flush per request.
#[derive(Clone)]
pub struct Enqueuer {
    tx: tokio::sync::mpsc::Sender<(NewRequest, EnqueueReply)>,
}

/// Most requests committed together.
const MAX_BATCH: usize = 256;

impl Enqueuer {
    /// Starts the batching task on `store`.
    pub fn start(store: Store) -> Enqueuer {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(NewRequest, EnqueueReply)>(4 * MAX_BATCH);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let (requests, replies): (Vec<NewRequest>, Vec<EnqueueReply>) =
                    batch.into_iter().unzip();
                match store.enqueue_requests(&requests).await {
                    Ok(results) => {
                        for (reply, r) in replies.into_iter().zip(results) {
                            let _ = reply.send(Ok(r));
                        }
                    }
                    // A database error (a deadlock victim, a dropped connection) fails the whole
                    // batch: one by one then, so each request gets its own answer.
                    Err(_) => {
                        for (r, reply) in requests.iter().zip(replies) {
                            let one = store
                                .enqueue_requests(std::slice::from_ref(r))
                                .await
                                .map(|mut v| v.pop().expect("one answer per request"));
                            let _ = reply.send(one);
                        }
                    }
                }
            }
        });
        Enqueuer { tx }
    }

    /// Stores `request` durably (see [`Store::enqueue_requests`]).
    pub async fn enqueue(&self, request: NewRequest) -> Result<RequestEnqueued, Error> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send((request, reply))
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }
}

fn corrupt(what: &'static str, value: impl Into<String>) -> Error {
    Error::Corrupt {
        what,
        value: value.into(),
    }
}

fn parse_json(what: &'static str, s: &str) -> Result<serde_json::Value, Error> {
    serde_json::from_str(s).map_err(|_| corrupt(what, s))
}

fn parse_policy(s: Option<&str>) -> Result<Option<Policy>, Error> {
    s.map(|p| p.parse().map_err(|_| corrupt("policy", p)))
        .transpose()
}
