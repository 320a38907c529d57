-- exai_rate_take decides a refusal from an unlocked read (storage/shared_limits.py).
--
-- When a shared limit binds, most checks are refusals, and each one used to lock its rows
-- (a row lock is a write: WAL, and a commit that waits for its flush) to learn that nothing
-- could be taken. A refusal needs no lock: the read sees a committed state of each bucket, and
-- every later change but a refund only raises a bucket's level (a take adds its cost after
-- draining to the same clock), so a call that does not fit in that state does not fit now
-- either. A refund committed meanwhile can only make the answer stricter than needed (the
-- caller waits the returned seconds and asks again), never looser. An admission still locks
-- the rows in key order and decides again on the locked state, exactly as before, so the
-- cluster still admits at most capacity + rate x elapsed.
create or replace function exai_rate_take(
    p_keys text[], p_capacities double precision[], p_costs double precision[]
) returns table (at timestamptz, wait_seconds double precision, blocking_key text)
language plpgsql as $$
declare
    locked boolean;
    t timestamptz;
    r record;
    drained double precision;
    wait double precision;
begin
    -- The same decision twice at most: first on an unlocked read (a refusal there is final,
    -- above; a bucket not created yet is empty), then, only if the call fits, on the rows
    -- locked in key order, as the first version of this function decided every time.
    foreach locked in array array[false, true] loop
        if locked then
            insert into rate_buckets (key, level, updated_at)
                select k, 0, clock_timestamp() from unnest(p_keys) as k order by k
                on conflict (key) do nothing;
            perform 1 from rate_buckets where key = any(p_keys) order by key for update;
        end if;
        t := clock_timestamp();  -- after the locks: no later decision on these rows is earlier
        at := t;
        wait_seconds := 0;
        blocking_key := null;
        for r in
            select d.key, coalesce(b.level, 0) as level,
                   coalesce(b.updated_at, t) as updated_at, d.capacity, d.cost
            from unnest(p_keys, p_capacities, p_costs) as d (key, capacity, cost)
            left join rate_buckets b on b.key = d.key
        loop
            if r.cost > r.capacity then
                wait_seconds := null;  -- never fits
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
        if wait_seconds > 0 then
            return next;
            return;
        end if;
    end loop;
    update rate_buckets b
        set level = greatest(
                0,
                b.level - greatest(0, extract(epoch from t - b.updated_at)) * d.capacity / 60
            ) + d.cost,
            updated_at = greatest(b.updated_at, t)
        from unnest(p_keys, p_capacities, p_costs) as d (key, capacity, cost)
        where b.key = d.key;
    return next;
end
$$;
