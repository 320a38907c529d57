"""Phase 1 stripping and the budgeted history rebuild, on realistic prompts (pure functions:
what the server does with them end to end is in test_chat.py)."""

from __future__ import annotations

import pytest

from actors.conversation.embedded import strip_embedded_history
from actors.conversation.history import FileCopy, HistoryBudget, Turn, rebuild, tokens

QUESTION = "How should the upstream client in our trio service retry failed calls?"
ANSWER = """Use full-jitter exponential backoff, and honour Retry-After when the upstream sends it.
Keep the attempt count small (three is plenty) and never retry after streaming started.

```python
def delay(attempt: int) -> float:
    return random.uniform(0, min(cap, base * 2 ** attempt))
```

That keeps a thundering herd away and respects the provider's limits."""
STORED = [QUESTION, ANSWER]
NEW = "And should the circuit breaker wrap each attempt or the whole call?"


def strip(prompt: str, stored: list[str] = STORED, **kwargs: list[str]) -> str:
    return strip_embedded_history(prompt, stored, **kwargs).text


# -- formats callers use ----------------------------------------------------------------------


def test_the_seed_s_own_history_block_is_stripped() -> None:
    prompt = (
        "=== CONVERSATION HISTORY (CONTINUATION) ===\n"
        "Thread: 5d4c\nTool: chat\nTurn 2/20\n"
        "You are continuing this conversation thread from where it left off.\n\n"
        "Previous conversation turns:\n\n"
        f"--- Turn 1 (Claude) ---\n{QUESTION}\n\n"
        f"--- Turn 1 (GLM using chat via glm-4.6) ---\n{ANSWER}\n\n"
        "=== END CONVERSATION HISTORY ===\n\n"
        f"=== NEW USER INPUT ===\n{NEW}"
    )
    result = strip_embedded_history(prompt, STORED)
    assert result.text == NEW
    assert result.passages == 1
    assert result.removed_chars > len(ANSWER)


def test_a_labelled_transcript_is_stripped() -> None:
    prompt = f"Previous conversation:\n\n**User:** {QUESTION}\n\n**Assistant:** {ANSWER}\n\n{NEW}"
    assert strip(prompt) == NEW


def test_a_markdown_quoted_copy_is_stripped() -> None:
    quoted = "\n".join(f"> {line}" if line else ">" for line in ANSWER.splitlines())
    assert strip(f"Your previous answer:\n\n{quoted}\n\n{NEW}") == NEW
    # An introduction that is not a history heading stays, and the quote becomes a reference.
    assert strip(f"Here is what you told me:\n\n{quoted}\n\n{NEW}") == (
        "Here is what you told me:\n\n"
        '[earlier message of this thread: "Use full-jitter exponential backoff, and honour '
        'Retry-After..."]\n\n'
        f"{NEW}"
    )


def test_tagged_history_is_stripped() -> None:
    prompt = (
        f"<conversation_history>\nuser: {QUESTION}\nassistant: {ANSWER}\n"
        f"</conversation_history>\n{NEW}"
    )
    assert strip(prompt) == NEW


def test_an_unmarked_copy_of_the_last_answer_becomes_a_reference() -> None:
    # A bare quote next to a question may be what the question is about: a reference keeps
    # the question readable; the answer itself reaches the model through the history.
    assert strip(f"{ANSWER}\n\n{NEW}") == (
        '[earlier message of this thread: "Use full-jitter exponential backoff, and honour '
        f'Retry-After..."]\n\n{NEW}'
    )


def test_history_pasted_after_the_question_is_stripped_too() -> None:
    prompt = f"{NEW}\n\nFor reference, our chat so far:\nUser: {QUESTION}\nAI: {ANSWER}"
    assert strip(prompt) == NEW


def test_a_short_earlier_question_pasted_back_with_its_label_is_stripped() -> None:
    stored = ["Which rate limit applies per session?", "Requests per minute, and quotas."]
    prompt = "User: Which rate limit applies per session?\n\nAnd per provider?"
    assert strip(prompt, stored) == "And per provider?"


def test_edited_lines_inside_a_history_block_go_with_it() -> None:
    prompt = (
        "=== CONVERSATION HISTORY ===\n"
        f"{QUESTION}\n{ANSWER}\n"
        "(the assistant then asked whether to use a token bucket)\n"
        "=== END CONVERSATION HISTORY ===\n"
        f"{NEW}"
    )
    assert strip(prompt) == NEW


def test_files_count_as_history_inside_a_history_block_only() -> None:
    source = "\n".join(
        f"def handler_{i}(request):\n    return route(request, {i})" for i in range(12)
    )
    block = (
        f"=== CONVERSATION HISTORY ===\n--- Turn 1 ---\n{QUESTION}\n"
        f"=== FILES REFERENCED IN THIS CONVERSATION ===\n{source}\n=== END REFERENCED FILES ===\n"
        f"=== END CONVERSATION HISTORY ===\n{NEW}"
    )
    assert strip(block, [QUESTION, "short answer"], files=[source]) == NEW
    # Outside a block, a pasted file is the caller's input.
    assert strip(f"{source}\n\n{NEW}", [QUESTION, "short answer"], files=[source]) == (
        f"{source}\n\n{NEW}"
    )


# -- what must stay ---------------------------------------------------------------------------


def test_a_prompt_without_history_is_unchanged() -> None:
    result = strip_embedded_history(NEW, STORED)
    assert (result.text, result.changed) == (NEW, False)


def test_nothing_is_stripped_from_a_new_thread() -> None:
    prompt = f"User: {QUESTION}\nAssistant: {ANSWER}\n\n{NEW}"
    assert strip(prompt, []) == prompt


def test_a_sentence_quoted_inside_a_question_stays() -> None:
    prompt = (
        'You said "Keep the attempt count small (three is plenty) and never retry after '
        'streaming started." Why three and not five?'
    )
    assert strip(prompt) == prompt


def test_a_quoted_line_on_its_own_stays() -> None:
    prompt = (
        "About this:\n"
        "> Keep the attempt count small (three is plenty) and never retry after streaming "
        "started.\nWhy three?"
    )
    assert strip(prompt) == prompt


def test_a_long_quote_between_new_text_leaves_a_reference() -> None:
    prompt = f"Looking at your answer:\n\n{ANSWER}\n\nis the delay function right for attempt 0?"
    text = strip(prompt)
    assert text.startswith("Looking at your answer:\n\n[earlier message of this thread: ")
    assert text.endswith("is the delay function right for attempt 0?")
    assert "three is plenty" not in text


def test_new_code_next_to_history_keeps_its_braces_and_fences() -> None:
    stored = [
        "Show me a handler.",
        "```js\nfunction handler(req) {\n  return respond(req.body.items.map(toRow));\n}\n```\n"
        "The handler maps every item of the request body to a row before responding to it.\n"
        "Rows are built lazily, so a large body is never held twice in memory.",
    ]
    prompt = (
        "```js\nfunction handler(req) {\n  return respond(req.body.items.map(toRow));\n}\n```\n"
        "The handler maps every item of the request body to a row before responding to it.\n"
        "Rows are built lazily, so a large body is never held twice in memory.\n\n"
        "Now mine:\n```js\nfunction other(req) {\n  return 1;\n}\n```"
    )
    assert strip(prompt, stored) == (
        '[earlier message of this thread: "function handler(req) {"]\n\n'
        "Now mine:\n```js\nfunction other(req) {\n  return 1;\n}\n```"
    )


def test_a_history_heading_after_the_history_stays_with_the_new_text() -> None:
    prompt = f"{ANSWER}\n\n## History of the bug:\nIt started after the upgrade."
    assert strip(prompt).endswith('..."]\n\n## History of the bug:\nIt started after the upgrade.')


def test_a_delimited_block_that_is_not_this_thread_s_history_stays() -> None:
    other = (
        "=== CONVERSATION HISTORY ===\nUser: what is the capital of France?\n"
        "Assistant: Paris is the capital of France.\n=== END CONVERSATION HISTORY ===\n"
        "Summarise the conversation above."
    )
    assert strip(other) == other


def test_a_prompt_that_only_repeats_the_thread_is_left_empty() -> None:
    result = strip_embedded_history(f"User: {QUESTION}\nAssistant: {ANSWER}", STORED)
    assert result.text == ""


# -- the history rebuild --------------------------------------------------------------------

BIG = HistoryBudget(tokens=50_000, max_messages=20, message_tokens=10_000)


def _turns(n: int, size: int = 40) -> list[Turn]:
    return [Turn(i, f"q{i} " + "x" * size, f"a{i} " + "y" * size) for i in range(n)]


def test_history_is_chronological() -> None:
    history = rebuild(_turns(3), BIG)
    assert [m.content[:2] for m in history.messages] == ["q0", "a0", "q1", "a1", "q2", "a2"]
    assert [m.role for m in history.messages] == ["user", "assistant"] * 3
    assert (history.turns, history.omitted_turns) == (3, 0)


def test_the_oldest_turns_fall_out_of_the_token_budget() -> None:
    turns = _turns(10, size=400)  # about 100 tokens a message, 200 a turn
    history = rebuild(turns, HistoryBudget(tokens=650, max_messages=20, message_tokens=10_000))
    assert [m.content[:2] for m in history.messages] == ["q7", "a7", "q8", "a8", "q9", "a9"]
    assert history.omitted_turns == 7
    assert history.tokens <= 650


def test_the_message_budget_counts_messages() -> None:
    history = rebuild(_turns(10), HistoryBudget(tokens=50_000, max_messages=5, message_tokens=100))
    assert [m.content[:2] for m in history.messages] == ["q8", "a8", "q9", "a9"]


def test_a_long_message_is_cut_and_says_so() -> None:
    turn = Turn(0, "short question", "z" * 4000)
    history = rebuild([turn], HistoryBudget(tokens=50_000, max_messages=20, message_tokens=100))
    reply = history.messages[1].content
    assert reply.startswith("z" * 400)
    assert "cut here: about 900 more tokens" in reply
    assert tokens(reply) < 120


def test_files_newest_copy_wins_and_the_current_turn_s_copy_beats_all() -> None:
    turns = [
        Turn(0, "look", "ok", (FileCopy("a.py", "a v1"), FileCopy("b.py", "b v1"))),
        Turn(1, "changed", "ok", (FileCopy("a.py", "a v2"),)),
    ]
    sent = "\n".join(m.content for m in rebuild(turns, BIG).messages)
    assert "a v2" in sent
    assert "a v1" not in sent
    assert "b v1" in sent
    sent = "\n".join(m.content for m in rebuild(turns, BIG, current_files={"a.py"}).messages)
    assert "a v1" not in sent
    assert "a v2" not in sent


def test_a_file_that_does_not_fit_is_left_out_but_its_turn_stays() -> None:
    turns = [Turn(0, "look at this", "ok", (FileCopy("huge.log", "l" * 8000),))]
    history = rebuild(turns, HistoryBudget(tokens=500, max_messages=20, message_tokens=10_000))
    assert [m.content for m in history.messages] == ["look at this", "ok"]
    assert history.omitted_files == ["huge.log"]


@pytest.mark.parametrize("fence", ["```", "````"])
def test_a_file_is_fenced_so_that_its_content_cannot_close_the_fence(fence: str) -> None:
    turns = [Turn(0, "see", "ok", (FileCopy("doc.md", f"text\n{fence}\nmore"),))]
    content = rebuild(turns, BIG).messages[0].content
    assert content.startswith(f"File: doc.md\n{fence}`\n")
