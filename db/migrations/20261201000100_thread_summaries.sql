-- Conversation compaction (docs/chat.md, "Compaction"): a long thread's older exchanges are
-- summarised by its model, and the summary replaces them in what is sent upstream. Every
-- statement is idempotent (if not exists), as every migration here.

-- One row per summary: it covers exchanges first_turn..last_turn (messages.turn_index, both
-- included) of its thread. A later summary extends the one before it (same first_turn, a
-- greater last_turn); the newest, by last_turn, is the one sent. Written once, never updated.
create table if not exists thread_summaries (
    id          uuid primary key,
    thread_id   uuid not null references threads (id) on delete cascade,
    first_turn  integer not null check (first_turn >= 0),
    last_turn   integer not null,
    content     text not null,
    token_count integer not null default 0 check (token_count >= 0),
    provider    text not null,
    model       text not null,
    created_at  timestamptz not null default now(),
    check (last_turn >= first_turn)
);

-- The newest summary of a thread.
create index if not exists thread_summaries_thread_idx
    on thread_summaries (thread_id, last_turn desc);

alter table thread_summaries enable row level security;

-- Calibrated token counts: upstream-reported prompt tokens over the characters / 4 estimate
-- of the same request, per thread, smoothed, for the model named (a turn on another model
-- starts it again). The last turn's estimate and reported count are kept to show them.
alter table threads add column if not exists token_ratio real
    check (token_ratio is null or token_ratio > 0);
alter table threads add column if not exists token_ratio_model text;
alter table threads add column if not exists prompt_tokens_estimated integer
    check (prompt_tokens_estimated is null or prompt_tokens_estimated >= 0);
alter table threads add column if not exists prompt_tokens_reported integer
    check (prompt_tokens_reported is null or prompt_tokens_reported >= 0);

-- What an upstream call was for, and whose thread it served: a summary is paid for like a
-- turn and must be attributable. Rows from before this migration were all chat turns.
-- No foreign key on thread_id: a new thread's usage row may be written before its thread row.
alter table token_usage add column if not exists purpose text not null default 'chat'
    check (purpose in ('chat', 'compaction'));
alter table token_usage add column if not exists owner_id uuid;
alter table token_usage add column if not exists thread_id uuid;

-- An owner's usage over time.
create index if not exists token_usage_owner_idx
    on token_usage (owner_id, created_at) where owner_id is not null;

-- Supabase only (as 20261124000700_supabase.sql): a signed-in user reads the summaries of
-- their own threads, and nothing else.
do $$
begin
    if to_regprocedure('auth.uid()') is not null
       and exists (select 1 from pg_roles where rolname = 'authenticated') then
        if not exists (select 1 from pg_policies
                        where schemaname = current_schema() and tablename = 'thread_summaries'
                          and policyname = 'thread_summaries_select_own') then
            execute format(
                'create policy thread_summaries_select_own on %I.thread_summaries for select '
                'to authenticated using (exists (select 1 from %I.threads t '
                'where t.id = thread_id and t.owner_id = (select auth.uid())))',
                current_schema(), current_schema());
        end if;
    end if;
end
$$;
