-- STAGED for the merge (moves to migrations/sqlite/): not applied from here.
-- Where a blob already is on a target registry (as postgres/0003), kept across restarts.
create table blob_location (
    registry text not null,
    digest text not null,
    repo text not null,
    seen_at integer not null,
    primary key (registry, digest, repo)
) without rowid;
