-- Sessions learn a version (bumped by every status change, for conflict detection) and the
-- running totals that the periodic activity sync writes (storage.rows.SessionActivity).
-- Every statement is idempotent, so this file can be run twice on the same database.

alter table sessions add column if not exists version       integer not null default 1;
alter table sessions add column if not exists tool_calls    bigint  not null default 0;
alter table sessions add column if not exists tool_errors   bigint  not null default 0;
alter table sessions add column if not exists input_tokens  bigint  not null default 0;
alter table sessions add column if not exists output_tokens bigint  not null default 0;

-- Recovery closes the sessions a dead node left active.
create index if not exists sessions_node_active_idx
    on sessions (node_id) where status = 'active';
