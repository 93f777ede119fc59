-- The notice outbox: every notice (a job's result, drift found) is a row written in the transaction
-- that records what it announces, and delivered from here with backoff, so a restart loses none.
create table notice (
    id integer primary key autoincrement,
    -- what it announces: 'job' or 'drift' (sent as X-Mirror-Event)
    event text not null check (event in ('job', 'drift')),
    -- the JSON body exactly as it is signed and sent
    body text not null,
    -- 'pending' (to send, at next_attempt_at), 'delivered', or 'failed' (attempts spent)
    state text not null default 'pending' check (state in ('pending', 'delivered', 'failed')),
    attempts integer not null default 0,
    next_attempt_at integer not null,
    last_error text,
    created_at integer not null,
    updated_at integer not null,
    delivered_at integer
);
create index notice_due on notice (state, next_attempt_at);

-- Referrers are their own step: the image's copy stands when a referrer fails. Per job: 'copied'
-- (everything found was copied), 'failed' (something could not be looked up or copied; drift watch
-- tries again), null (referrers off, or the job has not succeeded); and what failed, as JSON
-- [{"subject", "reference", "error", "transient"}].
alter table job add column referrers_state text check (referrers_state in ('copied', 'failed'));
alter table job add column referrers_failed text;
