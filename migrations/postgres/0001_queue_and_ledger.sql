-- The PostgreSQL schema, equivalent to migrations/0001..0005 (SQLite) as they stand after 0005.
-- Times stay unix milliseconds (bigint) for parity with SQLite; "now" is always the database's
-- clock (mm_now_ms()), never a replica's, so leases mean the same on every replica.

create function mm_now_ms() returns bigint language sql stable
    as $$ select (extract(epoch from now()) * 1000)::bigint $$;

-- Takes transaction-scoped advisory locks on `keys` in the order given (the caller sorts them, so
-- two transactions never wait on each other's locks in opposite orders). One round trip.
create function mm_lock_keys(keys bigint[]) returns void language plpgsql as $$
declare k bigint;
begin
    foreach k in array keys loop
        perform pg_advisory_xact_lock(k);
    end loop;
end $$;

create table job (
    id bigint generated always as identity primary key,
    -- the source as requested, canonical (docker.io/library/nginx:1.25, or repo@sha256:…)
    source text not null,
    -- resolved once, on the first attempt; every later attempt copies exactly this digest
    source_digest text,
    -- the target repository (registry/path, no tag)
    target_repo text not null,
    -- the tag written on the target; null for a digest-only source
    target_tag text,
    state text not null check (state in ('queued', 'running', 'succeeded', 'failed')),
    attempts bigint not null default 0,
    max_attempts bigint not null,
    -- not claimable before this time (backoff after a transient failure)
    run_at bigint not null,
    -- set by a claim; every later write of a running job must present it
    lease_token text,
    lease_expires_at bigint,
    last_error text,
    -- who asked: {"kind":"token","name":"ci"}, {"kind":"github",...}, {"kind":"drift",...}
    requested_by jsonb not null,
    bytes_done bigint not null default 0,
    bytes_total bigint not null default 0,
    blobs_done bigint not null default 0,
    blobs_total bigint not null default 0,
    created_at bigint not null,
    updated_at bigint not null,
    started_at bigint,
    finished_at bigint,
    -- whether the job also copies what refers to the image (signatures, attestations, SBOMs)
    referrers boolean not null default true,
    -- drift policy asked for; null = the service default (MIRROR_DRIFT_POLICY)
    policy text check (policy in ('follow', 'pin')),
    -- re-check every manifest of the image on the target, not only the top one
    repair boolean not null default false
);

-- claims scan queued jobs by due time (partial: finished jobs never slow a claim down)
create index job_due on job (run_at, id) where state = 'queued';
-- dedupe finds the live jobs of a source and target
create index job_live on job (source, target_repo, coalesce(target_tag, ''), id)
    where state in ('queued', 'running');
-- one writer per target tag: a job is claimed only when no older live job writes the same tag
create index job_target_live on job (target_repo, target_tag, id)
    where state in ('queued', 'running');
-- rescue finds expired leases
create index job_lease on job (lease_expires_at) where state = 'running';
create index job_state on job (state, id);

-- One row per verified copy; history is kept.
create table mirror_record (
    id bigint generated always as identity primary key,
    -- a job writes at most one record, even if a lost lease races a restart
    job_id bigint not null unique references job (id),
    source_repo text not null,
    source_ref text not null,
    -- the source tag
    tag text,
    source_digest text not null,
    mirror_repo text not null,
    -- always equal to source_digest: the copy is verified before this row is written
    mirror_digest text not null,
    media_type text not null,
    -- [{"digest","media_type","platform","size"} …, {"digest","referrer_of","tag"} …], top first
    manifests jsonb not null,
    size_bytes bigint not null,
    requested_by jsonb not null,
    verified_at bigint not null,
    -- the tag written on the target (may differ from `tag`)
    mirror_tag text,
    -- the policy in force for this tag after this copy; null = service default
    policy text check (policy in ('follow', 'pin'))
);

create index mirror_record_source on mirror_record (source_repo, tag, verified_at);
create index mirror_record_mirror on mirror_record (mirror_repo, tag, verified_at);
create index mirror_record_mirror_tag on mirror_record (mirror_repo, mirror_tag, id);
create index mirror_record_digest on mirror_record (source_digest);
-- the newest record per mirror tag (or digest-only mirror): /status, drift watch
create index mirror_record_newest on mirror_record (mirror_repo, coalesce(mirror_tag, '@' || source_digest), id);

-- Every digest a record names (its manifests, its referrers): `/digests/{digest}` is an index
-- look-up instead of a scan of every record's JSON.
create table record_manifest (
    record_id bigint not null references mirror_record (id),
    digest text not null,
    primary key (digest, record_id)
);

-- GitHub webhook deliveries: the answer given the first time is given again on redelivery.
create table github_delivery (
    delivery_id text primary key,
    status bigint not null,
    response jsonb not null,
    created_at bigint not null
);

create table drift (
    id bigint generated always as identity primary key,
    mirror_repo text not null,
    mirror_tag text,
    source_repo text not null,
    source_tag text,
    kind text not null check (kind in ('upstream_moved', 'upstream_gone', 'missing')),
    recorded_digest text not null,
    observed_digest text,
    -- missing: what is missing, e.g. ["sha256:…", "tag"]
    missing jsonb,
    policy text not null check (policy in ('follow', 'pin')),
    job_id bigint references job (id),
    detected_at bigint not null,
    last_seen_at bigint not null,
    resolved_at bigint
);

-- at most one open row per problem
create unique index drift_open on drift (mirror_repo, coalesce(mirror_tag, ''), kind, recorded_digest, coalesce(observed_digest, ''))
    where resolved_at is null;
create index drift_job on drift (job_id) where resolved_at is null;
create index drift_repo on drift (source_repo) where resolved_at is null;

-- One owner per mirror repository (issue 12).
create table mirror_owner (
    mirror_repo text primary key,
    source_repo text not null,
    created_at bigint not null
);
