// What a TypeScript HTTP client put on the wire: a fetch that records every exchange.
//
// Shared by the TypeScript Streamable HTTP client scripts in this folder; passed as the
// transports' `fetch` option (both SDK lines take one). Each exchange becomes one object of the
// script's JSON report, the same shape as tests/clients/wire_log.py's, so the test can assert
// what the client sent (method, the JSON-RPC method of a POST, the MCP headers) and what it got
// (status, content type, the session id minted).
"use strict";

// [the JSON-RPC method of a POST body ("response" for a client's response), its params._meta]
function rpcOf(body) {
  if (typeof body !== "string") return [null, {}];
  try {
    const message = JSON.parse(body);
    if (message === null || typeof message !== "object" || Array.isArray(message)) return [null, {}];
    const meta = message.params && typeof message.params._meta === "object" ? message.params._meta : {};
    if (typeof message.method === "string") return [message.method, meta ?? {}];
    return ["id" in message ? "response" : null, meta ?? {}];
  } catch {
    return [null, {}];
  }
}

function recordingFetch(exchanges) {
  return async (url, init = {}) => {
    const headers = new Headers(init.headers);
    const method = (init.method ?? "GET").toUpperCase();
    const [rpc, meta] = method === "POST" ? rpcOf(init.body) : [null, {}];
    const entry = {
      method,
      rpc,
      log_level_meta: meta["io.modelcontextprotocol/logLevel"] ?? null,
      session_id: headers.get("mcp-session-id"),
      protocol_version: headers.get("mcp-protocol-version"),
      accept: headers.get("accept"),
      bearer: (headers.get("authorization") ?? "").startsWith("Bearer "),
      status: null,
      content_type: null,
      minted_session_id: null,
    };
    exchanges.push(entry);
    const response = await fetch(url, init);
    entry.status = response.status;
    entry.content_type = (response.headers.get("content-type") ?? "").split(";")[0];
    entry.minted_session_id = response.headers.get("mcp-session-id");
    return response;
  };
}

module.exports = { recordingFetch };
