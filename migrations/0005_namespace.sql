-- The mirror namespace: one owner per mirror repository, one writer per target tag.

-- A mirror repository belongs to one source repository, recorded the first time a job is queued
-- for it. A request that maps another source into it is refused (409). Names of the default
-- mapping are reserved for their own source even before first use (checked in code).
create table mirror_owner (
    mirror_repo text primary key,
    source_repo text not null,
    created_at integer not null
);
insert into mirror_owner (mirror_repo, source_repo, created_at)
    select mirror_repo, source_repo, min(verified_at) from mirror_record
    where id in (select min(id) from mirror_record group by mirror_repo)
    group by mirror_repo;

-- The tag on the target is what look-ups by mirror name use; rows from before 0004 wrote it only
-- in `tag` (the source tag), which was the target tag then.
update mirror_record set mirror_tag = tag where mirror_tag is null and tag is not null;
create index mirror_record_mirror_tag on mirror_record (mirror_repo, mirror_tag, id);

-- Dedupe is no longer "one live job per source and target": a request for a tag whose job is
-- already running (pinned to the digest it resolved) or whose options differ is queued after it.
-- The enqueue transaction (BEGIN IMMEDIATE, one writer) decides; this index finds the live jobs.
drop index job_live;
create index job_live on job (source, target_repo, ifnull(target_tag, ''), id)
    where state in ('queued', 'running');
-- One writer per target tag: a job is claimed only when no older live job writes the same tag.
create index job_target_live on job (target_repo, ifnull(target_tag, ''), id)
    where state in ('queued', 'running');
