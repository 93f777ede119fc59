-- One request, several targets, as migrations/0008 (SQLite). (0005 is left to the platform-subset
-- migration of the same issue.)
create table request (
    id bigint generated always as identity primary key,
    source text not null,
    -- set once, by the first job of the request that resolves the source
    source_digest text,
    requested_by jsonb not null,
    created_at bigint not null
);

create table request_job (
    request_id bigint not null references request (id),
    position bigint not null,
    target text not null,
    job_id bigint not null references job (id),
    primary key (request_id, position)
);
create index request_job_job on request_job (job_id, request_id);
