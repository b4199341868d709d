"""The "did you mean" hint shared by every error about an unknown name or key."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when none is close. Besides
    spelling, a valid option contained in the word (lr_rate -> lr) counts as close."""
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if not close:
        close = sorted((o for o in options if o in word or word in o), key=len, reverse=True)[:1]
    return f" (did you mean '{close[0]}'?)" if close else ""

