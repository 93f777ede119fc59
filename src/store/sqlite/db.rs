//! The SQLite database: opening it (WAL, `synchronous=FULL`, one writer connection) and migrating it.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::{Context as _, Result};

pub use crate::store::{WriterState, now_ms};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The two pools: many readers, one writer (SQLite allows one writer at a time; queueing writers
/// in the pool instead of in SQLite's busy handler keeps "database is locked" away from users).
#[derive(Clone, Debug)]
pub struct Db {
    /// For reads (`GET` endpoints).
    pub read: SqlitePool,
    /// The single writer connection.
    pub write: SqlitePool,
}

impl Db {
    /// Whether the database has every migration applied and takes writes (for `/readyz`). Answers
    /// within about a second even when the writer is busy: a write in progress holds the one
    /// writer connection (or SQLite's lock), and that is load, not a fault, so it reports
    /// [`WriterState::Busy`] instead of waiting for it. Errors are real faults: a closed pool, a
    /// database that refuses writes, missing migrations.
    pub async fn ready(&self) -> Result<WriterState> {
        let applied: i64 = tokio::time::timeout(
            Duration::from_secs(1),
            sqlx::query_scalar("select count(*) from _sqlx_migrations where success")
                .fetch_one(&self.read),
        )
        .await
        .context("reading the migrations table took over 1 s")?
        .context("reading the migrations table")?;
        let want = MIGRATOR.iter().count() as i64;
        anyhow::ensure!(applied == want, "{applied} of {want} migrations applied");
        anyhow::ensure!(!self.write.is_closed(), "the writer connection is closed");
        // The one writer connection in use: a write is running.
        let Some(mut conn) = self.write.try_acquire() else {
            return Ok(WriterState::Busy);
        };
        // SQLite's lock held (by another connection or process): wait for it 500 ms, not the
        // whole busy timeout (restored after: 10000 ms = BUSY_TIMEOUT). Never cancelled mid-statement: SQLite answers busy itself.
        sqlx::query("PRAGMA busy_timeout = 500")
            .execute(&mut *conn)
            .await?;
        let probe = match sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
            Ok(_) => sqlx::query("ROLLBACK")
                .execute(&mut *conn)
                .await
                .map(|_| WriterState::Idle),
            Err(sqlx::Error::Database(e)) if is_busy(e.as_ref()) => Ok(WriterState::Busy),
            Err(e) => Err(e),
        };
        sqlx::query("PRAGMA busy_timeout = 10000")
            .execute(&mut *conn)
            .await?;
        probe.context("the database takes no writes")
    }
}

/// Whether SQLite answered `SQLITE_BUSY` (any of its extended codes).
fn is_busy(e: &dyn sqlx::error::DatabaseError) -> bool {
    e.code()
        .and_then(|c| c.parse::<i64>().ok())
        .is_some_and(|c| c & 0xff == 5)
}

/// How long a statement waits for SQLite's lock before it answers busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

impl Db {
    /// Opens (creating if missing) the database at `location` — a file path or a `sqlite:` URL —
    /// and applies the migrations in `migrations/`.
    pub async fn open(location: &str) -> Result<Db> {
        let url = if location.starts_with("sqlite:") {
            location.to_string()
        } else {
            format!("sqlite://{location}")
        };
        let options = SqliteConnectOptions::from_str(&url)
            .with_context(|| {
                format!("MIRROR_DATABASE {location:?} is not a file path or sqlite: URL")
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a 202 means the job is on disk, even across a power loss.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .with_context(|| format!("opening the database {location}"))?;
        MIGRATOR
            .run(&write)
            .await
            .with_context(|| format!("applying migrations to {location}"))?;
        let read = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options.read_only(true))
            .await
            .with_context(|| format!("opening the database {location} for reading"))?;
        Ok(Db { read, write })
    }
}
