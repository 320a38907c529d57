"""A proxied server run once per client identity, or once per session (``share``).

``share = "node"`` is one :class:`~actors.servers.proxy.ProxiedServer` for every caller.
``"identity"`` and ``"session"`` keep one per key (the caller's identity, or its session id),
started on demand by its first call, in this pool's nursery:

* **Tools.** A *catalog* instance runs for the pool, serving no call: it lists the tools
  (again on ``list_changed``), and its health is the pool's in ``exai status``. The
  instances run the same command, so their tools are taken to be the catalog's.
* **Bounds.** At most ``max_instances`` instances at once: one more caller is refused with
  :class:`PoolFull` (-32004: retry later), never by stopping another's. An instance with no
  call in flight for ``idle_timeout`` seconds is stopped. A session's instance is stopped
  with its session (:meth:`ServerPool.release`).
* **Failures.** Each instance restarts, and goes down, as a node-shared server does (its own
  intensity); a caller whose instance is down is refused as a down server's are.

Cancellation: the pool's :meth:`run` ends when cancelled; every instance stops with it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from actors.servers.proxy import ProxiedServer, ServerState
from runtime.mcp.client import InitializedServer, Progress
from runtime.mcp.schema import ToolDescriptor
from storage.errors import RetryLater

__all__ = ["PoolFull", "ServerPool"]

log = structlog.get_logger("servers")

#: The catalog instance's key (no identity or session id can be this).
CATALOG = "(catalog)"


class PoolFull(RetryLater):
    """Every instance a pool may run is taken by other callers."""


@dataclass(eq=False)
class _Instance:
    server: ProxiedServer
    scope: trio.CancelScope
    in_flight: int = 0
    idle_since: float = 0.0


class ServerPool:
    """Instances of one proxied server, one per key (module doc). Looks like a
    :class:`ProxiedServer` to its tools and to status: ``name``, ``state``, ``tools``,
    ``call``."""

    def __init__(
        self,
        name: str,
        make: Callable[[str], ProxiedServer],
        *,
        share: str,
        max_instances: int,
        idle_timeout: float,
    ) -> None:
        self.name = name
        self.share = share
        self._make = make
        self._max = max_instances
        self._idle_timeout = idle_timeout
        self._instances: dict[str, _Instance] = {}
        self._nursery: trio.Nursery | None = None
        self.catalog = make(CATALOG)

    # -- what tools and status read ----------------------------------------------------------

    @property
    def state(self) -> ServerState:
        return self.catalog.state

    @property
    def tools(self) -> tuple[ToolDescriptor, ...]:
        return self.catalog.tools

    @property
    def server(self) -> InitializedServer | None:
        return self.catalog.server

    @property
    def instances(self) -> int:
        return len(self._instances)

    async def call(
        self,
        key: str,
        tool: str,
        arguments: Mapping[str, Any] | None,
        *,
        on_progress: Callable[[Progress], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """``tools/call`` on ``key``'s instance, started (and waited for, up to 30 s) if
        it has none. Raises :class:`PoolFull`, and what :meth:`ProxiedServer.call` raises."""
        instance = self._instances.get(key) or self._start(key)
        instance.in_flight += 1
        try:
            with trio.move_on_after(30):
                await instance.server.first_start.wait()
            return await instance.server.call(tool, arguments, on_progress=on_progress)
        finally:
            instance.in_flight -= 1
            instance.idle_since = trio.current_time()

    def release(self, key: str) -> None:
        """``key``'s instance is no longer needed (its session ended): stopped now."""
        instance = self._instances.pop(key, None)
        if instance is not None:
            instance.scope.cancel()

    # -- running ------------------------------------------------------------------------------

    def _start(self, key: str) -> _Instance:
        nursery = self._nursery
        if nursery is None:
            raise PoolFull(f"proxied server {self.name!r} is not running")
        if len(self._instances) >= self._max:
            raise PoolFull(
                f"proxied server {self.name!r} runs {self._max} instances (one per "
                f"{self.share}), its max_instances: retry once one has gone idle"
            )
        server = self._make(key)
        instance = _Instance(server, trio.CancelScope(), idle_since=trio.current_time())
        self._instances[key] = instance
        nursery.start_soon(self._run_instance, key, instance)
        log.info("servers.instance_started", server=self.name, share=self.share)
        return instance

    async def _run_instance(self, key: str, instance: _Instance) -> None:
        try:
            with instance.scope:
                await instance.server.run()
        finally:
            if self._instances.get(key) is instance:
                del self._instances[key]

    async def run(self) -> None:
        """The catalog, the instances and the idle sweep, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            catalog = trio.CancelScope()

            async def run_catalog() -> None:
                with catalog:
                    await self.catalog.run()

            nursery.start_soon(run_catalog)
            while True:
                await trio.sleep(min(self._idle_timeout, 1.0))
                now = trio.current_time()
                for key, instance in list(self._instances.items()):
                    if instance.in_flight == 0 and now - instance.idle_since >= self._idle_timeout:
                        log.info("servers.instance_idle", server=self.name, share=self.share)
                        self.release(key)
