-- The durable job queue and the digest ledger.
-- Times are unix milliseconds (integers sort and compare cheaply; the API renders RFC 3339).

create table job (
    id integer primary key autoincrement,
    -- the source as requested, canonical (docker.io/library/nginx:1.25, or repo@sha256:…)
    source text not null,
    -- resolved once, on the first attempt; every later attempt copies exactly this digest,
    -- so a tag moving upstream between attempts cannot mix two images
    source_digest text,
    -- the target repository (registry/path, no tag)
    target_repo text not null,
    -- the tag written on the target; null for a digest-only source
    target_tag text,
    state text not null check (state in ('queued', 'running', 'succeeded', 'failed')),
    attempts integer not null default 0,
    max_attempts integer not null,
    -- not claimable before this time (backoff after a transient failure)
    run_at integer not null,
    -- set by a claim; every later write of a running job must present it, so a worker that lost
    -- its lease (expired, re-claimed by another) writes nothing
    lease_token text,
    lease_expires_at integer,
    last_error text,
    -- who asked, as JSON: {"kind":"token","name":"ci"} or {"kind":"github",...}
    requested_by text not null,
    bytes_done integer not null default 0,
    bytes_total integer not null default 0,
    blobs_done integer not null default 0,
    blobs_total integer not null default 0,
    created_at integer not null,
    updated_at integer not null,
    started_at integer,
    finished_at integer
);

-- claims scan queued jobs by due time
create index job_due on job (state, run_at, id);
-- dedupe: one live job per source and target; enqueue returns the live one
create unique index job_live on job (source, target_repo, ifnull(target_tag, ''))
    where state in ('queued', 'running');

-- One row per verified copy. History is kept: when an upstream tag later points elsewhere, a new row
-- is added and the old one stays queryable.
create table mirror_record (
    id integer primary key autoincrement,
    job_id integer not null references job (id),
    -- source repository (docker.io/library/nginx) and the reference asked for
    source_repo text not null,
    source_ref text not null,
    tag text,
    source_digest text not null,
    mirror_repo text not null,
    -- always equal to source_digest: the copy is verified before this row is written
    mirror_digest text not null,
    media_type text not null,
    -- JSON array of {"digest","media_type","platform","size"}, top manifest first
    manifests text not null,
    -- total size of the blobs the image names
    size_bytes integer not null,
    requested_by text not null,
    verified_at integer not null
);

create index mirror_record_source on mirror_record (source_repo, tag, verified_at);
create index mirror_record_mirror on mirror_record (mirror_repo, tag, verified_at);
create index mirror_record_digest on mirror_record (source_digest);
-- a job writes at most one record, even if a lost lease races a restart
create unique index mirror_record_job on mirror_record (job_id);
