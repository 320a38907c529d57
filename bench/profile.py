"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) as text.

Each line of the raw file is ``frame;frame;...;leaf count``, root first. The summary lists the
functions (line numbers merged) holding the most samples by self time (the leaf) and by
inclusive time (anywhere on the stack), as shares of all on-CPU samples.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def summarize(raw: Path, top: int = 25) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # "function (file:line)" -> "function (file)": one entry per function, not per line.
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        total += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return f"{raw}: no samples\n"
    out = [f"{total} samples from {raw}", "", f"Top {top} by self time:"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in self_time.most_common(top)]
    out += ["", f"Top {top} by inclusive time:"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"
