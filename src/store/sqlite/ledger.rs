//! The digest ledger: one record per verified copy, and the queries behind `/images` and `/digests`.

use serde::Serialize;
use sqlx::FromRow;

use super::db::Db;

/// A record to append after a verified copy.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub job_id: i64,
    pub source_repo: String,
    pub source_ref: String,
    pub tag: Option<String>,
    pub source_digest: String,
    pub mirror_repo: String,
    pub mirror_digest: String,
    pub media_type: String,
    /// JSON array of the image's manifests (digest, media type, platform, size), top first.
    pub manifests: String,
    pub size_bytes: i64,
    pub requested_by: String,
    pub verified_at: i64,
    /// The tag written on the target (may differ from the source tag `tag`).
    pub mirror_tag: Option<String>,
    /// Drift policy in force for the tag (`follow`/`pin`); none means the service default.
    pub policy: Option<String>,
}

/// A stored record.
#[derive(Debug, Clone, FromRow, Serialize)]
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
    pub manifests: String,
    pub size_bytes: i64,
    pub requested_by: String,
    pub verified_at: i64,
    /// The tag written on the target (may differ from the source tag `tag`).
    pub mirror_tag: Option<String>,
    /// Drift policy in force for the tag (`follow`/`pin`); none means the service default.
    pub policy: Option<String>,
}

/// Appends a record inside the caller's transaction (the one that marks the job succeeded).
pub async fn insert(conn: &mut sqlx::SqliteConnection, r: &NewRecord) -> sqlx::Result<i64> {
    let id: i64 = sqlx::query_scalar(
        "insert into mirror_record (job_id, source_repo, source_ref, tag, source_digest, mirror_repo, mirror_digest,
             media_type, manifests, size_bytes, requested_by, verified_at, mirror_tag, policy)
         values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) returning id",
    )
    .bind(r.job_id)
    .bind(&r.source_repo)
    .bind(&r.source_ref)
    .bind(&r.tag)
    .bind(&r.source_digest)
    .bind(&r.mirror_repo)
    .bind(&r.mirror_digest)
    .bind(&r.media_type)
    .bind(&r.manifests)
    .bind(r.size_bytes)
    .bind(&r.requested_by)
    .bind(r.verified_at)
    .bind(&r.mirror_tag)
    .bind(&r.policy)
    .fetch_one(&mut *conn)
    .await?;
    // Every digest the record names: the image, each manifest, each referrer.
    sqlx::query(
        "insert or ignore into record_manifest (record_id, digest)
         select ?1, ?2
         union select ?1, json_extract(m.value, '$.digest') from json_each(?3) m
             where json_extract(m.value, '$.digest') is not null",
    )
    .bind(id)
    .bind(&r.source_digest)
    .bind(&r.manifests)
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

/// Every record of a repository, named by its source or its mirror name, newest first.
pub async fn by_repo(db: &Db, repo: &str) -> sqlx::Result<Vec<Record>> {
    sqlx::query_as(
        "select * from mirror_record where source_repo = ?1 or mirror_repo = ?1 order by verified_at desc, id desc",
    )
    .bind(repo)
    .fetch_all(&db.read)
    .await
}

/// Every record of one tag, newest first: the first is what the tag is now. `repo` is a source
/// repository (then `tag` is the source tag) or a mirror repository (then it is the tag on the
/// mirror, which a request may have named differently).
pub async fn by_repo_tag(db: &Db, repo: &str, tag: &str) -> sqlx::Result<Vec<Record>> {
    sqlx::query_as(
        "select * from mirror_record where (source_repo = ?1 and tag = ?2) or (mirror_repo = ?1 and mirror_tag = ?2)
         order by verified_at desc, id desc",
    )
    .bind(repo)
    .bind(tag)
    .fetch_all(&db.read)
    .await
}

/// Records whose image is `digest` or contains it (a platform's manifest), oldest first.
pub async fn by_digest(db: &Db, digest: &str) -> sqlx::Result<Vec<Record>> {
    sqlx::query_as(
        "select * from mirror_record where id in (select record_id from record_manifest where digest = ?1)
         order by verified_at, id",
    )
    .bind(digest)
    .fetch_all(&db.read)
    .await
}

/// The newest record of each mirrored tag (or digest-only image) on each mirror, newest first;
/// `query` filters by a substring of the source or mirror repository.
pub async fn latest(db: &Db, query: Option<&str>, limit: i64) -> sqlx::Result<Vec<Record>> {
    sqlx::query_as(
        "select * from mirror_record r
         where r.id = (select max(id) from mirror_record x
                       where x.mirror_repo = r.mirror_repo
                         and ifnull(x.mirror_tag, '@' || x.source_digest) = ifnull(r.mirror_tag, '@' || r.source_digest))
           and (?1 is null or instr(r.source_repo, ?1) > 0 or instr(r.mirror_repo, ?1) > 0)
         order by r.verified_at desc, r.id desc limit ?2",
    )
    .bind(query)
    .bind(limit)
    .fetch_all(&db.read)
    .await
}

/// The newest record of every mirrored tag, and of every digest-only mirror, per mirror
/// repository: what drift watch re-checks.
pub async fn watched(db: &Db) -> sqlx::Result<Vec<Record>> {
    sqlx::query_as(
        "select r.* from mirror_record r
         join (select max(id) as id from mirror_record
               group by mirror_repo, coalesce(mirror_tag, '@' || source_digest)) newest
           on newest.id = r.id
         order by r.mirror_repo, r.id",
    )
    .fetch_all(&db.read)
    .await
}

/// A problem drift watch found with a mirrored tag.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Drift {
    pub id: i64,
    pub mirror_repo: String,
    pub mirror_tag: Option<String>,
    pub source_repo: String,
    pub source_tag: Option<String>,
    /// `upstream_moved`, `upstream_gone` or `missing`.
    pub kind: String,
    pub recorded_digest: String,
    pub observed_digest: Option<String>,
    /// JSON array of what is missing on the target.
    pub missing: Option<String>,
    pub policy: String,
    pub job_id: Option<i64>,
    pub detected_at: i64,
    pub last_seen_at: i64,
    pub resolved_at: Option<i64>,
}

/// A problem to record (see [`upsert_drift`]).
#[derive(Debug, Clone)]
pub struct NewDrift {
    pub mirror_repo: String,
    pub mirror_tag: Option<String>,
    pub source_repo: String,
    pub source_tag: Option<String>,
    pub kind: &'static str,
    pub recorded_digest: String,
    pub observed_digest: Option<String>,
    pub missing: Option<String>,
    pub policy: String,
}

/// Records `d` as open drift, or marks the open row for the same problem as seen again. Returns
/// the row and whether it is new. Runs in the caller's (immediate) transaction.
pub async fn upsert_drift(
    tx: &mut sqlx::SqliteConnection,
    d: &NewDrift,
    now: i64,
) -> sqlx::Result<(Drift, bool)> {
    let existing: Option<Drift> = sqlx::query_as(
        "update drift set last_seen_at = ?1, missing = ?7, policy = ?8
         where resolved_at is null and mirror_repo = ?2 and ifnull(mirror_tag, '') = ifnull(?3, '')
           and kind = ?4 and recorded_digest = ?5 and ifnull(observed_digest, '') = ifnull(?6, '')
         returning *",
    )
    .bind(now)
    .bind(&d.mirror_repo)
    .bind(&d.mirror_tag)
    .bind(d.kind)
    .bind(&d.recorded_digest)
    .bind(&d.observed_digest)
    .bind(&d.missing)
    .bind(&d.policy)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = existing {
        return Ok((row, false));
    }
    let row = sqlx::query_as(
        "insert into drift (mirror_repo, mirror_tag, source_repo, source_tag, kind, recorded_digest,
             observed_digest, missing, policy, detected_at, last_seen_at)
         values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10) returning *",
    )
    .bind(&d.mirror_repo)
    .bind(&d.mirror_tag)
    .bind(&d.source_repo)
    .bind(&d.source_tag)
    .bind(d.kind)
    .bind(&d.recorded_digest)
    .bind(&d.observed_digest)
    .bind(&d.missing)
    .bind(&d.policy)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    Ok((row, true))
}

/// Notes the job queued to follow or repair drift `id`.
pub async fn set_drift_job(
    tx: &mut sqlx::SqliteConnection,
    id: i64,
    job_id: i64,
) -> sqlx::Result<()> {
    sqlx::query("update drift set job_id = ?1 where id = ?2")
        .bind(job_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Resolves the open drift of one mirrored tag (or digest-only mirror) that the latest check did
/// not see again (`seen` are the ids it did see).
pub async fn resolve_unseen_drift(
    db: &Db,
    mirror_repo: &str,
    mirror_tag: Option<&str>,
    recorded_digest: &str,
    seen: &[i64],
    now: i64,
) -> sqlx::Result<u64> {
    let seen = serde_json::to_string(seen).unwrap_or_else(|_| "[]".into());
    Ok(sqlx::query(
        "update drift set resolved_at = ?1
         where resolved_at is null and mirror_repo = ?2 and ifnull(mirror_tag, '') = ifnull(?3, '')
           and (?3 is not null or recorded_digest = ?4)
           and id not in (select value from json_each(?5))",
    )
    .bind(now)
    .bind(mirror_repo)
    .bind(mirror_tag)
    .bind(recorded_digest)
    .bind(seen)
    .execute(&db.write)
    .await?
    .rows_affected())
}

/// Open drift of a repository, named by its source or its mirror name, newest first.
pub async fn open_drift(db: &Db, repo: &str) -> sqlx::Result<Vec<Drift>> {
    sqlx::query_as(
        "select * from drift where resolved_at is null and (mirror_repo = ?1 or source_repo = ?1)
         order by id desc",
    )
    .bind(repo)
    .fetch_all(&db.read)
    .await
}

/// Drift rows newest first: only open ones unless `all`, ids below `before` (for paging).
pub async fn list_drift(
    db: &Db,
    all: bool,
    limit: i64,
    before: Option<i64>,
) -> sqlx::Result<Vec<Drift>> {
    sqlx::query_as(
        "select * from drift where (?1 or resolved_at is null) and (?2 is null or id < ?2)
         order by id desc limit ?3",
    )
    .bind(all)
    .bind(before)
    .bind(limit)
    .fetch_all(&db.read)
    .await
}

/// Open drift by kind, for metrics.
pub async fn open_drift_counts(db: &Db) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("select kind, count(*) from drift where resolved_at is null group by kind")
        .fetch_all(&db.read)
        .await
}
