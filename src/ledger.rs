//! The digest ledger: one record per verified copy, and the queries behind `/images` and `/digests`.

use serde::Serialize;
use sqlx::FromRow;

use crate::db::Db;

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
}

/// Appends a record inside the caller's transaction (the one that marks the job succeeded).
pub async fn insert(conn: &mut sqlx::SqliteConnection, r: &NewRecord) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "insert into mirror_record (job_id, source_repo, source_ref, tag, source_digest, mirror_repo, mirror_digest,
             media_type, manifests, size_bytes, requested_by, verified_at)
         values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) returning id",
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
    .fetch_one(&mut *conn)
    .await
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

/// Every record of one tag of a repository, newest first: the first is what the tag is now.
pub async fn by_repo_tag(db: &Db, repo: &str, tag: &str) -> sqlx::Result<Vec<Record>> {
    sqlx::query_as(
        "select * from mirror_record where (source_repo = ?1 or mirror_repo = ?1) and tag = ?2
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
        "select * from mirror_record where source_digest = ?1
             or exists (select 1 from json_each(mirror_record.manifests) where json_extract(value, '$.digest') = ?1)
         order by verified_at, id",
    )
    .bind(digest)
    .fetch_all(&db.read)
    .await
}

/// The newest record of each mirrored tag (or digest-only image), newest first; `query` filters
/// by a substring of the source or mirror repository.
pub async fn latest(db: &Db, query: Option<&str>, limit: i64) -> sqlx::Result<Vec<Record>> {
    sqlx::query_as(
        "select * from mirror_record r
         where r.id = (select max(id) from mirror_record x
                       where x.source_repo = r.source_repo and ifnull(x.tag, x.source_digest) = ifnull(r.tag, r.source_digest))
           and (?1 is null or instr(r.source_repo, ?1) > 0 or instr(r.mirror_repo, ?1) > 0)
         order by r.verified_at desc, r.id desc limit ?2",
    )
    .bind(query)
    .bind(limit)
    .fetch_all(&db.read)
    .await
}
