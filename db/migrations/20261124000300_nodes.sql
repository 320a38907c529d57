-- One row per server process ("node"). Several nodes may share one database (Supabase): a
-- node's heartbeat tells the others it is alive, so recovery never interrupts the work of a
-- live node. heartbeat_at is stamped with the database's clock, so node clocks may disagree.

create table if not exists nodes (
    node_id      text primary key,
    hostname     text not null,
    pid          integer not null,
    started_at   timestamptz not null default now(),
    heartbeat_at timestamptz not null default now(),
    stopped_at   timestamptz
);

-- Recovery looks for running nodes whose heartbeat expired.
create index if not exists nodes_running_idx on nodes (heartbeat_at) where stopped_at is null;

alter table nodes enable row level security;
