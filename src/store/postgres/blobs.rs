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

impl PgStore {
    pub(in crate::store) async fn claim_blob(
        &self,
        registry: &str,
        digest: &str,
        repo: &str,
        token: &str,
        lease: std::time::Duration,
    ) -> Result<Option<String>, Error> {
        // Ours if nobody holds it or the holder's lease ran out (it died): one statement.
        let mine: Option<String> = sqlx::query_scalar(
            "insert into blob_claim (registry, digest, repo, token, expires_at)
             values ($1, $2, $3, $4, mm_now_ms() + $5)
             on conflict (registry, digest) do update
                 set repo = excluded.repo, token = excluded.token, expires_at = excluded.expires_at
                 where blob_claim.expires_at < mm_now_ms()
             returning token",
        )
        .bind(registry)
        .bind(digest)
        .bind(repo)
        .bind(token)
        .bind(super::ms(lease))
        .fetch_optional(&self.pool)
        .await?;
        if mine.is_some() {
            return Ok(None);
        }
        let holder: Option<String> =
            sqlx::query_scalar("select repo from blob_claim where registry = $1 and digest = $2")
                .bind(registry)
                .bind(digest)
                .fetch_optional(&self.pool)
                .await?;
        // Released between the two statements: nobody holds it now; the caller asks again.
        Ok(Some(holder.unwrap_or_default()))
    }

    pub(in crate::store) async fn renew_blob_claim(
        &self,
        registry: &str,
        digest: &str,
        token: &str,
        lease: std::time::Duration,
    ) -> Result<bool, Error> {
        let n = sqlx::query(
            "update blob_claim set expires_at = mm_now_ms() + $4
             where registry = $1 and digest = $2 and token = $3",
        )
        .bind(registry)
        .bind(digest)
        .bind(token)
        .bind(super::ms(lease))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    pub(in crate::store) async fn release_blob_claim(
        &self,
        registry: &str,
        digest: &str,
        token: &str,
    ) -> Result<(), Error> {
        sqlx::query("delete from blob_claim where registry = $1 and digest = $2 and token = $3")
            .bind(registry)
            .bind(digest)
            .bind(token)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
