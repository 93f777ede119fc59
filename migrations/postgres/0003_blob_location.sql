-- Where a blob already is on a target registry: a copy on any replica records the repositories it
-- wrote or found each blob in, so a copy on another replica mounts it from there instead of
-- uploading it again (cross-repository mount needs the source repository's name).
create table blob_location (
    registry text not null,
    digest text not null,
    repo text not null,
    seen_at bigint not null,
    primary key (registry, digest, repo)
);
