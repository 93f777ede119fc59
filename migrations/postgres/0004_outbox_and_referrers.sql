-- The notice outbox and the referrers' own step, as migrations/0006 (SQLite).
-- Every notice (a job's result, drift found) is a row written in the transaction that records what
-- it announces, and delivered from here with backoff, so a restart loses none. A sender takes due
-- rows by pushing next_attempt_at ahead (a lease), so two replicas never send the same one at once.
create table notice (
    id bigint generated always as identity primary key,
    -- what it announces: 'job' or 'drift' (sent as X-Mirror-Event)
    event text not null check (event in ('job', 'drift')),
    -- the JSON body exactly as it is signed and sent (text, not jsonb: the bytes are signed)
    body text not null,
    -- 'pending' (to send, at next_attempt_at), 'delivered', or 'failed' (attempts spent)
    state text not null default 'pending' check (state in ('pending', 'delivered', 'failed')),
    attempts bigint not null default 0,
    next_attempt_at bigint not null,
    last_error text,
    created_at bigint not null,
    updated_at bigint not null,
    delivered_at bigint
);
create index notice_due on notice (next_attempt_at, id) where state = 'pending';
create index notice_state on notice (state, id);

-- Per job: 'copied' (everything found was copied), 'failed' (something could not be looked up or
-- copied; drift watch tries again), null (referrers off, or not succeeded); and what failed,
-- [{"subject", "reference", "error", "transient"}].
alter table job add column referrers_state text check (referrers_state in ('copied', 'failed'));
alter table job add column referrers_failed jsonb;
