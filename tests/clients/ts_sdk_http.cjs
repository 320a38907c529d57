// The TypeScript SDK (@modelcontextprotocol/sdk 1.32.x) StreamableHTTPClientTransport against
// exai serve's Streamable HTTP endpoint (2025-era sessions).
//
// Installed by `just setup-clients` into .venv-clients/node; driven by
// tests/test_streamable_http_clients.py:
//   NODE_PATH=.venv-clients/node/node_modules node ts_sdk_http.cjs URL TOKEN
// CommonJS so that `require` honours NODE_PATH (as ts_sdk_session.cjs, the WebSocket one).
//
// The bearer token goes in `requestInit.headers` (the SDK's way to add headers to every
// request); the transport's `fetch` is tests/clients/wire_log.cjs's, which records each
// exchange. It initializes, lists tools, calls echo, sets the log level, calls exai_test_steps
// with onprogress, cancels a blocked call the SDK's way (an AbortSignal: the SDK sends
// notifications/cancelled) once its heartbeat progress arrived, calls echo again, pings,
// terminates the session (DELETE), closes, and prints one JSON line.
//
// SDK bug (typescript-sdk#2580, open): progress handlers run a microtask late but responses are
// handled at once, so progress that arrives in the same read as its response reaches onerror as
// "unknown token" instead of onprogress; the script reports both routes, as the WebSocket one.
"use strict";

const { Client } = require("@modelcontextprotocol/sdk/client/index.js");
const { StreamableHTTPClientTransport } = require("@modelcontextprotocol/sdk/client/streamableHttp.js");
const { LoggingMessageNotificationSchema } = require("@modelcontextprotocol/sdk/types.js");
const { recordingFetch } = require("./wire_log.cjs");

async function main(url, token) {
  const wire = [];
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
    fetch: recordingFetch(wire),
  });
  const client = new Client({ name: "exai-ts-sdk-http-test", version: "0" }, { capabilities: {} });
  const errors = [];
  const lateProgress = [];
  const logs = [];
  const LATE = "Received a progress notification for an unknown token: ";
  client.onerror = (error) => {
    const text = String(error && error.message ? error.message : error);
    if (text.startsWith(LATE)) {
      const note = JSON.parse(text.slice(LATE.length)).params;
      lateProgress.push([note.progressToken, note.progress, note.total ?? null, note.message ?? null]);
    } else {
      errors.push(text);
    }
  };
  client.setNotificationHandler(LoggingMessageNotificationSchema, (note) => {
    logs.push(note.params.data);
  });

  await client.connect(transport);
  const sessionId = transport.sessionId ?? null;
  const tools = await client.listTools();
  const echoed = await client.callTool({ name: "echo", arguments: { text: "hello from the TS SDK over HTTP" } });
  await client.setLoggingLevel("info");

  const progress = [];
  const stepped = await client.callTool(
    { name: "exai_test_steps", arguments: { steps: 3 } },
    undefined,
    { onprogress: (p) => progress.push([p.progress, p.total ?? null, p.message ?? null]) },
  );

  // Cancel only once a heartbeat proves the server is running the call, so the cancel cannot
  // overtake the request.
  const abort = new AbortController();
  const heartbeats = [];
  let heartbeat;
  const running = new Promise((resolve) => {
    heartbeat = resolve;
  });
  const blocked = client
    .callTool({ name: "exai_test_block", arguments: {} }, undefined, {
      signal: abort.signal,
      onprogress: (p) => {
        heartbeats.push([p.progress, p.message ?? null]);
        heartbeat();
      },
    })
    .then(
      () => "answered",
      (error) => `rejected: ${error && error.message ? error.message : error}`,
    );
  await running;
  abort.abort("test: cancelled by the client");
  const blockedOutcome = await blocked;

  const after = await client.callTool({ name: "echo", arguments: { text: "after the cancel" } });
  await client.ping();
  const protocolVersion = transport.protocolVersion ?? null;
  await transport.terminateSession();
  const sessionAfterTerminate = transport.sessionId ?? null;
  await client.close();

  const report = {
    protocol_version: protocolVersion,
    session_id: sessionId,
    session_id_after_terminate: sessionAfterTerminate,
    server_name: client.getServerVersion()?.name ?? null,
    tools: tools.tools.map((tool) => tool.name),
    echo_text: echoed.content.filter((c) => c.type === "text").map((c) => c.text),
    echo_structured: echoed.structuredContent ?? null,
    echo_is_error: echoed.isError ?? false,
    steps_text: stepped.content.filter((c) => c.type === "text").map((c) => c.text),
    steps_progress: progress,
    late_progress: lateProgress,
    logs,
    heartbeats,
    blocked_outcome: blockedOutcome,
    echo_after_cancel: after.content.filter((c) => c.type === "text").map((c) => c.text),
    errors,
    wire,
  };
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

main(process.argv[2], process.argv[3]).catch((error) => {
  process.stderr.write(`${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
