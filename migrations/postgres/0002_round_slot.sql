-- Periodic rounds (drift watch, mirror-list sync) run once per interval across all replicas: the
-- replica whose insert of (kind, slot) wins runs the round of that slot; slot = floor(database
-- clock / interval). The row keeps who ran it and what it found, for every replica to show.
-- A replica that dies mid-round loses that slot's round (the next slot runs as usual).
create table round_slot (
    kind text not null check (kind in ('drift', 'sync')),
    slot bigint not null,
    interval_ms bigint not null,
    replica text not null,
    started_at bigint not null,
    finished_at bigint,
    result jsonb,
    primary key (kind, slot)
);
