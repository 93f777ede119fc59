//! Moving to PostgreSQL with the history: `mirror-mirror import --from FILE --to postgres://…`
//! copies every row of a SQLite store (its migrations applied first) into a new, empty PostgreSQL
//! store, in one transaction — the ledger (records and the digests they name), mirror owners,
//! jobs and requests, drift, GitHub deliveries, notices and rounds — keeping every id, so
//! `/jobs/{id}`, `/requests/{id}` and the notices' ids mean what they meant.
//!
//! Columns are the ones both schemas have (PostgreSQL's `information_schema` decides); SQLite's
//! JSON-in-TEXT goes in as `jsonb`, its 0/1 as booleans (`json_populate_recordset` does the
//! typing). A job the old service left running is imported queued, its lease dropped, as the
//! rescue would have put it back. Nothing is written unless every row goes in.

use serde_json::Value;
use sqlx::{AssertSqlSafe, Row as _};

use super::Error;
use super::postgres::PgStore;
use super::sqlite::SqliteStore;

/// The tables, parents before the rows that refer to them.
const TABLES: &[&str] = &[
    "job",
    "mirror_owner",
    "request",
    "request_job",
    "mirror_record",
    "record_manifest",
    "drift",
    "github_delivery",
    "notice",
    "round_slot",
];

/// Rows per insert statement.
const BATCH: usize = 500;

/// What an import moved: `(table, rows)` in [`TABLES`] order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported(pub Vec<(&'static str, u64)>);

impl std::fmt::Display for Imported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(t, n)| format!("{t} {n}")).collect();
        f.write_str(&parts.join(", "))
    }
}

/// Copies every row of the SQLite store at `from` into the empty PostgreSQL store at `to`.
pub async fn sqlite_to_postgres(from: &str, to: &str) -> Result<Imported, Error> {
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        return Err(Error::Import(format!(
            "--to {to:?} is not a postgres:// or postgresql:// URL; give the new PostgreSQL database"
        )));
    }
    if !std::path::Path::new(from.strip_prefix("sqlite:").unwrap_or(from)).is_file() {
        return Err(Error::Import(format!(
            "--from {from:?}: no such file; give the SQLite file the service used (its MIRROR_DATABASE)"
        )));
    }
    let source = SqliteStore::open(from).await?;
    let target = PgStore::open(to).await?;
    let result = copy_rows(&source, &target).await;
    source.close().await;
    target.close().await;
    result
}

async fn copy_rows(source: &SqliteStore, target: &PgStore) -> Result<Imported, Error> {
    // One read transaction: every table as of one moment, even if the old service still runs.
    let mut read = source.db().read.begin().await?;
    let pg = target.pool();
    let mut tx = pg.begin().await?;
    let (jobs, records): (i64, i64) =
        sqlx::query_as("select (select count(*) from job), (select count(*) from mirror_record)")
            .fetch_one(&mut *tx)
            .await?;
    if jobs + records > 0 {
        return Err(Error::Import(format!(
            "--to already holds {jobs} jobs and {records} ledger records; import into a new, empty database"
        )));
    }
    let mut moved = Vec::new();
    for &table in TABLES {
        // (column, PostgreSQL type) of the columns both sides have, in PostgreSQL's order.
        let pg_columns: Vec<(String, String)> = sqlx::query_as(
            "select column_name::text, data_type::text from information_schema.columns
             where table_schema = current_schema() and table_name = $1 order by ordinal_position",
        )
        .bind(table)
        .fetch_all(&mut *tx)
        .await?;
        let sqlite_columns: Vec<String> =
            sqlx::query_scalar("select name from pragma_table_info(?1)")
                .bind(table)
                .fetch_all(&mut *read)
                .await?;
        let columns: Vec<&(String, String)> = pg_columns
            .iter()
            .filter(|(c, _)| sqlite_columns.contains(c))
            .collect();
        // Each row as one JSON object; JSON held as text is embedded as JSON.
        let fields: Vec<String> = columns
            .iter()
            .map(|(c, ty)| match ty.as_str() {
                "json" | "jsonb" => format!("'{c}', json(\"{c}\")"),
                _ => format!("'{c}', \"{c}\""),
            })
            .collect();
        // Table and column names are the schemas' own (TABLES, information_schema, pragma).
        let rows: Vec<String> = sqlx::query(AssertSqlSafe(format!(
            "select json_object({}) from \"{table}\"",
            fields.join(", ")
        )))
        .fetch_all(&mut *read)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<_, _>>()?;
        let names: Vec<String> = columns.iter().map(|(c, _)| format!("\"{c}\"")).collect();
        let names = names.join(", ");
        let insert = format!(
            "insert into \"{table}\" ({names}) overriding system value
             select {names} from json_populate_recordset(null::\"{table}\", $1::json)"
        );
        for chunk in rows.chunks(BATCH) {
            let mut batch = Vec::with_capacity(chunk.len());
            for row in chunk {
                let mut v: Value = serde_json::from_str(row).map_err(|e| Error::Corrupt {
                    what: "row",
                    value: format!("{table}: {e}"),
                })?;
                if table == "job" && v["state"] == "running" {
                    // Its worker is gone with the old service: back in the queue, as the rescue does.
                    v["state"] = "queued".into();
                    v["lease_token"] = Value::Null;
                    v["lease_expires_at"] = Value::Null;
                }
                batch.push(v);
            }
            sqlx::query(AssertSqlSafe(insert.clone()))
                .bind(Value::Array(batch).to_string())
                .execute(&mut *tx)
                .await?;
        }
        moved.push((table, rows.len() as u64));
    }
    // New rows continue after the imported ids.
    for (table, column) in sqlx::query_as::<_, (String, String)>(
        "select table_name::text, column_name::text from information_schema.columns
         where table_schema = current_schema() and is_identity = 'YES'",
    )
    .fetch_all(&mut *tx)
    .await?
    {
        sqlx::query(AssertSqlSafe(format!(
            "select setval(pg_get_serial_sequence('\"{table}\"', '{column}'),
                 coalesce((select max(\"{column}\") from \"{table}\"), 0) + 1, false)"
        )))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    read.rollback().await?;
    Ok(Imported(moved))
}
