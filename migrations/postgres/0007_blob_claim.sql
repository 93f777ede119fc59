-- A blob being moved into a target registry right now, by one replica (issue 14): a replica that
-- would move the same blob waits for it and mounts it from where it went instead of uploading it
-- again. A claim is a lease renewed while its transfer runs; a replica that dies leaves it to
-- expire, and the next one takes it over. (0005 is left to the platform-subset migration.)
create table blob_claim (
    registry text not null,
    digest text not null,
    -- where the holder is putting it
    repo text not null,
    -- the holder's; renewals and the release present it
    token text not null,
    expires_at bigint not null,
    primary key (registry, digest)
);
