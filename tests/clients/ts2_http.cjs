// The TypeScript SDK 2.x client (@modelcontextprotocol/client 2.4.x) StreamableHTTPClientTransport
// against exai serve's Streamable HTTP endpoint.
//
// Installed by `just setup-clients` into .venv-clients/node; driven by
// tests/test_streamable_http_clients.py:
//   NODE_PATH=.venv-clients/node/node_modules node ts2_http.cjs URL TOKEN
// CommonJS so that `require` honours NODE_PATH (the package ships a CommonJS build too).
//
// Two connections, one after the other, each with the bearer token in `requestInit.headers` and
// tests/clients/wire_log.cjs's recording `fetch`:
//
// * `legacy`, the 2.x Client's default (`versionNegotiation` absent): the 2025 `initialize`
//   handshake. Lists tools, calls echo, sets the log level, calls exai_test_steps with
//   onprogress, cancels a blocked call with an AbortSignal once its heartbeat arrived, calls echo
//   again, pings, terminates the session (DELETE).
// * `auto` (`versionNegotiation: {mode: 'auto'}`): `server/discover` first, `initialize` only as
//   the fallback. The same calls, the cancel included, without ping and setLevel (2026-07-28
//   removed both) and without DELETE (no session to end).
//
// Prints one JSON line: per connection, the era and version negotiated, how long connecting took,
// the results, and every HTTP exchange.
"use strict";

const { Client, StreamableHTTPClientTransport } = require("@modelcontextprotocol/client");
const { recordingFetch } = require("./wire_log.cjs");

const LATE = "Received a progress notification for an unknown token: ";

async function scenario(url, token, mode) {
  const wire = [];
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
    fetch: recordingFetch(wire),
  });
  const options = { capabilities: {} };
  if (mode !== "legacy") options.versionNegotiation = { mode };
  const client = new Client({ name: `exai-ts2-http-${mode}`, version: "0" }, options);
  const errors = [];
  const lateProgress = [];
  const logs = [];
  client.onerror = (error) => {
    const text = String(error && error.message ? error.message : error);
    if (text.startsWith(LATE)) {
      const note = JSON.parse(text.slice(LATE.length)).params;
      lateProgress.push([note.progressToken, note.progress, note.total ?? null, note.message ?? null]);
    } else {
      errors.push(text);
    }
  };
  client.setNotificationHandler("notifications/message", (note) => {
    logs.push(note.params.data);
  });

  const started = performance.now();
  await client.connect(transport);
  const connectSeconds = (performance.now() - started) / 1000;
  const era = client.getProtocolEra() ?? null;
  const sessionId = transport.sessionId ?? null;
  const tools = await client.listTools();
  const echoed = await client.callTool({ name: "echo", arguments: { text: `hello from TS 2.x (${mode})` } });
  if (era === "legacy") await client.setLoggingLevel("info");

  const progress = [];
  const stepped = await client.callTool(
    { name: "exai_test_steps", arguments: { steps: 3 } },
    { onprogress: (p) => progress.push([p.progress, p.total ?? null, p.message ?? null]) },
  );

  // Cancel only once a heartbeat proves the server is running the call.
  const abort = new AbortController();
  const heartbeats = [];
  let heartbeat;
  const running = new Promise((resolve) => {
    heartbeat = resolve;
  });
  const blocked = client
    .callTool(
      { name: "exai_test_block", arguments: {} },
      {
        signal: abort.signal,
        onprogress: (p) => {
          heartbeats.push([p.progress, p.message ?? null]);
          heartbeat();
        },
      },
    )
    .then(
      () => "answered",
      (error) => `rejected: ${error && error.message ? error.message : error}`,
    );
  await running;
  abort.abort("test: cancelled by the client");
  const blockedOutcome = await blocked;

  const after = await client.callTool({ name: "echo", arguments: { text: "after the cancel" } });
  if (era === "legacy") await client.ping();
  const report = {
    connect_seconds: connectSeconds,
    era,
    protocol_version: client.getNegotiatedProtocolVersion() ?? null,
    session_id: sessionId,
    // The server names the session serving a modern client in the discover result's _meta.
    meta_session_id: client.getDiscoverResult()?._meta?.["exai/sessionId"] ?? null,
    server_name: client.getServerVersion()?.name ?? null,
    tools: tools.tools.map((tool) => tool.name),
    echo_text: echoed.content.filter((c) => c.type === "text").map((c) => c.text),
    echo_structured: echoed.structuredContent ?? null,
    steps_text: stepped.content.filter((c) => c.type === "text").map((c) => c.text),
    steps_progress: progress,
    late_progress: lateProgress,
    heartbeats,
    blocked_outcome: blockedOutcome,
    echo_after_cancel: after.content.filter((c) => c.type === "text").map((c) => c.text),
  };
  if (sessionId !== null) await transport.terminateSession();
  report.session_id_after_terminate = transport.sessionId ?? null;
  await client.close();
  // After the close: what the cancel and the close left behind is in these too.
  report.logs = logs;
  report.errors = errors;
  report.wire = wire;
  return report;
}

async function main(url, token) {
  const report = {};
  for (const mode of ["legacy", "auto"]) report[mode] = await scenario(url, token, mode);
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

main(process.argv[2], process.argv[3]).catch((error) => {
  process.stderr.write(`${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
