-- Every commit that changes the ledger (records or drift, from any replica or any other client)
-- notifies mirror_mirror_ledger with the table's name, so each replica knows when the answers it
-- keeps from the ledger (GET /images, GET /digests) have gone out of date, and whether drift may
-- be open. Row triggers: a statement that changes no row (a job settling the drift of another
-- job) says nothing, and PostgreSQL folds a transaction's identical notifications into one.
create function mm_ledger_changed() returns trigger language plpgsql as $$
begin
    perform pg_notify('mirror_mirror_ledger', tg_table_name);
    return null;
end
$$;

create trigger mirror_record_changed after insert or update or delete on mirror_record
    for each row execute function mm_ledger_changed();
create trigger mirror_record_truncated after truncate on mirror_record
    for each statement execute function mm_ledger_changed();
create trigger drift_changed after insert or update or delete on drift
    for each row execute function mm_ledger_changed();
create trigger drift_truncated after truncate on drift
    for each statement execute function mm_ledger_changed();
