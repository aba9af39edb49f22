"""Degenerate chat answers (issue 10) are named; the ordinary answers of a small chat model are not."""

from __future__ import annotations

import pytest

from family.degeneracy import degenerate_reason, degenerate_share

DEGENERATE = {
    "forty blank lines": ("\n" * 40, "empty"),
    "blank lines after a word": ("Paris" + "\n" * 12, "blank lines"),
    "three blank lines in a row": ("The answer is\n\n\n\nforty-two.", "blank lines"),
    "more blank lines than text": ("A\n\n\nB\n\n\nC", "more blank lines"),
    "unk tokens": ("<unk> <unk> <unk>", "<unk>"),
    "unk inside text": ("The capital is <unk> .", "<unk>"),
    "wikitext heading": ("= = = = = =", "WikiText"),
    "wikitext section": (" = = Early life = = \n He was born in 1901 .", "WikiText"),
    "wikitext number join": ("It was 1 @,@ 000 km long and 3 @.@ 5 m wide", "WikiText"),
    "wikitext hyphen join": ("a two @-@ year contract", "WikiText"),
    "bpe markers": (" @@@ @@ @@ @@ . <@@ @@ @@ .", "WikiText"),
    "one word looping": ("the the the the the the the", "repeated 7 times"),
    "a loop with case and punctuation": ("I think The the, THE. the the the!", "repeated 6 times"),
    "few distinct words": ("yes no yes no yes no yes no yes no yes no", "only 2 distinct"),
    "empty": ("", "empty"),
    "whitespace": ("  \t \n ", "empty"),
    "punctuation soup": (". , . ; ( ) . , . . ; : - . , ( ) . , ; a", "symbols"),
    # Phrase loops, as compressed members answered at temperature 0:
    "a line looping": ("In the autumn, a lone leaf stands alone,\n" + "A lone leaf stands alone,\n" * 4, "5-word phrase repeated"),
    "a sentence looping": ("I'm so glad you're so happy to have you visit me. " * 4, "11-word phrase repeated 4 times"),
    "a query looping": ("SELECT * FROM users WHERE users_id = 1;\n\n" * 4, "phrase repeated"),
    "a two-word loop": ("In the heart of the cat lies love. " + "A cat, " * 8, "2-word phrase repeated"),
}

NORMAL = {
    "one word": "Tokyo.",
    "one sentence": "The capital of Japan is Tokyo.",
    "a number": "4",
    "arithmetic": "2 + 2 = 4",
    "a list": "1. Apples\n2. Pears\n3. Plums",
    "a bullet list": "Here are three fruits:\n- Apples\n- Pears\n- Plums",
    "python in a fence": "Sure! Here is a function:\n\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\n",
    "javascript": "```js\nconst xs = [1, 2, 3].map((x) => x * 2);\nconsole.log(xs);\n```",
    "a haiku": "An old silent pond\nA frog jumps into the pond\nSplash! Silence again.",
    "a phrase three times": "Hello! Hello! Hello! How can I help you today?",
    "a song that repeats": "Row, row, row your boat, gently down the stream. Merrily, merrily, merrily, merrily, life is but a dream.",
    "two paragraphs": "Photosynthesis turns light into sugar.\n\nPlants use it to grow and release oxygen.",
    "a counting answer": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "emphasis": "That is very very very good news!",
    "a markdown table": "| Fruit | Colour |\n| --- | --- |\n| Apple | Red |\n| Pear | Green |",
    "an equation": "E = mc^2, where c is the speed of light.",
    "trailing newline": "Yes, it is.\n",
    "a chorus twice": "We will, we will rock you. We will, we will rock you.",
    "a phrase three times in a row": "Practice, practice, practice: that is how you get to Carnegie Hall, my friend, and nothing else.",
    "a list with a repeated stem": "- Drink water.\n- Drink tea.\n- Drink milk.\n- Drink juice.\n- Drink soup.",
    "a wide markdown table": "| Day | Mon | Tue | Wed | Thu | Fri | Sat |\n| --- | --- | --- | --- | --- | --- | --- |\n| Rain | none | light | none | heavy | none | light |",
    "three steps that start alike": "Step 1: mix the flour. Step 2: add the eggs. Step 3: bake for twenty minutes. Step 4: let it cool.",
}


@pytest.mark.parametrize("text, why", DEGENERATE.values(), ids=DEGENERATE.keys())
def test_degenerate_answers_are_named(text, why):
    reason = degenerate_reason(text)
    assert reason is not None and why in reason
    assert reason.isascii()  # reasons travel in HTTP headers


@pytest.mark.parametrize("text", NORMAL.values(), ids=NORMAL.keys())
def test_ordinary_answers_of_a_small_chat_model_pass(text):
    assert degenerate_reason(text) is None


def test_degenerate_share_counts_answers_and_says_which():
    answers = ["Tokyo.", "\n" * 40, "1. Apples\n2. Pears", "<unk> <unk>"]
    assert degenerate_share(answers) == (0.5, [1, 3])
    assert degenerate_share(["Tokyo."]) == (0.0, [])
    with pytest.raises(ValueError):
        degenerate_share([])
