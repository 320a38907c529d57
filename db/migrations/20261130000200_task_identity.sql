-- MCP Tasks (protocol 2025-11-25, basic/utilities/tasks): a task-augmented tools/call is a
-- row of `tasks` like any other call, plus what the protocol's Task needs. Every statement is
-- idempotent (if not exists, a guarded backfill), as every migration here.
--
-- identity: the client identity the session's token named (runtime/auth.py). Tasks are bound
-- to it: tasks/get, tasks/result, tasks/cancel and tasks/list only see the caller's own. The
-- sessions table has no identity column, so rows from before this migration cannot be
-- attributed: they get '(unknown)', which no token can name (runtime/auth.py's IDENTITY_PATTERN),
-- and they are never task-augmented, so no tasks/* method sees them anyway.
-- The default keeps writers that do not name one (older code, hand-written inserts) working.
alter table tasks add column if not exists identity text;
update tasks set identity = '(unknown)' where identity is null;
alter table tasks alter column identity set default '(unknown)';
alter table tasks alter column identity set not null;

-- Whether the call was task-augmented (params.task): only those are MCP tasks to a client.
alter table tasks add column if not exists augmented boolean not null default false;
-- The retention granted (the client's ttl, capped by EXAI_TASK_RETENTION), in milliseconds,
-- and when it ends; after expires_at the sweep clears `result` (never the row: token_usage
-- rows cascade from it) and stamps result_cleared_at.
alter table tasks add column if not exists ttl_ms bigint check (ttl_ms is null or ttl_ms >= 0);
alter table tasks add column if not exists expires_at timestamptz;
alter table tasks add column if not exists poll_interval_ms integer
    check (poll_interval_ms is null or poll_interval_ms > 0);
alter table tasks add column if not exists result_cleared_at timestamptz;
-- The JSON-RPC error object ({code, message, data?}) a call was answered with, when it was
-- answered with one: tasks/result returns exactly that.
alter table tasks add column if not exists rpc_error jsonb;

-- A sessionless request (Streamable HTTP, 2026-07-28) has no session row.
alter table tasks alter column session_id drop not null;

-- tasks/list: an identity's tasks, newest first.
create index if not exists tasks_identity_idx
    on tasks (identity, created_at desc) where augmented;

-- The retention sweep: the augmented tasks whose result is still held, by expiry.
create index if not exists tasks_expiring_idx
    on tasks (expires_at) where augmented and result_cleared_at is null;
