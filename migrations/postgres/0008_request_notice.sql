-- A request to several targets announces itself once, with every target's outcome: notice event
-- 'request', as migrations/0011 (SQLite).
alter table notice drop constraint notice_event_check;
alter table notice add constraint notice_event_check check (event in ('job', 'drift', 'request'));
