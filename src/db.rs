//! The SQLite database: opening it (WAL, `synchronous=FULL`, one writer connection) and migrating it.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::{Context as _, Result};
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
    /// Whether the database takes writes and has every migration applied (for `/readyz`).
    pub async fn ready(&self) -> Result<()> {
        let mut tx = self
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .context("the database takes no writes")?;
        let applied: i64 =
            sqlx::query_scalar("select count(*) from _sqlx_migrations where success")
                .fetch_one(&mut *tx)
                .await
                .context("reading the migrations table")?;
        tx.rollback().await?;
        let want = MIGRATOR.iter().count() as i64;
        anyhow::ensure!(applied == want, "{applied} of {want} migrations applied");
        Ok(())
    }
}

/// The current time as unix milliseconds, the unit every time column uses.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

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
            .busy_timeout(Duration::from_secs(10))
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
