"""Option handling shared by the modes that run a plan of their own (``durability``, ``http``,
``proxy``): which command-line options they refuse, the servers they were asked for, and the
measurement windows as given by ``--warmup``/``--duration``.

Argument parsing itself is ``bench.__main__``'s; these only read its namespace.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from bench.scenarios import Scenario


def reject_options(args: argparse.Namespace, mode: str, flags: Iterable[str]) -> None:
    """Exit naming every option in ``flags`` (``"--py-spy"``, ...) that was given although
    ``mode`` does not take it. An option counts as given when its value is neither ``None``
    nor false."""
    given = [
        f
        for f in flags
        if getattr(args, f.removeprefix("--").replace("-", "_"), None) not in (None, False)
    ]
    if given:
        raise SystemExit(f"{mode} runs its own plan: {', '.join(given)} not taken")


def chosen_servers(args: argparse.Namespace, mode: str, known: Mapping[str, object]) -> list[str]:
    """The ``--servers`` list (comma-separated) or every server in ``known``; exits on a name
    ``known`` does not hold."""
    names: list[str] = args.servers.split(",") if args.servers else list(known)
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"unknown server(s) for {mode}: {', '.join(bad)} (of {', '.join(known)})")
    return names


def windowed(plan: Sequence[Scenario], args: argparse.Namespace) -> list[Scenario]:
    """``plan`` with ``--warmup``/``--duration`` (seconds) applied to every scenario."""
    out = list(plan)
    if args.duration is not None:
        out = [replace(s, duration=args.duration) for s in out]
    if args.warmup is not None:
        out = [replace(s, warmup=args.warmup) for s in out]
    return out


def exai_env(pairs: Sequence[str] | None) -> dict[str, str]:
    """``--exai-env KEY=VALUE`` options as a mapping; exits on a malformed one."""
    bad = [kv for kv in pairs or [] if "=" not in kv]
    if bad:
        raise SystemExit(f"--exai-env wants KEY=VALUE: {', '.join(bad)}")
    return dict(kv.split("=", 1) for kv in pairs or [])
