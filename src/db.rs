//! The SQLite database: opening it (WAL, `synchronous=FULL`, one writer connection) and migrating it.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::{Context as _, Result};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// The two pools: many readers, one writer (SQLite allows one writer at a time; queueing writers
/// in the pool instead of in SQLite's busy handler keeps "database is locked" away from users).
#[derive(Clone, Debug)]
pub struct Db {
    /// For reads (`GET` endpoints).
    pub read: SqlitePool,
    /// The single writer connection.
    pub write: SqlitePool,
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
        sqlx::migrate!("./migrations")
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
