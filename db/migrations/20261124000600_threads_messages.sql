-- Conversation memory (used by a later issue): a thread per continuation id, its messages in
-- turn order. A thread outlives the session that started it (context survives a restart),
-- so deleting a session only forgets which session that was.

create table if not exists threads (
    id          uuid primary key,
    session_id  varchar references sessions (session_id) on delete set null,
    owner_id    uuid,
    tool_name   text,
    title       text,
    turn_count  integer not null default 0 check (turn_count >= 0),
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    expires_at  timestamptz not null
);

-- Expiry sweeps, and listing a user's threads, newest first.
create index if not exists threads_expires_idx on threads (expires_at);
create index if not exists threads_owner_idx
    on threads (owner_id, updated_at desc) where owner_id is not null;

create table if not exists messages (
    id          uuid primary key,
    thread_id   uuid not null references threads (id) on delete cascade,
    turn_index  integer not null check (turn_index >= 0),
    role        text not null check (role in ('user', 'assistant', 'system', 'tool')),
    content     text not null,
    token_count integer not null default 0 check (token_count >= 0),
    files       jsonb not null default '[]'::jsonb,
    tool_name   text,
    created_at  timestamptz not null default now()
);

create index if not exists messages_thread_idx on messages (thread_id, turn_index);

alter table threads enable row level security;
alter table messages enable row level security;
