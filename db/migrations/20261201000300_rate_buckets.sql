-- Limits that hold across every node sharing this database (storage/shared_limits.py).
--
-- rate_buckets: one GCRA bucket per limit key ('provider:glm:requests', 'provider:glm:tokens',
-- 'client:alice:requests'), kept as its level (units taken and not yet drained) at
-- updated_at. The level drains at capacity / 60 units a second; capacity is not stored: each
-- call passes the one its node is configured with, so a configuration change applies at once.
-- updated_at is the database's clock (clock_timestamp(), read after the row locks are held),
-- so node clocks may disagree.
create table if not exists rate_buckets (
    key        text primary key,
    level      double precision not null default 0 check (level >= 0),
    updated_at timestamptz not null default clock_timestamp()
);

alter table rate_buckets enable row level security;

-- Take p_costs[i] units from bucket p_keys[i] (of capacity p_capacities[i] per minute) for
-- every i, all or none, in one statement: one round trip per admission. Returns the database
-- time of the decision and the seconds to wait (0: taken; > 0: nothing taken, retry then;
-- null: a cost larger than its capacity, which never fits) and the key that waits longest.
-- Rows are locked in key order, so two calls over overlapping keys never deadlock.
create or replace function exai_rate_take(
    p_keys text[], p_capacities double precision[], p_costs double precision[]
) returns table (at timestamptz, wait_seconds double precision, blocking_key text)
language plpgsql as $$
declare
    t timestamptz;
    r record;
    drained double precision;
    wait double precision;
begin
    insert into rate_buckets (key, level, updated_at)
        select k, 0, clock_timestamp() from unnest(p_keys) as k order by k
        on conflict (key) do nothing;
    perform 1 from rate_buckets where key = any(p_keys) order by key for update;
    t := clock_timestamp();  -- after the locks: no later decision on these rows is earlier
    at := t;
    wait_seconds := 0;
    blocking_key := null;
    for r in
        select b.key, b.level, b.updated_at, d.capacity, d.cost
        from rate_buckets b
        join unnest(p_keys, p_capacities, p_costs) as d (key, capacity, cost) on d.key = b.key
    loop
        if r.cost > r.capacity then
            wait_seconds := null;
            blocking_key := r.key;
            return next;
            return;
        end if;
        drained := greatest(
            0, r.level - greatest(0, extract(epoch from t - r.updated_at)) * r.capacity / 60
        );
        wait := (drained + r.cost - r.capacity) / (r.capacity / 60);
        if wait > wait_seconds then
            wait_seconds := wait;
            blocking_key := r.key;
        end if;
    end loop;
    if wait_seconds = 0 then
        update rate_buckets b
            set level = greatest(
                    0,
                    b.level - greatest(0, extract(epoch from t - b.updated_at)) * d.capacity / 60
                ) + d.cost,
                updated_at = greatest(b.updated_at, t)
            from unnest(p_keys, p_capacities, p_costs) as d (key, capacity, cost)
            where b.key = d.key;
    end if;
    return next;
end
$$;

-- Add p_deltas[i] to bucket p_keys[i] (drained first; a negative delta refunds), unchecked:
-- a refund of unused tokens, a withdrawn call, or a call that used more than it reserved.
create or replace function exai_rate_adjust(
    p_keys text[], p_capacities double precision[], p_deltas double precision[]
) returns void
language plpgsql as $$
declare
    t timestamptz;
begin
    perform 1 from rate_buckets where key = any(p_keys) order by key for update;
    t := clock_timestamp();
    update rate_buckets b
        set level = greatest(
                0,
                b.level - greatest(0, extract(epoch from t - b.updated_at)) * d.capacity / 60
                    + d.delta
            ),
            updated_at = greatest(b.updated_at, t)
        from unnest(p_keys, p_capacities, p_deltas) as d (key, capacity, delta)
        where b.key = d.key;
end
$$;

-- Durable quotas ([clients.<name>.quota]): what each client identity used per UTC day and
-- per UTC month, every node's calls together. A call is counted as its worst case when it is
-- admitted and corrected when it is settled, so a node that dies with calls in flight leaves
-- them counted in full (never less than was used).
create table if not exists client_quota_usage (
    identity     text not null,
    period       text not null check (period in ('day', 'month')),
    period_start date not null,
    requests     bigint not null default 0,
    tokens       bigint not null default 0,
    cost_usd     double precision not null default 0,
    updated_at   timestamptz not null default now(),
    primary key (identity, period, period_start)
);

alter table client_quota_usage enable row level security;
