"""bench/httpgen.py's parsing, without a server or a clock: the SSE events a Streamable HTTP
answer may come in, and how the harness's URL becomes a request target and headers."""

from __future__ import annotations

from bench.httpgen import Endpoint, sse_response

RESPONSE = b'{"jsonrpc":"2.0","id":7,"result":{"content":[]}}'


def test_the_response_among_complete_events_is_found() -> None:
    stream = (
        b": keep-alive\n\n"
        b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n'
        b'data: {"jsonrpc":"2.0","id":6,"result":{}}\n\n'
        b"event: message\ndata: " + RESPONSE + b"\n\n"
    )
    assert sse_response(stream, 7) == {"jsonrpc": "2.0", "id": 7, "result": {"content": []}}


def test_crlf_line_ends_and_a_data_field_without_its_space() -> None:
    assert sse_response(b"event: message\r\ndata:" + RESPONSE + b"\r\n\r\n", 7) is not None


def test_data_lines_of_one_event_are_joined_with_a_newline() -> None:
    stream = b'data: {"jsonrpc":"2.0",\ndata: "id":7,"result":{}}\n\n'
    assert sse_response(stream, 7) == {"jsonrpc": "2.0", "id": 7, "result": {}}


def test_an_event_not_yet_ended_by_a_blank_line_is_not_read() -> None:
    assert sse_response(b"data: " + RESPONSE + b"\n", 7) is None
    assert sse_response(b"data: " + RESPONSE + b"\n\n", 8) is None


def test_a_token_in_the_url_becomes_a_bearer_header_and_leaves_the_target() -> None:
    endpoint = Endpoint.parse("http://127.0.0.1:8765/mcp?token=s3cret")
    assert (endpoint.host, endpoint.port, endpoint.target) == ("127.0.0.1", 8765, b"/mcp")
    headers = dict(endpoint.headers)
    assert headers[b"authorization"] == b"Bearer s3cret"
    assert headers[b"host"] == b"127.0.0.1:8765"
    assert headers[b"accept"] == b"application/json, text/event-stream"
    assert b"authorization" not in dict(Endpoint.parse("http://127.0.0.1:1/mcp").headers)
