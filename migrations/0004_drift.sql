-- Drift watch: mirrored tags are re-checked against their source and the target on a schedule.

-- The drift policy a job was asked for: 'follow' (mirror a moved tag's new digest) or 'pin' (keep the
-- mirrored digest). Null means the service default (MIRROR_DRIFT_POLICY).
alter table job add column policy text check (policy in ('follow', 'pin'));
-- A repair job re-checks every manifest of the image on the target instead of trusting the top one's
-- presence (drift watch found a child missing: garbage collection or retention removed it).
alter table job add column repair integer not null default 0;

-- The tag written on the target. It differs from `tag` (the source tag) when a request named its own
-- target tag; null in rows written before this migration, where it equals `tag`.
alter table mirror_record add column mirror_tag text;
-- The policy in force for this tag after this copy (copied from the job; null = service default).
alter table mirror_record add column policy text;

-- One row per problem found. A problem seen again in a later round updates `last_seen_at` instead of
-- adding a row; a round that no longer sees it (or the job that fixed it succeeding) resolves it.
create table drift (
    id integer primary key autoincrement,
    -- what was checked: the mirror repository and its tag (null for a digest-only mirror)
    mirror_repo text not null,
    mirror_tag text,
    source_repo text not null,
    source_tag text,
    -- upstream_moved: the source tag names another digest now;
    -- upstream_gone: the source tag no longer exists (nothing is queued: the mirror keeps what it has);
    -- missing: a manifest of the image (or the tag itself) is gone from the target or names another
    --          digest there (garbage collection, retention, an overwrite); repaired by a job
    kind text not null check (kind in ('upstream_moved', 'upstream_gone', 'missing')),
    -- the digest the ledger says was mirrored
    recorded_digest text not null,
    -- upstream_moved: the digest the source tag names now
    observed_digest text,
    -- missing: JSON array of what is missing, e.g. ["sha256:…", "tag"]
    missing text,
    policy text not null check (policy in ('follow', 'pin')),
    -- the job queued to follow or repair it; null when the policy says to leave it
    job_id integer references job (id),
    detected_at integer not null,
    last_seen_at integer not null,
    resolved_at integer
);

-- at most one open row per problem; the API lists open rows per repository
create unique index drift_open on drift (mirror_repo, ifnull(mirror_tag, ''), kind, recorded_digest, ifnull(observed_digest, ''))
    where resolved_at is null;
create index drift_job on drift (job_id) where resolved_at is null;
