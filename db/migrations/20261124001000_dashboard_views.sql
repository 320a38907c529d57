-- The performance dashboard: read-only views over sessions, tasks and token_usage, readable
-- as they are from Supabase's table editor or any SQL client (docs/operations.md).
--
-- Runs unchanged on plain PostgreSQL 15-18 and on Supabase, and twice without harm (create or
-- replace). security_invoker (PostgreSQL 15+): a view applies the row level security of the
-- role reading it instead of its owner's, so exposing a view never exposes more than its tables.
-- Days are UTC days. Latencies are in milliseconds; costs in USD, as token_usage.cost.

-- Usage and cost per session: one row per session that ever existed.
create or replace view dashboard_session_usage with (security_invoker = true) as
select s.session_id,
       s.status,
       s.client_name,
       s.client_version,
       s.protocol_version,
       s.node_id,
       s.created_at,
       s.last_activity,
       s.closed_at,
       coalesce(t.tasks, 0)                       as tasks,
       coalesce(t.failed, 0)                      as tasks_failed,
       coalesce(u.upstream_calls, 0)              as upstream_calls,
       coalesce(u.input_tokens, 0)                as input_tokens,
       coalesce(u.output_tokens, 0)               as output_tokens,
       coalesce(u.cost, 0)                        as cost,
       coalesce(u.estimated_calls, 0)             as estimated_calls
  from sessions s
  left join (select session_id,
                    count(*)                                    as tasks,
                    count(*) filter (where status = 'failed')   as failed
               from tasks
              group by session_id) t using (session_id)
  left join (select session_id,
                    count(*)                                    as upstream_calls,
                    sum(input_tokens)::bigint                   as input_tokens,
                    sum(output_tokens)::bigint                  as output_tokens,
                    sum(cost)                                   as cost,
                    count(*) filter (where estimated)           as estimated_calls
               from token_usage
              group by session_id) u using (session_id);

-- Usage and cost per day: sessions opened, tasks run, upstream calls, tokens and cost.
create or replace view dashboard_daily_usage with (security_invoker = true) as
with opened as (
    select timezone('UTC', created_at)::date as day, count(*) as sessions_opened
      from sessions
     group by 1
), work as (
    select timezone('UTC', created_at)::date as day,
           count(*)                                   as tasks,
           count(*) filter (where status = 'failed')  as tasks_failed
      from tasks
     group by 1
), usage as (
    select timezone('UTC', created_at)::date as day,
           count(distinct session_id)                 as sessions_with_usage,
           count(*)                                   as upstream_calls,
           sum(input_tokens)::bigint                  as input_tokens,
           sum(output_tokens)::bigint                 as output_tokens,
           sum(cost)                                  as cost
      from token_usage
     group by 1
)
select day,
       coalesce(o.sessions_opened, 0)       as sessions_opened,
       coalesce(w.tasks, 0)                 as tasks,
       coalesce(w.tasks_failed, 0)          as tasks_failed,
       coalesce(u.sessions_with_usage, 0)   as sessions_with_usage,
       coalesce(u.upstream_calls, 0)        as upstream_calls,
       coalesce(u.input_tokens, 0)          as input_tokens,
       coalesce(u.output_tokens, 0)         as output_tokens,
       coalesce(u.cost, 0)                  as cost
  from opened o
  full join work w using (day)
  full join usage u using (day);

-- Latency and errors per tool, over every finished task. Latency is run time (started to
-- completed; for a task that never started, created to completed) of the tasks that completed
-- or failed: a cancelled task's end is the client's choice, and an interrupted one's is when
-- recovery found its node dead, so neither says how long the tool takes. Wait is the time
-- from arrival to start. error_rate counts failed and interrupted against every finished task
-- except those the client cancelled, which say nothing about the tool.
create or replace view dashboard_tool_stats with (security_invoker = true) as
with finished as (
    select coalesce(tool_name, '(unknown)') as tool_name,
           status,
           case when status in ('completed', 'failed') then
               extract(epoch from (completed_at - coalesce(started_at, created_at))) * 1000
           end as latency_ms,
           extract(epoch from (started_at - created_at)) * 1000 as wait_ms
      from tasks
     where status in ('completed', 'failed', 'cancelled', 'interrupted')
)
select tool_name,
       count(*)                                            as tasks,
       count(*) filter (where status = 'completed')        as completed,
       count(*) filter (where status = 'failed')           as failed,
       count(*) filter (where status = 'cancelled')        as cancelled,
       count(*) filter (where status = 'interrupted')      as interrupted,
       round((count(*) filter (where status in ('failed', 'interrupted')))::numeric
             / nullif(count(*) filter (where status <> 'cancelled'), 0), 4) as error_rate,
       round((percentile_cont(0.50) within group (order by latency_ms))::numeric, 3) as p50_ms,
       round((percentile_cont(0.90) within group (order by latency_ms))::numeric, 3) as p90_ms,
       round((percentile_cont(0.95) within group (order by latency_ms))::numeric, 3) as p95_ms,
       round((percentile_cont(0.99) within group (order by latency_ms))::numeric, 3) as p99_ms,
       round(max(latency_ms)::numeric, 3)                  as max_ms,
       round((percentile_cont(0.50) within group (order by wait_ms))::numeric, 3)
           as wait_p50_ms,
       round((percentile_cont(0.95) within group (order by wait_ms))::numeric, 3)
           as wait_p95_ms
  from finished
 group by tool_name;

-- The same per UTC day (of the task's arrival), for trends.
create or replace view dashboard_tool_stats_daily with (security_invoker = true) as
with finished as (
    select timezone('UTC', created_at)::date as day,
           coalesce(tool_name, '(unknown)') as tool_name,
           status,
           case when status in ('completed', 'failed') then
               extract(epoch from (completed_at - coalesce(started_at, created_at))) * 1000
           end as latency_ms
      from tasks
     where status in ('completed', 'failed', 'cancelled', 'interrupted')
)
select day,
       tool_name,
       count(*)                                            as tasks,
       count(*) filter (where status = 'failed')           as failed,
       count(*) filter (where status = 'interrupted')      as interrupted,
       round((count(*) filter (where status in ('failed', 'interrupted')))::numeric
             / nullif(count(*) filter (where status <> 'cancelled'), 0), 4) as error_rate,
       round((percentile_cont(0.50) within group (order by latency_ms))::numeric, 3) as p50_ms,
       round((percentile_cont(0.95) within group (order by latency_ms))::numeric, 3) as p95_ms,
       round((percentile_cont(0.99) within group (order by latency_ms))::numeric, 3) as p99_ms
  from finished
 group by day, tool_name;

-- Sessions open right now, with what they are doing and what they have cost so far. Lateral
-- joins: a handful of active sessions each read their own rows through the session_id indexes
-- instead of aggregating the whole history.
create or replace view dashboard_active_sessions with (security_invoker = true) as
select s.session_id,
       s.client_name,
       s.client_version,
       s.protocol_version,
       s.remote_addr,
       s.node_id,
       s.created_at,
       s.last_activity,
       extract(epoch from (now() - s.created_at))::bigint    as age_s,
       extract(epoch from (now() - s.last_activity))::bigint as idle_s,
       t.pending                                             as tasks_pending,
       t.running                                             as tasks_running,
       t.tasks,
       coalesce(u.input_tokens, 0)                           as input_tokens,
       coalesce(u.output_tokens, 0)                          as output_tokens,
       coalesce(u.cost, 0)                                   as cost
  from sessions s
  cross join lateral (select count(*) filter (where status = 'pending') as pending,
                             count(*) filter (where status = 'running') as running,
                             count(*)                                   as tasks
                        from tasks
                       where tasks.session_id = s.session_id) t
  cross join lateral (select sum(input_tokens)::bigint  as input_tokens,
                             sum(output_tokens)::bigint as output_tokens,
                             sum(cost)                  as cost
                        from token_usage
                       where token_usage.session_id = s.session_id) u
 where s.status = 'active';
