-- Every digest a record names (the image, each manifest, each referrer), so `/digests/{digest}`
-- is an index look-up instead of json_each over every record (as postgres/0001). Backfilled.
create table record_manifest (
    record_id integer not null references mirror_record (id),
    digest text not null,
    primary key (digest, record_id)
) without rowid;

insert or ignore into record_manifest (record_id, digest)
    select id, source_digest from mirror_record;
insert or ignore into record_manifest (record_id, digest)
    select r.id, json_extract(m.value, '$.digest') from mirror_record r, json_each(r.manifests) m
    where json_extract(m.value, '$.digest') is not null;
