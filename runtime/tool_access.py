"""Which tools each client identity may list and call: the config file's
``[clients.<name>]`` ``tools`` (allow globs) and ``deny_tools`` (deny globs; deny wins).

Globs are :func:`fnmatch.fnmatchcase`'s (``*``, ``?``, ``[seq]``), matched against the whole
tool name, case-sensitively as MCP names are. An identity with no ``tools`` may call every
tool but those it is denied; ``tools = []`` allows none. An identity that has no entry (the
node's own ``default``, ``EXAI_CLIENT_TOKENS`` names) may call every tool.

A tool an identity may not call is not listed to it, and a call to it is answered exactly as
an unknown tool is: a client cannot tell a forbidden tool from one that does not exist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One identity's globs: ``allow`` ``None`` means every tool."""

    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] = ()

    @classmethod
    def of(cls, allow: Sequence[str] | None, deny: Sequence[str] | None) -> AccessRule:
        return cls(tuple(allow) if allow is not None else None, tuple(deny or ()))

    def allows(self, name: str) -> bool:
        if any(fnmatchcase(name, glob) for glob in self.deny):
            return False
        return self.allow is None or any(fnmatchcase(name, glob) for glob in self.allow)

    @property
    def unrestricted(self) -> bool:
        return self.allow is None and not self.deny


class ToolAccess:
    """The node's access rules by identity; replaced as a whole on a reload (``adopt``), so a
    reload that adds a restricted client never lets it see everything for a moment."""

    def __init__(self, rules: Mapping[str, AccessRule] | None = None) -> None:
        self._rules = {name: rule for name, rule in (rules or {}).items() if not rule.unrestricted}
        #: Goes up at each ``adopt``: what a reader cached from the old rules is stale.
        self.generation = 0

    def adopt(self, other: ToolAccess) -> None:
        """Apply ``other``'s rules from the next ``tools/list`` and ``tools/call`` on."""
        self._rules = other._rules
        self.generation += 1

    def restricted(self, identity: str) -> bool:
        """Whether any tool is hidden from ``identity``."""
        return identity in self._rules

    def allows(self, identity: str, name: str) -> bool:
        rule = self._rules.get(identity)
        return rule is None or rule.allows(name)
