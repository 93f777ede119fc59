-- A request to several targets announces itself once, with every target's outcome: notice event
-- 'request' (SQLite cannot alter a check constraint: the table is rebuilt, rows and ids kept).
create table notice_next (
    id integer primary key autoincrement,
    -- what it announces: 'job', 'drift' or 'request' (sent as X-Mirror-Event)
    event text not null check (event in ('job', 'drift', 'request')),
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
insert into notice_next (id, event, body, state, attempts, next_attempt_at, last_error, created_at, updated_at, delivered_at)
    select id, event, body, state, attempts, next_attempt_at, last_error, created_at, updated_at, delivered_at from notice;
drop table notice;
alter table notice_next rename to notice;
create index notice_due on notice (state, next_attempt_at);
