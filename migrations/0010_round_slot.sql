-- Periodic rounds (as postgres/0002): one row per (kind, slot), slot = floor(unix ms / interval
-- ms); the process that inserts it runs the round and records what it found, kept across restarts.
create table round_slot (
    kind text not null check (kind in ('drift', 'sync')),
    slot integer not null,
    interval_ms integer not null,
    replica text not null,
    started_at integer not null,
    finished_at integer,
    result text,
    primary key (kind, slot)
);
