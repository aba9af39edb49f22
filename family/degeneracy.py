"""Is a chat answer degenerate? The symptoms of a broken compressed member (issue 10), as text checks.

A member can keep most of its parent's next-token agreement on plain text and still answer chat
prompts with blank lines, `<unk> <unk>`, WikiText markup (`= = Heading = =`, ` @-@ `) or one word
over and over. Agreement figures average such failures away; these checks name them, so `family
eval` can record the share of degenerate answers and the registry can keep such a member from
routed traffic. The checks are deliberately coarse and conservative: a short, terse, list-shaped or
code answer from a small chat model must pass, because flagging a healthy member would take it out
of routing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Tokens the WikiText-2 preprocessing leaves in its text: section headings `= = Title = =`, and
# number/hyphen joins ` @-@ `, ` @,@ `, ` @.@ `; `@@` is the BPE continuation marker some tokenizers leak.
_WIKITEXT = re.compile(r"(?:^|\s)= =|\s@[-,.]@\s|@@")
_THREE_BLANK_LINES = re.compile(r"\n[ \t\r]*\n[ \t\r]*\n[ \t\r]*\n")  # three empty lines in a row
_WORD = re.compile(r"\S+")
_EDGE_PUNCT = "\"'`.,;:!?()[]{}<>*_-"

MAX_RUN = 6  # the same word this many times in a row is a loop, not emphasis ("very very very" is 3)
# A phrase of 2..MAX_PERIOD words said PHRASE_REPEATS times in a row, covering at least MIN_LOOP_WORDS
# words ("a lone leaf stands alone, a lone leaf stands alone, ..."): the commonest failure of a
# compressed member at temperature 0, and one the parent shows too, on a prompt or two.
PHRASE_REPEATS = 4
MAX_PERIOD = 16
MIN_LOOP_WORDS = 12
MIN_WORDS_FOR_VARIETY = 12  # texts this long need more than VARIETY_DISTINCT distinct words
VARIETY_DISTINCT = 3
MIN_CHARS_FOR_SYMBOLS = 20  # below this, a symbol-heavy answer ("4 + 4 = 8") is too short to judge
MIN_WORD_CHAR_SHARE = 0.35  # letters and digits among the non-space characters


def degenerate_reason(text: str) -> str | None:
    """Why `text` (a model's whole answer to a chat prompt) is degenerate, or None for a normal answer.

    Reasons are short ASCII phrases (they travel in HTTP headers and tables).
    """
    if not text.strip():
        return "empty answer"
    if "<unk>" in text:
        return "<unk> tokens"
    markup = _WIKITEXT.search(text)
    if markup:
        return f"WikiText markup ({markup.group().strip()!r})"
    if _THREE_BLANK_LINES.search(text):
        return "3+ consecutive blank lines"
    lines = text.strip().split("\n")
    blank = sum(1 for line in lines if not line.strip())
    if blank > len(lines) - blank:
        return f"more blank lines than text lines ({blank} vs {len(lines) - blank})"
    words = [_normal(w) for w in _WORD.findall(text)]
    run_word, run = _longest_run(words)
    if run >= MAX_RUN:
        return f"{run_word!r} repeated {run} times in a row"
    if loop := _phrase_loop(words):
        return loop
    if len(words) >= MIN_WORDS_FOR_VARIETY and len(set(words)) <= VARIETY_DISTINCT:
        return f"{len(words)} words but only {len(set(words))} distinct"
    visible = [c for c in text if not c.isspace()]
    if len(visible) >= MIN_CHARS_FOR_SYMBOLS:
        # Letters *and digits* count as text: "1, 2, 3, 5, 8, 13, 21" is a fine answer; punctuation soup is not.
        share = sum(c.isalnum() for c in visible) / len(visible)
        if share < MIN_WORD_CHAR_SHARE:
            return f"mostly symbols ({share:.0%} letters or digits)"
    return None


def degenerate_share(answers: Sequence[str]) -> tuple[float, list[int]]:
    """The fraction of `answers` that are degenerate, and their indices (to print examples)."""
    if not answers:
        raise ValueError("degenerate_share of no answers: there is no share to measure")
    bad = [i for i, a in enumerate(answers) if degenerate_reason(a) is not None]
    return len(bad) / len(answers), bad


def _normal(word: str) -> str:
    """Compare words case- and punctuation-blind ("The the, THE."), but keep pure punctuation as is."""
    return word.lower().strip(_EDGE_PUNCT) or word


def _longest_run(words: list[str]) -> tuple[str, int]:
    """The word repeated most times consecutively, among words with a letter or digit (runs of `|`
    or `-` are markdown tables and rules; symbol soup is caught by the character share)."""
    best, best_n, prev, n = "", 0, None, 0
    for w in words:
        n = n + 1 if w == prev else 1
        prev = w
        if n > best_n and any(c.isalnum() for c in w):
            best, best_n = w, n
    return best, best_n


def _phrase_loop(words: list[str]) -> str | None:
    """A phrase of p ≥ 2 words repeated PHRASE_REPEATS times back to back: p·(PHRASE_REPEATS − 1) words
    in a row each equal to the word p before it. The phrase must hold a letter or digit (a wide
    markdown table's `| --- |` cells repeat too)."""
    for p in range(2, MAX_PERIOD + 1):
        run = 0
        for i in range(p, len(words)):
            run = run + 1 if words[i] == words[i - p] else 0
            if run >= max((PHRASE_REPEATS - 1) * p, MIN_LOOP_WORDS) and any(c.isalnum() for w in words[i - p + 1 : i + 1] for c in w):
                return f"a {p}-word phrase repeated {run // p + 1} times in a row"
    return None
