-- Membership (storage/membership.py): any node sweeps the work of a node whose heartbeat
-- expired, while it runs, not only at start-up; and every node publishes a small snapshot of
-- itself with each heartbeat, for `exai status --cluster`.
--
-- swept_at / swept_by: when, and by which node, the dead node's unfinished tasks and active
-- sessions were marked interrupted (null: it stopped cleanly, or was never swept).
-- swept_tasks / swept_sessions: how many rows the sweep marked, summed over its passes (a
-- pass is bounded, so a huge dead node takes several).
-- snapshot: what the node said about itself with its last heartbeat (sessions, calls in
-- flight, health): JSON, see storage.membership.NodeSnapshot.
alter table nodes add column if not exists swept_at timestamptz;
alter table nodes add column if not exists swept_by text;
alter table nodes add column if not exists swept_tasks integer not null default 0;
alter table nodes add column if not exists swept_sessions integer not null default 0;
alter table nodes add column if not exists snapshot jsonb;

-- The sweep reads the unfinished tasks of one node through tasks_unfinished_idx (tasks.sql).
