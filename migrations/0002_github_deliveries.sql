-- GitHub webhook deliveries. GitHub reuses X-GitHub-Delivery when it redelivers; the answer given the
-- first time is stored with the jobs (in the same transaction) and given again, and no job is added.
create table github_delivery (
    delivery_id text primary key,
    status integer not null,
    response text not null,
    created_at integer not null
);
