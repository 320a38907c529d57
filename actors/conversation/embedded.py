"""Context Engineering Phase 1: history a caller embedded into its prompt is stripped before
the turn is stored and sent upstream (as in the EX-AI MCP server this project upgrades).

Why: the server keeps a thread's history and sends it upstream with every turn. A caller that
also pastes the conversation so far into its prompt makes each turn carry the history twice,
and once stored, the pasted copy is itself history that the next turn re-sends and the caller
re-pastes: the system this project upgrades once spent 4.7 M tokens on one call this way.

**Only continuations are stripped.** A new thread has no stored history to compare with, so
context pasted there is the caller's real input and is kept whole.

**The evidence is the content, not the format.** Callers wrap history in every format there
is (``=== CONVERSATION HISTORY ===``, ``User:``/``Assistant:`` transcripts, Markdown quotes,
XML-ish tags, or nothing at all), but the server holds the thread's messages: a passage of the
prompt that *reproduces stored messages* is history, however it is dressed. Marker lists
alone (what the seed did) miss unmarked copies and cannot tell a history block from a block
that merely has a similar heading.

1. **Lines.** Prompt and stored messages (earlier prompts and answers; not attached files,
   which are input the caller may legitimately paste) are split into lines and normalised:
   surrounding whitespace, Markdown quote markers (``>``) and a leading role label
   (``User:``, ``**Assistant**:``, ``Claude (model):``...) removed, inner whitespace collapsed,
   case folded. Each prompt line is *known* (its normalised form is a line of a stored
   message), *framing* (only a role label, a turn header such as ``--- Turn 2 (Claude) ---``,
   a heading such as ``Previous conversation:``, or a ``=== ... ===`` delimiter), *blank*, or
   *new*. Known lines shorter than 12 characters (``}``, a code fence, ``Thanks!``) are
   *weak*: they join a passage but prove nothing, and are left to the new text they touch.
2. **Passages.** Maximal runs of known, framing and blank lines holding at least one known
   line are candidates. A candidate is history when it repeats at least ``min_chars``
   (default 160) characters of stored text in strong lines, since a copied passage that long
   is no coincidence; or when it is *framed* as history (a framing line, or a labelled known
   line) and covers every line of one whole stored message of at least 20 characters (a short
   earlier question pasted back as ``User: ...``). A phrase of an earlier answer quoted inside
   a new question is neither, and stays.
3. **Delimited blocks.** A block between explicit history delimiters (``=== CONVERSATION
   HISTORY ===`` ... ``=== END CONVERSATION HISTORY ===``, ``<conversation_history>`` ...
   ``</conversation_history>``, ``[HISTORY START]`` ... ``[HISTORY END]``, and the like; a
   start without an end runs to a ``=== NEW USER INPUT ===``-style marker) is removed whole,
   headers and edited lines included, when its known lines make up at least half of its
   text: the caller said it is history and the content agrees. A delimited block whose
   content is not this thread's is kept.
4. **What is left.** A passage framed as history (labels, headers, delimiters) at the start
   or end of the prompt, where pasted transcripts go, is dropped. Any other passage (new text
   on both sides, or a bare quote next to a question about it) is replaced by a one-line
   reference (``[earlier message of this thread: "..."]``) so that the question still reads
   right; the full text reaches the model through the rebuilt history anyway. If nothing new
   is left, the caller only repeated the thread: the turn is refused (``PromptOnlyHistory``)
   rather than stored twice.

Copies the caller re-wrapped or edited line by line are not recognised (a false negative costs
tokens; a false positive would silently drop what the user wrote, which is worse).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

WEAK_LINE_CHARS = 12
MIN_WHOLE_MESSAGE_CHARS = 20
DEFAULT_MIN_CHARS = 160
REFERENCE_PREVIEW_CHARS = 60

_ROLES = (
    r"user|human|me|you|assistant|ai|model|claude|gpt|chatgpt|gemini|glm|kimi|bot|system"
    r"|agent|exai|q|a"
)
# "User:", "**Assistant:**", "Claude (kimi-k2):", "> Assistant:" at the start of a line.
_LABEL = re.compile(
    rf"^(?:\*\*|__)?(?:{_ROLES})(?:\s*\([^)]{{0,60}}\))?(?:\*\*|__)?\s*[:\uff1a](?:\*\*|__)?\s*",
    re.IGNORECASE,
)
_QUOTE = re.compile(r"^(?:>\s?)+")
# "--- Turn 2 (Claude) ---", "### Turn 3", "Turn 4/20", "Message 5:", "Exchange 1 -".
_TURN_HEADER = re.compile(
    r"^[-=#*\s]*(?:turn|message|exchange)\s*#?\d+(?:\s*/\s*\d+)?\b.{0,80}$", re.IGNORECASE
)
# A short heading line ("Previous conversation:", "## Chat history", "Here is our conversation
# so far:") whose words say history; "Context:" or "Messages:" alone say nothing of the kind.
_HEADING = re.compile(r"^[#*_\s]*(?P<words>[\w' ,()-]{1,60}?)\s*[:.*_]*\s*$")
_HEADING_WORDS = re.compile(
    r"\b(?:conversation|history|transcript|so far|(?:previous|prior|earlier|past)\s+"
    r"(?:messages?|turns?|exchanges?|chats?|discussion|answers?|replies|questions?))\b",
    re.IGNORECASE,
)
_RULE = re.compile(r"^[-=*_]{3,}$")
# A delimiter line: "=== ANY TITLE ===", "--- title ---", "[TITLE]", "<tag>", "</tag>".
_DELIMITER = re.compile(
    r"^(?:={2,}|-{3,}|\*{3,})\s*(?P<a>[^=*]{1,80}?)\s*(?:={2,}|-{3,}|\*{3,})$"
    r"|^\[(?P<b>[^\]]{1,60})\]$"
    r"|^<(?P<close>/)?(?P<tag>[A-Za-z][\w-]{0,40})(?:\s[^>]{0,80})?>$"
)
_HISTORY_TITLE = re.compile(
    r"\b(?:conversation|chat|history|previous|prior|earlier|transcript)\b", re.IGNORECASE
)
_HISTORY_TAG = re.compile(
    r"^(?:conversation[_-]?history|chat[_-]?history|history|previous[_-]?(?:conversation"
    r"|messages)|transcript|prior[_-]?conversation)$",
    re.IGNORECASE,
)
_END_TITLE = re.compile(r"^(?:end\b|/)|\bend$", re.IGNORECASE)
_NEW_INPUT_TITLE = re.compile(
    r"\b(?:new|current|latest)\s+(?:user\s+)?(?:input|request|question|message|prompt|task)\b",
    re.IGNORECASE,
)


class _Kind(Enum):
    BLANK = "blank"
    KNOWN = "known"
    FRAMING = "framing"
    NEW = "new"


@dataclass(frozen=True, slots=True)
class _Line:
    text: str
    kind: _Kind
    norm: str = ""
    labelled: bool = False

    @property
    def strong(self) -> bool:
        return self.kind is _Kind.KNOWN and len(self.norm) >= WEAK_LINE_CHARS

    @property
    def weak(self) -> bool:
        return self.kind is _Kind.KNOWN and len(self.norm) < WEAK_LINE_CHARS


@dataclass(frozen=True, slots=True)
class Stripped:
    """The prompt without the history it embedded. ``removed_chars``: how much was taken out;
    ``passages``: how many separate pieces."""

    text: str
    removed_chars: int
    passages: int

    @property
    def changed(self) -> bool:
        return self.passages > 0


def normalise(line: str) -> tuple[str, bool]:
    """A line as compared (see the module doc), and whether it carried a role label."""
    text = _QUOTE.sub("", line.strip())
    labelled = False
    match = _LABEL.match(text)
    if match is not None:
        text = text[match.end() :]
        labelled = True
    return " ".join(text.split()).casefold(), labelled


def strip_embedded_history(
    prompt: str,
    stored: Sequence[str],
    *,
    files: Sequence[str] = (),
    min_chars: int = DEFAULT_MIN_CHARS,
) -> Stripped:
    """``prompt`` without the passages that reproduce ``stored`` messages (module doc).

    ``files``: the thread's stored file copies. They count as history only inside a delimited
    history block (history dumps embed the files they referenced); elsewhere a pasted file is
    the caller's input.
    """
    known = _known_lines(stored)
    if not known or not prompt.strip():
        return Stripped(prompt, 0, 0)
    messages = _message_line_sets(stored)
    file_lines = _known_lines(files)
    lines = [_classify(raw, known) for raw in prompt.splitlines()]
    remove = [False] * len(lines)
    passages: list[tuple[int, int]] = []
    for start, end in _delimited_blocks(lines):
        if _mostly_known(lines[start:end], file_lines):
            passages.append((start, end))
            for i in range(start, end):
                remove[i] = True
    for start, end in _candidate_runs(lines, remove):
        run = lines[start:end]
        if _is_history(run, messages, min_chars):
            passages.append((start, end))
            for i in range(start, end):
                remove[i] = True
    if not passages:
        return Stripped(prompt, 0, 0)
    for start, end in passages:
        _extend(lines, remove, start, end)
    text = _rebuild(lines, remove)
    removed = sum(len(line.text) + 1 for line, gone in zip(lines, remove, strict=True) if gone)
    return Stripped(text, removed, len(_merge(passages)))


# -- lines ---------------------------------------------------------------------------------


def _known_lines(stored: Iterable[str]) -> set[str]:
    known: set[str] = set()
    for message in stored:
        for line in message.splitlines():
            norm, _ = normalise(line)
            if norm:
                known.add(norm)
    return known


def _message_line_sets(stored: Iterable[str]) -> list[frozenset[str]]:
    """Each stored message long enough to be recognised whole, as its set of lines."""
    sets = []
    for message in stored:
        if len(message.strip()) < MIN_WHOLE_MESSAGE_CHARS:
            continue
        norms = frozenset(n for n, _ in map(normalise, message.splitlines()) if n)
        if norms:
            sets.append(norms)
    return sets


def _classify(raw: str, known: set[str]) -> _Line:
    if not _QUOTE.sub("", raw.strip()).strip():
        return _Line(raw, _Kind.BLANK)  # blank, or an empty quoted line (">")
    norm, labelled = normalise(raw)
    if norm and norm in known:
        return _Line(raw, _Kind.KNOWN, norm, labelled)
    if _is_framing(raw, norm, labelled):
        return _Line(raw, _Kind.FRAMING, norm, labelled)
    return _Line(raw, _Kind.NEW, norm, labelled)


def _is_framing(raw: str, norm: str, labelled: bool) -> bool:
    text = _QUOTE.sub("", raw.strip())
    if labelled and not norm:
        return True  # a role label alone on its line
    if _RULE.match(text) or _TURN_HEADER.match(text) or _DELIMITER.match(text):
        return True
    heading = _HEADING.match(text)
    return heading is not None and _HEADING_WORDS.search(heading.group("words")) is not None


# -- delimited blocks ----------------------------------------------------------------------


def _delimiter(line: _Line) -> str | None:
    """``"start"``, ``"end"`` or ``"input"`` for a history delimiter line, else ``None``."""
    match = _DELIMITER.match(line.text.strip())
    if match is None:
        return None
    tag = match.group("tag")
    if tag is not None:
        if not _HISTORY_TAG.match(tag):
            return None
        return "end" if match.group("close") else "start"
    title = (match.group("a") or match.group("b") or "").strip()
    if _NEW_INPUT_TITLE.search(title):
        return "input"
    if not _HISTORY_TITLE.search(title):
        return None
    return "end" if _END_TITLE.search(title) else "start"


def _delimited_blocks(lines: Sequence[_Line]) -> list[tuple[int, int]]:
    blocks = []
    i = 0
    while i < len(lines):
        if _delimiter(lines[i]) != "start":
            i += 1
            continue
        end = None
        for j in range(i + 1, len(lines)):
            kind = _delimiter(lines[j])
            if kind == "end":
                end = j + 1  # the end marker goes with the block
                break
            if kind == "input":
                end = j + 1  # "=== NEW USER INPUT ===" ends it, and is framing too
                break
        if end is None:
            i += 1  # no end: its extent is unknown; the passage rule may still apply
            continue
        blocks.append((i, end))
        i = end
    return blocks


def _mostly_known(block: Sequence[_Line], file_lines: set[str]) -> bool:
    known = sum(len(line.norm) for line in block if line.strong)
    if known == 0:
        return False
    new = 0
    for line in block:
        if line.kind is _Kind.NEW:
            if line.norm in file_lines:
                known += len(line.norm)
            else:
                new += len(line.norm)
    return known >= new


# -- passages ------------------------------------------------------------------------------


def _candidate_runs(lines: Sequence[_Line], removed: Sequence[bool]) -> list[tuple[int, int]]:
    runs = []
    i = 0
    n = len(lines)
    while i < n:
        if removed[i] or lines[i].kind is _Kind.NEW:
            i += 1
            continue
        j = i
        while j < n and not removed[j] and lines[j].kind is not _Kind.NEW:
            j += 1
        start, end = _trim(lines, i, j)
        if any(line.kind is _Kind.KNOWN for line in lines[start:end]):
            runs.append((start, end))
        i = j
    return runs


def _trim(lines: Sequence[_Line], start: int, end: int) -> tuple[int, int]:
    """Leave to the text around the run: blank edges; weak lines that touch new text (a brace
    closing the user's own code, a fence opening it); and headings at its end, which
    introduce what follows ("## History of the bug:"), not the history before them."""
    changed = True
    while changed and start < end:
        changed = False
        first = lines[start]
        if first.kind is _Kind.BLANK or (
            first.weak and start > 0 and lines[start - 1].kind is _Kind.NEW
        ):
            start += 1
            changed = True
        if start == end:
            break
        last = lines[end - 1]
        if (
            last.kind is _Kind.BLANK
            or (last.kind is _Kind.FRAMING and not _is_marker(last))
            or (last.weak and end < len(lines) and lines[end].kind is _Kind.NEW)
        ):
            end -= 1
            changed = True
    return start, end


def _is_history(run: Sequence[_Line], messages: Sequence[frozenset[str]], min_chars: int) -> bool:
    repeated = sum(len(line.norm) for line in run if line.strong)
    if repeated >= min_chars:
        return True
    framed = any(line.kind is _Kind.FRAMING or (line.labelled and line.strong) for line in run)
    if not framed:
        return False
    present = {line.norm for line in run if line.kind is _Kind.KNOWN}
    return any(message <= present for message in messages)


def _extend(lines: Sequence[_Line], remove: list[bool], start: int, end: int) -> None:
    """Take the framing that belongs to a passage with it: headings that introduce it
    ("Here is our conversation so far:"), and the markers between it and the new text
    ("=== NEW USER INPUT ===", a lone "User:"). A heading *after* it may introduce the new
    text ("History of the bug:"), so only markers are taken on that side."""
    i = start - 1
    while i >= 0 and not remove[i] and lines[i].kind in (_Kind.BLANK, _Kind.FRAMING):
        if lines[i].kind is _Kind.FRAMING:
            for k in range(i, start):
                remove[k] = True
        i -= 1
    j = end
    while j < len(lines) and not remove[j] and lines[j].kind in (_Kind.BLANK, _Kind.FRAMING):
        if lines[j].kind is _Kind.FRAMING:
            if not _is_marker(lines[j]):
                break
            for k in range(end, j + 1):
                remove[k] = True
        j += 1


def _is_marker(line: _Line) -> bool:
    text = _QUOTE.sub("", line.text.strip())
    return bool(
        (line.labelled and not line.norm)
        or _RULE.match(text)
        or _TURN_HEADER.match(text)
        or _DELIMITER.match(text)
    )


# -- the result ----------------------------------------------------------------------------


def _rebuild(lines: Sequence[_Line], remove: Sequence[bool]) -> str:
    n = len(lines)
    kept = [not remove[k] and lines[k].kind is not _Kind.BLANK for k in range(n)]
    kept_after = [False] * (n + 1)  # kept_after[k]: some kept text at k or later
    for k in range(n - 1, -1, -1):
        kept_after[k] = kept[k] or kept_after[k + 1]
    out: list[str] = []
    kept_before = False
    i = 0
    while i < n:
        if not remove[i]:
            out.append(lines[i].text)
            kept_before = kept_before or kept[i]
            i += 1
            continue
        j = i
        while j < n and remove[j]:
            j += 1
        framed = any(line.kind is _Kind.FRAMING or line.labelled for line in lines[i:j])
        if (kept_before and kept_after[j]) or (not framed and (kept_before or kept_after[j])):
            out.append(_reference(lines[i:j]))
        i = j
    return _tidy("\n".join(out))


def _reference(run: Sequence[_Line]) -> str:
    first = next((line for line in run if line.strong), None)
    if first is None:
        return "[earlier messages of this thread]"
    preview = " ".join(_QUOTE.sub("", first.text.strip()).split())
    match = _LABEL.match(preview)
    if match is not None:
        preview = preview[match.end() :]
    if len(preview) > REFERENCE_PREVIEW_CHARS:
        preview = preview[:REFERENCE_PREVIEW_CHARS].rstrip() + "..."
    return f'[earlier message of this thread: "{preview}"]'


def _tidy(text: str) -> str:
    """Blank lines left where passages were: at most one in a row, none at the edges."""
    return re.sub(r"\n[ \t]*(?:\n[ \t]*){2,}", "\n\n", text).strip()


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged
