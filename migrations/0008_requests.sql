-- One request, several targets (issue 15): a request is what one POST /mirror asked for; each of
-- its targets is a job (a new one, or a live one it joined), with its own lease, attempts and state.
-- The first of its jobs to resolve the source stores the digest here, and every other target gets
-- that digest: one request, one image, whatever the tag does meanwhile.
-- (0007 is left to the platform-subset migration of the same issue.)
create table request (
    id integer primary key autoincrement,
    -- the source as requested, canonical
    source text not null,
    -- set once, by the first job of the request that resolves the source
    source_digest text,
    -- who asked, as on the jobs
    requested_by text not null,
    created_at integer not null
);

-- The request's jobs, one per target, in the order the targets were named.
create table request_job (
    request_id integer not null references request (id),
    position integer not null,
    -- the target's name (MIRROR_TARGETS; `default` for MIRROR_TARGET)
    target text not null,
    job_id integer not null references job (id),
    primary key (request_id, position)
);
create index request_job_job on request_job (job_id, request_id);
