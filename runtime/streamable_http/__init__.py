"""MCP's Streamable HTTP transport on the MCP port, beside WebSocket.

* :mod:`~runtime.streamable_http.endpoint`: the requests of ``/mcp`` (POST, GET, DELETE),
  their checks and status codes, and the node's HTTP sessions (2025-era, and one sessionless
  session per client identity for 2026-07-28);
* :mod:`~runtime.streamable_http.headers`: the MCP headers, and the 2026-07-28 validation of
  those that mirror the body;
* :mod:`~runtime.streamable_http.session_transport`: an HTTP session's
  :class:`~runtime.connection.Connection` (one response stream per request in flight);
* :mod:`~runtime.streamable_http.stream_writer`: one response stream as JSON or SSE;
* :mod:`~runtime.streamable_http.refusal`: an HTTP error answer;
* :mod:`~runtime.streamable_http.wire`: HTTP/1.1 on one kept-alive connection, with h11;
* :mod:`~runtime.streamable_http.sse`: Server-Sent Events framing;
* :mod:`~runtime.streamable_http.origin`: the ``Origin`` check (DNS rebinding).
"""
