// The TypeScript SDK (@modelcontextprotocol/sdk 1.32.x) WebSocketClientTransport against exai serve.
//
// Installed by `just setup-clients` into .venv-clients/node; driven by tests/test_real_clients.py:
//   NODE_PATH=.venv-clients/node/node_modules node [--experimental-websocket] ts_sdk_session.cjs URL
// CommonJS on purpose: `require` honours NODE_PATH, so the script can stay in tests/clients while
// its dependencies live in the gitignored env (ESM imports ignore NODE_PATH). Node 20 only has a
// global WebSocket, which the transport uses, behind --experimental-websocket.
//
// It initializes, lists tools, calls echo, calls exai_test_steps with onprogress, then cancels a
// blocked call the SDK's way (an AbortSignal, which makes the SDK send notifications/cancelled)
// once its heartbeat progress arrived, pings, prints one JSON line with what it saw, and exits.
//
// SDK bug (typescript-sdk#2580, open): progress handlers run a microtask late but responses are
// handled at once, so progress that shares a socket read with its response reaches onerror as
// "unknown token" instead of onprogress. The steps call's progress is sent just before its
// result, so it usually meets that race; the script reports both routes and the test accepts
// either. The heartbeats of the blocked call arrive alone and always reach onprogress.
"use strict";

const { Client } = require("@modelcontextprotocol/sdk/client/index.js");
const { WebSocketClientTransport } = require("@modelcontextprotocol/sdk/client/websocket.js");

// The client tells a transport the negotiated version (HTTP needs it for headers); keeping it is
// the only way to see which version was agreed.
class ObservedTransport extends WebSocketClientTransport {
  setProtocolVersion(version) {
    this.protocolVersion = version;
  }
}

async function main(url) {
  const transport = new ObservedTransport(new URL(url));
  const client = new Client({ name: "exai-ts-sdk-test", version: "0" }, { capabilities: {} });
  // The SDK reports what it cannot correlate through onerror: a response to a cancelled request
  // would land here as "Received a response for an unknown message ID".
  const errors = [];
  const lateProgress = [];
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

  await client.connect(transport);
  const tools = await client.listTools();
  const echoed = await client.callTool({ name: "echo", arguments: { text: "hello from the TS SDK" } });

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

  const report = {
    protocol_version: transport.protocolVersion ?? null,
    server_name: client.getServerVersion()?.name ?? null,
    tools: tools.tools.map((tool) => tool.name),
    echo_text: echoed.content.filter((c) => c.type === "text").map((c) => c.text),
    echo_structured: echoed.structuredContent ?? null,
    echo_is_error: echoed.isError ?? false,
    steps_text: stepped.content.filter((c) => c.type === "text").map((c) => c.text),
    steps_progress: progress,
    late_progress: lateProgress,
    heartbeats,
    blocked_outcome: blockedOutcome,
    echo_after_cancel: after.content.filter((c) => c.type === "text").map((c) => c.text),
    errors,
  };
  await client.close();
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

main(process.argv[2]).catch((error) => {
  process.stderr.write(`${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
