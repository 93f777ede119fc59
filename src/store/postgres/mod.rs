//! The PostgreSQL backend: N replicas on one database. Claims with `FOR UPDATE SKIP LOCKED` in a
//! materialized CTE, leases from the database's clock, the lease token fencing every write,
//! rescue of expired leases by any replica, enqueues serialised per target repository by
//! transaction-scoped advisory locks, wake-ups by `LISTEN/NOTIFY` (with the workers' poll as the
//! fallback).

mod blobs;
mod enqueue;
mod ledger;
mod outbox;
mod queue;
mod rounds;

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Error, WriterState};

/// The migrations in `migrations/postgres/`, embedded at build time. sqlx holds an advisory
/// lock while it migrates, so replicas starting at once on an empty database migrate it once.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The channel enqueues notify (payload: how many jobs were created).
const CHANNEL: &str = "mirror_mirror_jobs";

/// The channel every commit that changes the ledger notifies (payload: the table, `mirror_record`
/// or `drift`), by statement triggers (migrations/postgres/0009).
const LEDGER: &str = "mirror_mirror_ledger";

/// PostgreSQL through one pool.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    /// Rung when a job was queued here or on another replica.
    pub(in crate::store) wake: Arc<Notify>,
    /// Stops the LISTEN task (at `close`).
    stop: CancellationToken,
    /// Stops the LISTEN task when the last clone goes.
    _listening: Arc<DropGuard>,
    /// Whether jobs failed by the rescue announce their end (notices are configured).
    pub(in crate::store) announce: bool,
    /// Moved by this store's writes and by the ledger's notifications from everywhere; not
    /// current while the LISTEN connection is down.
    pub(in crate::store) versions: Arc<super::LedgerVersions>,
}

/// A duration in ms, as the database's bigint times are.
fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The URL without its password, for messages.
fn redacted(location: &str) -> String {
    match url::Url::parse(location) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => location.to_string(),
    }
}

impl PgStore {
    /// Connects to `location` (`postgres://user@host:port/db`) and applies the migrations.
    pub async fn open(location: &str) -> Result<PgStore, Error> {
        PgStore::open_with(location, 16).await
    }

    /// [`PgStore::open`] with a pool of `connections`.
    pub async fn open_with(location: &str, connections: u32) -> Result<PgStore, Error> {
        let shown = redacted(location);
        let options = PgConnectOptions::from_str(location).map_err(|e| Error::Config {
            location: shown.clone(),
            reason: format!(
                "not a PostgreSQL URL ({e}); write it as postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
            ),
        })?;
        // One connection first: its error says why (refused, no such database, authentication),
        // where the pool's would only say it timed out.
        let probe = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
            .await
            .map_err(|source| Error::Unreachable {
                location: shown.clone(),
                source,
            })?;
        let _ = sqlx::Connection::close(probe).await;
        let pool = PgPoolOptions::new()
            .max_connections(connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|source| Error::Unreachable {
                location: shown.clone(),
                source,
            })?;
        MIGRATOR.run(&pool).await.map_err(|source| Error::Migrate {
            location: shown.clone(),
            source,
        })?;
        let wake = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let versions = Arc::new(super::LedgerVersions::new(false));
        let (listening, subscribed) = tokio::sync::oneshot::channel();
        tokio::spawn(listen(
            pool.clone(),
            wake.clone(),
            versions.clone(),
            stop.clone(),
            listening,
        ));
        // Jobs queued elsewhere from now on wake this replica's workers (else they poll).
        if tokio::time::timeout(Duration::from_secs(10), subscribed)
            .await
            .is_err()
        {
            tracing::warn!("LISTEN {CHANNEL} not ready after 10 s; workers poll until it is");
        }
        Ok(PgStore {
            pool,
            wake,
            stop: stop.clone(),
            _listening: Arc::new(stop.drop_guard()),
            announce: false,
            versions,
        })
    }

    /// Every migration applied, a query answered within a second and the job table takes
    /// writes. Every connection in use for a second, or the table locked for half a second, is
    /// load, not a fault: [`WriterState::Busy`].
    pub(in crate::store) async fn ready(&self) -> Result<WriterState, Error> {
        if self.pool.is_closed() {
            return Err(Error::Closed);
        }
        // An idle connection, or a new one; none within a second: every connection is in use.
        let Ok(conn) = tokio::time::timeout(Duration::from_secs(1), self.pool.acquire()).await
        else {
            return Ok(WriterState::Busy);
        };
        let mut conn = conn?;
        let applied: i64 = tokio::time::timeout(
            Duration::from_secs(1),
            sqlx::query_scalar("select count(*) from _sqlx_migrations where success")
                .fetch_one(&mut *conn),
        )
        .await
        .map_err(|_| Error::NotReady("reading the migrations table took over 1 s".into()))??;
        let want = MIGRATOR.iter().count() as i64;
        if applied < want {
            return Err(Error::NotReady(format!(
                "{applied} of {want} migrations applied"
            )));
        }
        // Whether the job table takes writes: the lock every insert and update takes, waited for
        // half a second. Writers never block it; a table lock (maintenance, a stuck session)
        // does: busy, not broken.
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::query("set local lock_timeout = '500ms'")
            .execute(&mut *tx)
            .await?;
        let probe = sqlx::query("lock table job in row exclusive mode")
            .execute(&mut *tx)
            .await;
        tx.rollback().await?;
        match probe {
            Ok(_) => Ok(WriterState::Idle),
            // 55P03 lock_not_available
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                Ok(WriterState::Busy)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The pool, for the importer.
    pub(in crate::store) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(in crate::store) async fn close(&self) {
        self.stop.cancel();
        self.pool.close().await;
    }

    /// Wakes local workers for `created` new jobs (other replicas hear the NOTIFY).
    fn woke(&self, created: usize) {
        // One idle worker per new job (a request to several targets makes several at once).
        for _ in 0..created {
            self.wake.notify_one();
        }
    }
}

/// Forwards NOTIFYs on [`CHANNEL`] to `wake`, and on [`LEDGER`] to `versions`. A lost
/// connection is re-established; as notifications sent meanwhile are lost, the workers are woken
/// then to look for themselves (and they poll anyway), and `versions` is not current from the
/// loss until the new connection listens.
async fn listen(
    pool: PgPool,
    wake: Arc<Notify>,
    versions: Arc<super::LedgerVersions>,
    stop: CancellationToken,
    listening: tokio::sync::oneshot::Sender<()>,
) {
    let mut listening = Some(listening);
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("LISTEN {CHANNEL}: connecting failed: {e}; workers poll meanwhile");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        if let Err(e) = listener.listen_all([CHANNEL, LEDGER]).await {
            tracing::warn!("LISTEN {CHANNEL} failed: {e}; workers poll meanwhile");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
            continue;
        }
        backoff = Duration::from_millis(100);
        versions.hearing();
        if let Some(tx) = listening.take() {
            let _ = tx.send(());
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.try_recv() => match n {
                    Ok(Some(n)) if n.channel() == LEDGER => match n.payload() {
                        "drift" => versions.drift_changed(),
                        _ => versions.record_changed(),
                    },
                    Ok(Some(_)) => wake.notify_one(),
                    // The connection dropped: listen again on a new one.
                    Ok(None) => {
                        versions.deaf();
                        wake.notify_one();
                        break;
                    }
                    // Closing the store closes the pool under it: not a fault.
                    Err(_) if stop.is_cancelled() => return,
                    Err(e) => {
                        versions.deaf();
                        tracing::warn!("LISTEN {CHANNEL}: {e}; reconnecting");
                        wake.notify_one();
                        break;
                    }
                },
            }
        }
    }
}
