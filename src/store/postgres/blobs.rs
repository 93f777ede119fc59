//! Where blobs already are on a target registry, shared by every replica.

use super::super::Error;
use super::PgStore;

impl PgStore {
    pub(in crate::store) async fn record_blobs(
        &self,
        registry: &str,
        repo: &str,
        digests: &[String],
    ) -> Result<(), Error> {
        if digests.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "insert into blob_location (registry, digest, repo, seen_at)
             select $1, d, $2, mm_now_ms() from unnest($3::text[]) as d
             on conflict (registry, digest, repo) do update set seen_at = excluded.seen_at",
        )
        .bind(registry)
        .bind(repo)
        .bind(digests)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(in crate::store) async fn blob_repos(
        &self,
        registry: &str,
        digest: &str,
        limit: i64,
    ) -> Result<Vec<String>, Error> {
        Ok(sqlx::query_scalar(
            "select repo from blob_location where registry = $1 and digest = $2
             order by seen_at desc, repo limit $3",
        )
        .bind(registry)
        .bind(digest)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub(in crate::store) async fn forget_blob(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
    ) -> Result<(), Error> {
        sqlx::query("delete from blob_location where registry = $1 and digest = $2 and repo = $3")
            .bind(registry)
            .bind(digest)
            .bind(repo)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
