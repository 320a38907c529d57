"""Fuzzing the wire: thousands of generated frames, each held to the answer the spec demands.

Hypothesis generates frames by family (valid requests, unknown methods, bad params, a second
``initialize``, versions we do not speak, notifications and client responses, valid JSON that
is not JSON-RPC, by-position params, text that is not JSON, deep nesting; ids and payloads huge,
unicode or both) and, with each frame, what must come back: a result for the request's id, an
error with an allowed code and the id (``null`` when it cannot be read, or when it is longer
than 256 bytes: ids are echoed exactly, so a request with a longer one is refused with -32600),
or nothing at all.
After every frame the same session must answer ``ping``; at the end, a bystander session that
was open all along must too, and the server log must show no crash or restart.

Frames that must close the connection (oversized ones; binary ones, per SEP-1288) each get a
fresh session, and after each close both a new session and the bystander must answer.

One session serves every example: Hypothesis runs in a worker thread and hands each example to
the trio loop with ``trio.from_thread.run``. (pytest-trio runs each ``@given`` example in a new
``trio.run``, where no connection could outlive an example.) Examples are derandomized, so every
run sends the same frames and a CI failure reproduces locally. Nothing waits on a clock: every
step waits for a frame or a close, and the only deadlines bound a failure.

The tests at the end pin defects this fuzzing found in the server (all fixed since); each
names the behaviour it guards.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from tests.harness import RawClient, ServerProcess, open_raw, start_server

#: A small message limit keeps the oversized cases cheap (the default is 4 MiB).
LIMIT = 64 * 1024
HANDSHAKE_VERSION = "2025-06-18"
MODERN_VERSION = "2026-07-28"
VERSION_META = "io.modelcontextprotocol/protocolVersion"
TOOLS = ("echo", "exai_test_block", "exai_test_steps")
KNOWN_METHODS = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "logging/setLevel",
        "server/discover",
        "$/exai/test/crash",
    }
)
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
#: Nesting any JSON parser must take; deeper, a server may refuse to parse (-32700).
SURELY_PARSED_DEPTH = 64
#: Log events that mean a session or the server failed, whatever the client saw (besides
#: anything logged at error level or above).
FAILURE_EVENTS = frozenset(
    {"session.crashed", "session.actor_restarted", "tool.failed", "handshake.failed"}
)
FAILURE_LEVELS = frozenset({"error", "critical", "exception"})
#: Prefix of the liveness pings' ids; generated ids never start with it.
ALIVE = "\ufdd0alive-"
#: Bounds a wait that a broken server would make endless; it never paces a passing run.
FAILURE_BOUND_S = 30
#: A request id longer than this (UTF-8 bytes of a string, digits of a number) is refused:
#: -32600 with id null (issue 11).
ID_BYTES = 256

RequestId = str | int
Json = Any

FUZZ = settings(
    deadline=None,  # a loaded machine is slow, not wrong: no timing is asserted
    database=None,  # nothing is written into the working tree
    derandomize=True,  # the same examples every run, so a CI failure reproduces
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)


@pytest.fixture(scope="module")
def fuzz_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    handle = start_server(
        tmp_path_factory.mktemp("state"),
        database_url=database_url,
        extra_env={"EXAI_MAX_MESSAGE_BYTES": str(LIMIT)},
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


# -- what a frame must get back ----------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """The one response a frame must get (or, if ``silent``, none).

    A response is right if it carries ``id`` and is either a result that ``result`` accepts or
    an error with a code in ``errors`` (whose ``data`` ``error_data`` accepts, if given), or if
    it carries ``null`` and an error code in ``unparsed`` (a frame the server may not parse).
    """

    id: RequestId | None = None
    result: Callable[[Json], bool] | None = None
    errors: frozenset[int] = frozenset()
    error_data: Callable[[Json], bool] | None = None
    unparsed: frozenset[int] = frozenset()
    silent: bool = False
    #: Progress notifications may come for this token (a tools/call that asked for them).
    progress_token: RequestId | None = None


@dataclass(frozen=True)
class Case:
    family: str
    kind: str
    frame: str
    expected: Expected


SILENCE = Expected(silent=True)


def echoable(request_id: RequestId) -> bool:
    text = request_id if isinstance(request_id, str) else str(request_id)
    return len(text.encode("utf-8", "surrogatepass")) <= ID_BYTES


#: What a request whose id is too long to echo gets, whatever else it holds.
ID_TOO_LONG = Expected(id=None, errors=frozenset({-32600}))


def answer(
    request_id: RequestId, check: Callable[[Json], bool], token: RequestId | None = None
) -> Expected:
    if not echoable(request_id):
        return ID_TOO_LONG
    return Expected(id=request_id, result=check, progress_token=token)


def refusal(request_id: RequestId | None, *codes: int) -> Expected:
    if request_id is not None and not echoable(request_id):
        return ID_TOO_LONG
    return Expected(id=request_id, errors=frozenset(codes))


def encode(message: Json, style: tuple[bool, int | None]) -> str:
    ensure_ascii, indent = style
    return json.dumps(message, ensure_ascii=ensure_ascii, indent=indent, allow_nan=False)


def is_strict_json(text: str) -> bool:
    """RFC 8259 JSON: Python's parser without its NaN/Infinity extension."""

    def no_constants(name: str) -> None:
        raise ValueError(name)

    try:
        json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError):
        return False
    return True


def same_id(received: Json, expected: RequestId | None) -> bool:
    # type() too: in Python True == 1, and an id 1 must not come back as true (or 1.0).
    return type(received) is type(expected) and received == expected


def readable_id(message: Json) -> RequestId | None:
    """The id a -32600 must carry: the message's, when it is a valid request id."""
    if not isinstance(message, dict):
        return None
    rid = message.get("id")
    if isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool)):
        return rid if echoable(rid) else None
    return None


def request(request_id: RequestId, method: str, params: Json = None) -> dict[str, Json]:
    message: dict[str, Json] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def echoed(text: str) -> Callable[[Json], bool]:
    return lambda result: bool(
        result
        == {
            "content": [{"type": "text", "text": text}],
            "structuredContent": {"text": text},
            "isError": False,
        }
    )


def stepped(steps: int) -> Callable[[Json], bool]:
    return lambda result: bool(result["content"] == [{"type": "text", "text": f"{steps} steps"}])


def lists_echo(result: Json) -> bool:
    return "echo" in [tool["name"] for tool in result["tools"]]


def is_empty(result: Json) -> bool:
    return bool(result == {})


def discovers(result: Json) -> bool:
    return {HANDSHAKE_VERSION, MODERN_VERSION} <= set(result["supportedVersions"])


def names_modern(data: Json) -> bool:
    return isinstance(data, dict) and MODERN_VERSION in data.get("supported", [])


# -- strategies --------------------------------------------------------------------------------

styles = st.tuples(st.booleans(), st.sampled_from([None, 0, 2]))
request_ids: st.SearchStrategy[RequestId] = st.one_of(
    st.integers(min_value=-(2**31), max_value=2**31),
    # Huge ids: past int64 and past what a double holds exactly; they must come back intact.
    st.integers(min_value=-(10**60), max_value=10**60),
    st.text(max_size=30),
    st.text(min_size=200, max_size=1000),
).filter(lambda rid: not (isinstance(rid, str) and rid.startswith(ALIVE)))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
#: Any JSON value but an object or null.
non_objects = st.one_of(scalars.filter(lambda v: v is not None), st.lists(json_values, max_size=3))
non_strings = non_objects.filter(lambda v: not isinstance(v, str))
fractions = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
#: Not a request id: null, a boolean, a fraction, an array or an object.
bad_ids = st.one_of(
    st.none(),
    st.booleans(),
    fractions,
    st.lists(scalars, max_size=2),
    st.dictionaries(st.text(max_size=4), scalars, min_size=1, max_size=2),
)


@st.composite
def valid_requests(draw: st.DrawFn) -> Case:
    """Requests the session must answer with a result."""
    rid = draw(request_ids)
    choice = draw(st.sampled_from(["ping", "tools/list", "echo", "steps", "setLevel", "discover"]))
    token: RequestId | None = None
    check: Callable[[Json], bool]
    if choice == "ping":
        message = request(rid, "ping", draw(st.none() | json_objects))
        check = is_empty
    elif choice == "tools/list":
        message = request(rid, "tools/list", draw(st.sampled_from([None, {}])))
        check = lists_echo
    elif choice in ("echo", "steps"):
        if choice == "echo":
            text = draw(st.text(max_size=200))
            params: dict[str, Json] = {"name": "echo", "arguments": {"text": text}}
            check = echoed(text)
        else:
            steps = draw(st.integers(min_value=0, max_value=3))
            params = {"name": "exai_test_steps", "arguments": {"steps": steps}}
            check = stepped(steps)
        token = draw(st.none() | request_ids)
        if token is not None:
            params["_meta"] = {"progressToken": token}
        message = request(rid, "tools/call", params)
    elif choice == "setLevel":
        message = request(rid, "logging/setLevel", {"level": draw(st.sampled_from(LOG_LEVELS))})
        check = is_empty
    else:
        message = request(rid, "server/discover", draw(st.sampled_from([None, {}])))
        check = discovers
    return Case("valid", choice, encode(message, draw(styles)), answer(rid, check, token))


@st.composite
def unknown_methods(draw: st.DrawFn) -> Case:
    rid = draw(request_ids)
    method = draw(st.text(min_size=1, max_size=40).filter(lambda m: m not in KNOWN_METHODS))
    message = request(rid, method, draw(st.none() | json_objects))
    return Case("unknown method", method, encode(message, draw(styles)), refusal(rid, -32601))


def _call(**fields: st.SearchStrategy[Json]) -> st.SearchStrategy[tuple[str, Json]]:
    return st.tuples(st.just("tools/call"), st.fixed_dictionaries(fields))


@st.composite
def invalid_params(draw: st.DrawFn) -> Case:
    """Known methods with params of the wrong shape: -32602."""
    rid = draw(request_ids)
    echo = st.just("echo")
    method, params = draw(
        st.one_of(
            st.just(("tools/call", {})),
            _call(name=non_strings),
            _call(name=st.text(max_size=20).filter(lambda n: n not in TOOLS)),
            _call(name=echo, arguments=non_objects),
            _call(name=echo, arguments=st.just({})),
            _call(name=echo, arguments=st.fixed_dictionaries({"text": non_strings})),
            _call(
                name=echo,
                arguments=st.just({"text": "x"}),
                _meta=non_objects
                | st.fixed_dictionaries(
                    {"progressToken": fractions | st.lists(scalars, max_size=2)}
                ),
            ),
            st.tuples(st.just("tools/list"), st.fixed_dictionaries({"cursor": non_strings})),
            # Opaque cursors: one we did not issue is refused, whatever it looks like.
            st.tuples(
                st.just("tools/list"), st.fixed_dictionaries({"cursor": st.text(max_size=30)})
            ),
            st.just(("logging/setLevel", {})),
            st.tuples(
                st.just("logging/setLevel"),
                st.fixed_dictionaries({"level": json_values.filter(lambda v: v not in LOG_LEVELS)}),
            ),
        )
    )
    frame = encode(request(rid, method, params), draw(styles))
    return Case("invalid params", method, frame, refusal(rid, -32602))


@st.composite
def repeated_initialize(draw: st.DrawFn) -> Case:
    """The session is initialized: another initialize is refused (-32602 if its params are bad
    as well)."""
    rid = draw(request_ids)
    params = draw(
        json_objects
        | st.just(
            {
                "protocolVersion": HANDSHAKE_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "again", "version": "1"},
            }
        )
    )
    frame = encode(request(rid, "initialize", params), draw(styles))
    return Case("initialize again", "initialize", frame, refusal(rid, -32600, -32602))


@st.composite
def unsupported_versions(draw: st.DrawFn) -> Case:
    """A request naming a protocol version we do not speak: -32022 listing what we speak."""
    rid = draw(request_ids)
    version = draw(json_values.filter(lambda v: v is not None and v != MODERN_VERSION))
    method, params = draw(
        st.sampled_from(
            [
                ("ping", {}),
                ("tools/list", {}),
                ("tools/call", {"name": "echo", "arguments": {"text": "v"}}),
            ]
        )
    )
    message = request(rid, method, {**params, "_meta": {VERSION_META: version}})
    expected = (
        Expected(id=rid, errors=frozenset({-32022}), error_data=names_modern)
        if echoable(rid)
        else ID_TOO_LONG
    )
    return Case("unsupported version", method, encode(message, draw(styles)), expected)


def _notification(method: str, params: Json) -> dict[str, Json]:
    message: dict[str, Json] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return message


@st.composite
def silent_frames(draw: st.DrawFn) -> Case:
    """Notifications, and responses from the client (we send no requests): no answer at all."""
    methods = st.text(min_size=1, max_size=40) | st.sampled_from(
        [
            "notifications/initialized",
            "notifications/cancelled",
            "notifications/progress",
            "notifications/roots/list_changed",
        ]
    )
    kind, message = draw(
        st.one_of(
            st.tuples(
                st.just("notification"),
                st.builds(_notification, methods, st.none() | json_objects),
            ),
            # Cancelling what is not running (nothing is, between examples) is harmless.
            st.tuples(
                st.just("cancel"),
                st.builds(
                    lambda target, why: _notification(
                        "notifications/cancelled", {"requestId": target, "reason": why}
                    ),
                    json_values,
                    st.text(max_size=20),
                ),
            ),
            st.tuples(
                st.just("result"),
                st.builds(
                    lambda rid, result: {"jsonrpc": "2.0", "id": rid, "result": result},
                    request_ids,
                    json_objects,
                ),
            ),
            st.tuples(
                st.just("error"),
                st.builds(
                    lambda rid, code, text: {
                        "jsonrpc": "2.0",
                        "id": rid,
                        "error": {"code": code, "message": text},
                    },
                    st.none() | request_ids,
                    st.integers(min_value=-(2**40), max_value=2**40),
                    st.text(max_size=30),
                ),
            ),
        )
    )
    return Case("silent", kind, encode(message, draw(styles)), SILENCE)


@st.composite
def not_jsonrpc(draw: st.DrawFn) -> Case:
    """Valid JSON that is no JSON-RPC message: -32600, with the id when one can be read."""
    rid = draw(request_ids)
    not_a_member = st.text(max_size=8).filter(lambda k: k not in {"method", "result", "error"})
    kind, message = draw(
        st.one_of(
            st.tuples(st.just("scalar"), scalars),
            # A batch: 2025-06-18 has none (and an empty one is invalid in every version).
            st.tuples(
                st.just("batch"),
                st.lists(
                    json_values | valid_requests().map(lambda case: json.loads(case.frame)),
                    max_size=3,
                ),
            ),
            st.tuples(
                st.just("no method, result or error"),
                st.dictionaries(not_a_member, json_values, max_size=4),
            ),
            st.tuples(
                st.just("id but no method"),
                st.builds(
                    lambda members, i: {**members, "id": i},
                    st.dictionaries(st.sampled_from(["jsonrpc", "params", "x"]), json_values),
                    request_ids,
                ),
            ),
            st.tuples(
                st.just("wrong jsonrpc"),
                st.builds(
                    lambda v: {"jsonrpc": v, "id": rid, "method": "ping"},
                    json_values.filter(lambda v: v != "2.0"),
                ),
            ),
            st.tuples(st.just("no jsonrpc"), st.just({"id": rid, "method": "ping"})),
            st.tuples(
                st.just("bad id"),
                st.builds(lambda i: {"jsonrpc": "2.0", "id": i, "method": "ping"}, bad_ids),
            ),
            st.tuples(
                st.just("bad method"),
                st.builds(
                    lambda m: {"jsonrpc": "2.0", "id": rid, "method": m},
                    non_strings | st.just(""),
                ),
            ),
            st.tuples(
                st.just("bad notification method"),
                st.builds(lambda m: {"jsonrpc": "2.0", "method": m}, non_strings | st.just("")),
            ),
            st.tuples(
                st.just("scalar params"),
                st.builds(
                    lambda p: request(rid, "ping", p), scalars.filter(lambda v: v is not None)
                ),
            ),
        )
    )
    frame = encode(message, draw(styles))
    return Case("not JSON-RPC", kind, frame, refusal(readable_id(message), -32600))


@st.composite
def array_params(draw: st.DrawFn) -> Case:
    """By-position params: JSON-RPC has them, MCP methods take named ones. Invalid request and
    invalid params are both fair answers."""
    rid = draw(request_ids)
    method = draw(st.sampled_from(["ping", "tools/list", "tools/call"]))
    message = request(rid, method, draw(st.lists(json_values, max_size=3)))
    return Case("array params", method, encode(message, draw(styles)), refusal(rid, -32600, -32602))


MUTATIONS: dict[str, Callable[[str], str]] = {
    "trailing comma": lambda text: text[:-1] + ",}",
    "single quotes": lambda text: text.replace('"', "'"),
    "comment": lambda text: "/* note */" + text,
    "two messages": lambda text: text + text,
    "equals for colon": lambda text: text.replace(":", "=", 1),
    "NUL outside a string": lambda text: text[:1] + "\x00" + text[1:],
}


@st.composite
def not_json(draw: st.DrawFn) -> Case:
    """Text that is not JSON: -32700 with id null."""
    kind = draw(st.sampled_from(["truncated", "junk", *MUTATIONS]))
    if kind == "junk":
        text = draw(st.text(max_size=300))
    else:
        base = draw(valid_requests()).frame
        if kind == "truncated":
            text = base[: draw(st.integers(min_value=0, max_value=len(base) - 1))]
        else:
            text = MUTATIONS[kind](base)
    # NaN and Infinity are not JSON either, so they may appear: the server refuses them too.
    assume(not is_strict_json(text))
    return Case("not JSON", kind, text, refusal(None, -32700))


def nested(depth: int, shape: str) -> str:
    if shape == "arrays":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "0" + "}" * depth


@st.composite
def deep_nesting(draw: st.DrawFn) -> Case:
    """Deep JSON: answered as usual while any parser must take it; deeper, answered or refused
    as unparseable (-32700, id null). Never a crash, a hang or a close."""
    rid = draw(request_ids)
    depth = draw(st.integers(min_value=1, max_value=1500))
    shape = draw(st.sampled_from(["arrays", "objects"]))
    deep = nested(depth, shape)
    shallow = depth <= SURELY_PARSED_DEPTH
    maybe_unparsed = frozenset() if shallow else frozenset({-32700})
    if draw(st.booleans()):
        frame = (
            '{"jsonrpc":"2.0","id":' + json.dumps(rid) + ',"method":"ping","params":{"deep":'
        ) + (deep + "}}")
        expected = Expected(
            id=rid if echoable(rid) else None,
            result=is_empty if echoable(rid) else None,
            errors=frozenset() if echoable(rid) else frozenset({-32600}),
            unparsed=maybe_unparsed,
        )
        return Case("deep", f"{shape} in params", frame, expected)
    # Parsed, a deep array is a batch (none in 2025-06-18) and a deep object has no method.
    expected = Expected(id=None, errors=frozenset({-32600}), unparsed=maybe_unparsed)
    return Case("deep", f"top-level {shape}", deep, expected)


frames = st.one_of(
    valid_requests(),
    unknown_methods(),
    invalid_params(),
    repeated_initialize(),
    unsupported_versions(),
    silent_frames(),
    not_jsonrpc(),
    array_params(),
    not_json(),
    deep_nesting(),
)
FAMILIES = frozenset(
    {
        "valid",
        "unknown method",
        "invalid params",
        "initialize again",
        "unsupported version",
        "silent",
        "not JSON-RPC",
        "array params",
        "not JSON",
        "deep",
    }
)


# -- driving a session -------------------------------------------------------------------------


class FuzzSession:
    """The session every example talks to. Should the server close it, the example fails and
    the next one gets a new session, so that shrinking replays against a live one."""

    def __init__(self, url: str, nursery: trio.Nursery) -> None:
        self.url = url
        self.nursery = nursery
        self.ws: WebSocketConnection | None = None
        self.frames_sent = 0
        self._ping_ids = count()

    async def open(self) -> None:
        self.ws = await connect_websocket_url(self.nursery, self.url, subprotocols=["mcp"])
        await RawClient(self.ws).initialize(HANDSHAKE_VERSION)

    async def aclose(self) -> None:
        if self.ws is not None:
            await self.ws.aclose()

    async def check(self, case: Case) -> None:
        if self.ws is None or self.ws.closed is not None:
            await self.open()
        ws = self.ws
        assert ws is not None
        try:
            await self._exchange(ws, case)
        except ConnectionClosed as closed:
            raise AssertionError(
                f"the server closed the session ({closed.reason}) on {case.family}: {case.kind}"
            ) from None
        except BaseException:
            # Frames of the failed exchange may still be on their way: they must not be read
            # as answers to the next example, so that one (a shrink step) gets a new session.
            with trio.move_on_after(FAILURE_BOUND_S) as cleanup:
                cleanup.shield = True
                await ws.aclose()
            raise

    async def ping(self) -> None:
        """One ping, and nothing but its answer: no late answer to an earlier frame."""
        assert self.ws is not None
        await self._exchange(self.ws, None)

    async def _exchange(self, ws: WebSocketConnection, case: Case | None) -> None:
        """Send the case's frame and a ping; read until both are accounted for."""
        expected = case.expected if case is not None else SILENCE
        if case is not None:
            await ws.send_message(case.frame)
            self.frames_sent += 1
        ping_id = f"{ALIVE}{next(self._ping_ids)}"
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": ping_id, "method": "ping"}))
        self.frames_sent += 1
        answered = expected.silent
        alive = False
        last_progress: float | None = None
        while not (answered and alive):
            with trio.fail_after(FAILURE_BOUND_S):
                frame = json.loads(await ws.get_message())
            assert isinstance(frame, dict), frame
            assert frame.get("jsonrpc") == "2.0", frame
            if "method" in frame:
                last_progress = check_notification(frame, expected, last_progress)
            elif same_id(frame.get("id"), ping_id):
                assert frame.get("result") == {}, frame
                alive = True
            else:
                assert not answered, f"an answer where none (or no more) was due: {frame}"
                check_response(frame, expected)
                answered = True


def check_notification(
    frame: dict[str, Json], expected: Expected, last: float | None
) -> float | None:
    """Notifications may only be the progress of this example's call, or log messages (an
    earlier example may have set a log level, and exai_test_steps logs each step)."""
    if frame["method"] == "notifications/message":
        return last
    assert frame["method"] == "notifications/progress", frame
    params = frame["params"]
    assert expected.progress_token is not None, f"progress nobody asked for: {frame}"
    assert same_id(params["progressToken"], expected.progress_token), frame
    progress = params["progress"]
    assert last is None or progress > last, f"progress not increasing: {last} then {progress}"
    return float(progress)


def check_response(frame: dict[str, Json], expected: Expected) -> None:
    assert not expected.silent, f"an answer to a frame that must get none: {frame}"
    rid = frame.get("id", "<no id member>")
    if "error" in frame:
        assert "result" not in frame, frame
        error = frame["error"]
        assert isinstance(error.get("message"), str), frame
        assert error["message"], frame
        code = error.get("code")
        if rid is None and code in expected.unparsed:
            return
        assert same_id(rid, expected.id), f"wrong id, expected {expected.id!r}: {frame}"
        assert code in expected.errors, f"wrong error, expected {set(expected.errors)}: {frame}"
        if expected.error_data is not None:
            assert expected.error_data(error.get("data")), frame
    else:
        assert same_id(rid, expected.id), f"wrong id, expected {expected.id!r}: {frame}"
        assert expected.result is not None, f"a result where an error was due: {frame}"
        assert "result" in frame, frame
        assert expected.result(frame["result"]), f"wrong result: {frame}"


async def assert_alive(client: RawClient) -> None:
    reply = await client.request("ping")
    assert reply["result"] == {}, reply


def assert_no_failures(server: ServerProcess) -> None:
    failures = [
        event
        for event in server.log_events()
        if event.get("event") in FAILURE_EVENTS or event.get("level") in FAILURE_LEVELS
    ]
    assert failures == [], failures


# -- the tests ---------------------------------------------------------------------------------


async def test_generated_frames_get_spec_answers_and_the_session_survives(
    fuzz_server: ServerProcess,
) -> None:
    url = fuzz_server.authed_url()
    families: Counter[str] = Counter()
    async with open_raw(url) as bystander_ws, trio.open_nursery() as nursery:
        bystander = RawClient(bystander_ws)
        await bystander.initialize(HANDSHAKE_VERSION)
        session = FuzzSession(url, nursery)
        await session.open()

        @settings(FUZZ, max_examples=2000)
        @given(case=frames)
        def example(case: Case) -> None:
            # A frame over the limit is not this test's business (the oversized test's).
            assume(len(case.frame.encode()) <= LIMIT)
            families[case.family] += 1
            trio.from_thread.run(session.check, case)

        await trio.to_thread.run_sync(example)
        await session.ping()
        await assert_alive(bystander)
        await session.aclose()
    # Every family was drawn (none filtered away to nothing), and thousands of frames went.
    assert set(families) == FAMILIES, families
    assert session.frames_sent >= 4000, session.frames_sent
    assert_no_failures(fuzz_server)


def padded_ping(request_id: str, size: int) -> str:
    """A ping of exactly ``size`` bytes (whitespace is JSON's padding)."""
    head = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "ping"})[:-1]
    frame = head + " " * (size - len(head) - 1) + "}"
    assert len(frame.encode()) == size
    return frame


@st.composite
def oversized(draw: st.DrawFn) -> str:
    """ASCII frames (bytes = characters) just over the limit, or well over it."""
    size = draw(
        st.integers(min_value=LIMIT + 1, max_value=LIMIT + 64)
        | st.integers(min_value=LIMIT + 1, max_value=3 * LIMIT)
    )
    if draw(st.booleans()):
        return padded_ping("big", size)
    return draw(st.characters(min_codepoint=32, max_codepoint=126)) * size


async def expect_close(ws: WebSocketConnection, code: int) -> None:
    with trio.fail_after(FAILURE_BOUND_S):
        try:
            frame = await ws.get_message()
        except ConnectionClosed as closed:
            reason = closed.reason
        else:
            pytest.fail(f"answered instead of closing with {code}: {frame[:200]!r}")
    assert reason.code == code, reason


async def close_case(url: str, bystander: RawClient, frame: str | bytes, code: int) -> None:
    """One frame that must close its session with ``code``; then everyone else still works."""
    async with open_raw(url) as ws:
        await RawClient(ws).initialize(HANDSHAKE_VERSION)
        await ws.send_message(frame)
        await expect_close(ws, code)
    await assert_alive(bystander)
    async with open_raw(url) as fresh:
        client = RawClient(fresh)
        await client.initialize(HANDSHAKE_VERSION)
        await assert_alive(client)


async def test_oversized_messages_close_1009_and_spare_everyone_else(
    fuzz_server: ServerProcess,
) -> None:
    url = fuzz_server.authed_url()
    async with open_raw(url) as bystander_ws:
        bystander = RawClient(bystander_ws)
        await bystander.initialize(HANDSHAKE_VERSION)

        # The limit itself is allowed: a message of exactly LIMIT bytes is answered.
        await bystander.send(padded_ping("at-limit", LIMIT))
        assert (await bystander.receive())["id"] == "at-limit"

        @settings(FUZZ, max_examples=100)
        @given(frame=oversized())
        def example(frame: str) -> None:
            trio.from_thread.run(close_case, url, bystander, frame, 1009)

        await trio.to_thread.run_sync(example)
        await assert_alive(bystander)
    assert_no_failures(fuzz_server)


# -- defects the fuzzing found, fixed: each pins the correct behaviour ------------------------


@pytest.mark.parametrize(
    "frame",
    [
        b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}',
        b"\xff\xfe not utf-8",
        b"",
    ],
    ids=["json request", "not utf-8", "empty"],
)
async def test_binary_frames_close_1003_and_spare_everyone_else(
    fuzz_server: ServerProcess, frame: bytes
) -> None:
    url = fuzz_server.authed_url()
    async with open_raw(url) as bystander_ws:
        bystander = RawClient(bystander_ws)
        await bystander.initialize(HANDSHAKE_VERSION)
        await close_case(url, bystander, frame, 1003)


async def test_the_message_limit_is_in_bytes_for_text_frames(fuzz_server: ServerProcess) -> None:
    # Three UTF-8 bytes per character: under the limit in characters, twice over it in bytes.
    text = "\u20ac" * (2 * LIMIT // 3)
    frame = json.dumps(
        request(1, "tools/call", {"name": "echo", "arguments": {"text": text}}), ensure_ascii=False
    )
    assert len(frame) < LIMIT < len(frame.encode())
    url = fuzz_server.authed_url()
    async with open_raw(url) as bystander_ws:
        bystander = RawClient(bystander_ws)
        await bystander.initialize(HANDSHAKE_VERSION)
        await close_case(url, bystander, frame, 1009)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_are_parse_errors(fuzz_server: ServerProcess, literal: str) -> None:
    async with open_raw(fuzz_server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize(HANDSHAKE_VERSION)
        await client.send(
            '{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": ' + literal + "}}"
        )
        reply = await client.receive()
        assert reply["id"] is None, reply
        assert reply["error"]["code"] == -32700, reply
        await assert_alive(client)


async def test_a_boolean_progress_token_is_invalid_params(fuzz_server: ServerProcess) -> None:
    async with open_raw(fuzz_server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize(HANDSHAKE_VERSION)
        params = {
            "name": "exai_test_steps",
            "arguments": {"steps": 1},
            "_meta": {"progressToken": True},
        }
        await client.send(request("bool-token", "tools/call", params))
        # The refusal must be all that comes: no progress for a token the client never sent.
        reply = await client.receive()
        assert reply.get("id") == "bool-token", reply
        assert reply["error"]["code"] == -32602, reply
        await assert_alive(client)


@pytest.fixture(scope="module")
def one_slot_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One tools/call at a time per session, so a test can hold a request in the queue."""
    handle = start_server(
        tmp_path_factory.mktemp("state"),
        database_url=database_url,
        extra_env={"EXAI_MAX_INFLIGHT_PER_SESSION": "1"},
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


async def test_a_cancelled_request_that_is_still_queued_never_runs(
    one_slot_server: ServerProcess,
) -> None:
    def call(
        request_id: str, name: str, arguments: dict[str, Json], token: str | None = None
    ) -> dict[str, Json]:
        params: dict[str, Json] = {"name": name, "arguments": arguments}
        if token is not None:
            params["_meta"] = {"progressToken": token}
        return request(request_id, "tools/call", params)

    def cancel(request_id: str) -> dict[str, Json]:
        return _notification("notifications/cancelled", {"requestId": request_id})

    async with open_raw(one_slot_server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize(HANDSHAKE_VERSION)
        await client.send(call("running", "exai_test_block", {}))
        # Answered only once the actor started the call: the block holds the only slot.
        await assert_alive(client)
        await client.send(call("queued", "exai_test_steps", {"steps": 1}, token="queued"))
        await client.send(cancel("queued"))
        await client.send(cancel("running"))
        await client.send(call("after", "echo", {"text": "after"}))
        # The echo can run only after whatever took the slot before it, so any progress or
        # answer of the cancelled "queued" would arrive before the echo's answer.
        before: list[Json] = []
        while (frame := await client.receive()).get("id") != "after":
            before.append(frame)
        assert before == [], "a cancelled request ran"
        assert frame["result"]["content"] == [{"type": "text", "text": "after"}]
