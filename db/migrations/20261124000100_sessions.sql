-- MCP sessions: one row per WebSocket connection, from connect to disconnect.
-- Columns of the design seed, plus the client's identity and the negotiated protocol version.
-- Runs unchanged on plain PostgreSQL 15-18 and on Supabase.

create table if not exists sessions (
    id               uuid primary key default gen_random_uuid(),
    session_id       varchar unique not null,
    created_at       timestamptz not null default now(),
    last_activity    timestamptz not null default now(),
    status           varchar not null default 'active'
                     check (status in ('active', 'closed', 'interrupted')),
    client_name      text,
    client_version   text,
    protocol_version text,
    remote_addr      text,
    node_id          text,
    closed_at        timestamptz
);

-- The status command and dashboards list active sessions, newest activity first.
create index if not exists sessions_active_idx
    on sessions (last_activity desc) where status = 'active';

-- Supabase exposes tables in `public` over its REST API: deny by default. The runtime connects
-- as the table owner (or service_role), which bypasses row level security.
alter table sessions enable row level security;
