-- Sessions resumed on any node (docs/architecture.md, "Sessions that survive a dropped socket";
-- storage/session_handover.py). A WebSocket session parked on one node, or left attached on a
-- node that died, is claimed by the node its client reconnects to, with one conditional
-- update of its row.
--
-- identity: the client identity that owns the session; only that identity may resume it
--   (null for rows written before this migration: never resumed elsewhere).
-- epoch: bumped by every claim; the node that holds the session writes its park and its end
--   only while the epoch is the one it claimed (a stale copy's writes change nothing).
-- parked_until: set while the session is parked (its socket dropped) on node_id, to the end
--   of its resume grace (database clock); null while attached.
-- log_level: the client's logging/setLevel, part of the negotiated state a resume restores.
-- transport: websocket, http (a 2025-era Mcp-Session-Id session), http-sessionless or memory:
--   a WebSocket session is resumed by a WebSocket handshake, an HTTP one by an HTTP request.
-- Every statement is idempotent.
alter table sessions add column if not exists identity     text;
alter table sessions add column if not exists epoch        integer not null default 0;
alter table sessions add column if not exists parked_until timestamptz;
alter table sessions add column if not exists log_level    text;
alter table sessions add column if not exists transport    text
    check (transport in ('websocket', 'http', 'http-sessionless', 'memory'));
