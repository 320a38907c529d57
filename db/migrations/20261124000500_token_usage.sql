-- Token usage: one row per upstream call, per provider and model, with its cost. Columns of
-- the design seed plus provider and estimated (counts we computed because the provider
-- reported none).

create table if not exists token_usage (
    id            uuid primary key default gen_random_uuid(),
    session_id    varchar references sessions (session_id) on delete cascade,
    task_id       uuid references tasks (id) on delete cascade,
    provider      text not null,
    model         varchar not null,
    input_tokens  integer not null default 0 check (input_tokens >= 0),
    output_tokens integer not null default 0 check (output_tokens >= 0),
    cost          decimal(10, 6),
    estimated     boolean not null default false,
    created_at    timestamptz not null default now()
);

-- Usage per session over time.
create index if not exists token_usage_session_idx on token_usage (session_id, created_at);

-- Usage per day (UTC), per provider and model. timezone('UTC', ...) makes the expression
-- immutable, which an index requires.
create index if not exists token_usage_day_idx
    on token_usage ((timezone('UTC', created_at)::date), provider, model);

-- FK lookups when a task is deleted.
create index if not exists token_usage_task_idx on token_usage (task_id) where task_id is not null;

alter table token_usage enable row level security;

-- What dashboards read. security_invoker (PostgreSQL 15+): the view applies the reader's
-- row level security instead of bypassing it as its owner.
create or replace view token_usage_daily with (security_invoker = true) as
select timezone('UTC', created_at)::date as day,
       provider,
       model,
       count(*)                            as calls,
       sum(input_tokens)::bigint           as input_tokens,
       sum(output_tokens)::bigint          as output_tokens,
       sum(cost)                           as cost,
       count(*) filter (where estimated)   as estimated_calls
  from token_usage
 group by 1, 2, 3;
