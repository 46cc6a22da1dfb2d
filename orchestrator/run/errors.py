"""What went wrong inside Ray, in one line."""
from __future__ import annotations

import re


def cause_line(err: BaseException) -> str:
    """The user-facing cause of a failure inside Ray (a Ray Data job, a Tune experiment).
    Ray wraps the original exception in layers whose own messages say nothing about it,
    so search the whole chain's text for the original `SomeError: message` line (a
    corrupt image's DataError, a full disk's OSError)."""
    texts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    for text in texts:
        for line in reversed(text.splitlines()):
            match = re.match(r"^\s*(?:[\w.]+\.)?(\w*Error|\w*Exception): (.+)$", line)
            if match and not match.group(1).startswith(("Ray", "UserCode")):
                return f"{match.group(1)}: {match.group(2)}"
    lines = [line for line in texts[0].strip().splitlines() if line.strip()] if texts else []
    return lines[-1] if lines else "unknown error"
