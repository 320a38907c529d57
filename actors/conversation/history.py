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

**A compacted thread** (:mod:`.compaction`) has a summary of its exchanges up to some turn.
Then what is sent is, in the budget's order of precedence: the summary (a ``system`` message,
first), the exchanges after it (newest first, as above, presented oldest first), then the
files attached in the summarised exchanges (newest copy of each path not attached again
since), which ride in the summary's message. Files are never summarised.

**Calibration**: a budget is in upstream tokens. The thread's measured ratio of reported
prompt tokens to the characters / 4 estimate (``token_ratio``) turns it into estimate units
(:meth:`HistoryBudget.calibrated`), so a model whose tokenizer counts 1.6 tokens per estimated
token gets 1/1.6 of the characters.
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

    def calibrated(self, ratio: float) -> HistoryBudget:
        """This budget in estimate units (characters / 4) for a thread whose upstream counts
        ``ratio`` tokens per estimated token."""
        if ratio == 1.0:
            return self
        return HistoryBudget(
            tokens=int(self.tokens / ratio),
            max_messages=self.max_messages,
            message_tokens=max(1, int(self.message_tokens / ratio)),
        )


@dataclass(frozen=True, slots=True)
class Summary:
    """A stored summary of exchanges ``first_turn``..``last_turn`` (turn indexes, 0-based)."""

    first_turn: int
    last_turn: int
    content: str


@dataclass(frozen=True, slots=True)
class History:
    """What goes upstream before the new prompt, oldest first."""

    messages: list[ChatMessage]
    turns: int
    omitted_turns: int
    tokens: int
    omitted_files: list[str] = field(default_factory=list)
    #: Exchanges sent as a summary (0: none).
    summarised_turns: int = 0


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


def summary_text(summary: Summary) -> str:
    """The summary as the model sees it (exchanges numbered from 1, as the chat tool does)."""
    return (
        f"Summary of exchanges {summary.first_turn + 1}-{summary.last_turn + 1} of this "
        "conversation (they are not repeated below):\n\n"
        f"{summary.content}"
    )


def compose(
    turns: Sequence[Turn],
    budget: HistoryBudget,
    *,
    summary: Summary | None,
    current_files: Collection[str] = (),
) -> History:
    """The history of ``turns`` (oldest first) within ``budget``, the exchanges ``summary``
    covers replaced by it (module doc). Without a summary: :func:`rebuild`."""
    if summary is None:
        return rebuild(turns, budget, current_files=current_files)
    recent = [t for t in turns if t.index > summary.last_turn]
    summarised = [t for t in turns if t.index <= summary.last_turn]
    text = cut(summary_text(summary), min(budget.message_tokens, budget.tokens))
    cost = tokens(text)
    rest = HistoryBudget(
        tokens=max(0, budget.tokens - cost),
        max_messages=max(0, budget.max_messages - 1),
        message_tokens=budget.message_tokens,
    )
    history = rebuild(recent, rest, current_files=current_files)
    # Files of summarised exchanges, last in precedence; a path attached again since (sent
    # or not) or by the current turn has a newer copy.
    seen = set(current_files) | {copy.path for t in recent for copy in t.files}
    used = cost + history.tokens
    omitted = list(history.omitted_files)
    blocks: list[str] = []
    for turn in reversed(summarised):
        for copy in turn.files:
            if copy.path in seen:
                continue
            seen.add(copy.path)
            block = render_file(copy.path, cut(copy.content, budget.message_tokens))
            extra = tokens(block) + 1
            if used + extra > budget.tokens:
                omitted.append(copy.path)
                continue
            blocks.append(block)
            used += extra
    if blocks:
        text = "\n\n".join(
            [text, "Files attached in those exchanges (newest copy of each):", *reversed(blocks)]
        )
    return History(
        messages=[ChatMessage(role="system", content=text), *history.messages],
        turns=history.turns,
        omitted_turns=history.omitted_turns,
        tokens=used,
        omitted_files=omitted,
        summarised_turns=summary.last_turn - summary.first_turn + 1,
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
