"""The history sent upstream with a turn: rebuilt from the stored thread within budgets.

As the seed's ancestor did (zen-mcp-server's conversation memory, kept by the EX-AI MCP server):
turns are taken **newest first** until a budget is spent, then presented **in chronological
order**, so when a long thread does not fit, what falls out is its beginning. Budgets
(``[chat]`` in the config file): total history tokens (50k), history messages (20), and tokens
per message (10k; a longer prompt, answer or file copy is cut, and says so). Tokens are
estimated as characters / 4.

**Files** are attached to turns as copies of their content (``path`` + text). A file attached
again later is the newer copy, and the **newest copy wins**: walking newest first, the first
copy of a path met is kept and older ones are skipped, as are copies of a file the current
turn attaches itself. Within a turn, its prompt and answer come before its files: a file that
would overflow the budget is left out (and reported), the conversation is not.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from actors.providers import ChatMessage
from actors.providers.usage import CHARS_PER_TOKEN, estimate_tokens
from storage.threads import StoredMessage

#: ``messages.tool_name`` of a stored file copy (prompts and answers carry the tool's name).
FILE_MESSAGE = "file"


@dataclass(frozen=True, slots=True)
class FileCopy:
    path: str
    content: str


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored exchange: the (stripped) prompt, its files, and the answer."""

    index: int
    prompt: str
    reply: str
    files: tuple[FileCopy, ...] = ()


@dataclass(frozen=True, slots=True)
class HistoryBudget:
    tokens: int
    max_messages: int
    message_tokens: int


@dataclass(frozen=True, slots=True)
class History:
    """What goes upstream before the new prompt, oldest first."""

    messages: list[ChatMessage]
    turns: int
    omitted_turns: int
    tokens: int
    omitted_files: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Picked:
    turn: Turn
    prompt: str
    reply: str
    files: list[FileCopy]


def tokens(text: str) -> int:
    return estimate_tokens([text])


def cut(text: str, max_tokens: int) -> str:
    """``text`` within ``max_tokens``, saying how much was left out."""
    if tokens(text) <= max_tokens:
        return text
    kept = text[: max_tokens * CHARS_PER_TOKEN]
    return f"{kept}\n[... cut here: about {tokens(text) - max_tokens} more tokens not shown]"


def render_file(path: str, content: str) -> str:
    """A file as the model sees it: its path, then its text in a fence it cannot close."""
    fence = "```"
    while fence in content:
        fence += "`"
    return f"File: {path}\n{fence}\n{content}\n{fence}"


def user_message(prompt: str, files: Iterable[FileCopy]) -> str:
    """A turn's user message: its files first, then what the user said about them."""
    blocks = [render_file(f.path, f.content) for f in files]
    return "\n\n".join([*blocks, prompt])


def rebuild(
    turns: Sequence[Turn], budget: HistoryBudget, *, current_files: Collection[str] = ()
) -> History:
    """The history of ``turns`` (oldest first) within ``budget`` (module doc)."""
    seen = set(current_files)
    picked: list[_Picked] = []
    omitted_files: list[str] = []
    used = 0
    messages = 0
    for turn in reversed(turns):
        prompt = cut(turn.prompt, budget.message_tokens)
        reply = cut(turn.reply, budget.message_tokens)
        needed = 2 if reply else 1
        cost = tokens(prompt) + (tokens(reply) if reply else 0)
        if messages + needed > budget.max_messages or used + cost > budget.tokens:
            break
        files: list[FileCopy] = []
        for copy in turn.files:
            if copy.path in seen:
                continue  # a newer copy of this file is already in (or is the current turn's)
            seen.add(copy.path)
            content = cut(copy.content, budget.message_tokens)
            extra = tokens(render_file(copy.path, content)) + 1
            if used + cost + extra > budget.tokens:
                omitted_files.append(copy.path)
                continue
            files.append(FileCopy(copy.path, content))
            cost += extra
        used += cost
        messages += needed
        picked.append(_Picked(turn, prompt, reply, files))
    out: list[ChatMessage] = []
    for item in reversed(picked):
        out.append(ChatMessage(role="user", content=user_message(item.prompt, item.files)))
        if item.reply:
            out.append(ChatMessage(role="assistant", content=item.reply))
    return History(
        messages=out,
        turns=len(picked),
        omitted_turns=len(turns) - len(picked),
        tokens=used,
        omitted_files=omitted_files,
    )


def turns_from_messages(messages: Iterable[StoredMessage]) -> list[Turn]:
    """Group a thread's stored messages (oldest first) into turns, in turn order."""
    prompts: dict[int, str] = {}
    replies: dict[int, str] = {}
    files: dict[int, list[FileCopy]] = {}
    for m in messages:
        if m.tool_name == FILE_MESSAGE:
            files.setdefault(m.turn_index, []).append(
                FileCopy(m.files[0] if m.files else "(unnamed file)", m.content)
            )
        elif m.role == "user":
            prompts[m.turn_index] = m.content
        elif m.role == "assistant":
            replies[m.turn_index] = m.content
    return [
        Turn(index, prompts.get(index, ""), replies.get(index, ""), tuple(files.get(index, ())))
        for index in sorted(prompts.keys() | replies.keys() | files.keys())
    ]
