"""The report's words (dynprobe.report._text): well-formed HTML fragments, plain language in the section openings
and the glossary (the paper's equation and figure numbers only in the reference part), which names every
quantity's equation."""
from __future__ import annotations

import re
from html.parser import HTMLParser

from dynprobe.report._text import GLOSSARY, INTROS, PAPER, REFERENCE, WHAT_IS_THE_TRANSITION


def unbalanced_tags(fragment: str) -> list[str]:
    stack: list[str] = []
    errors: list[str] = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            stack.append(tag)

        def handle_endtag(self, tag):
            if not stack or stack.pop() != tag:
                errors.append(tag)

    Parser().feed(fragment)
    return errors + stack


def every_fragment() -> dict[str, str]:
    return {"transition": WHAT_IS_THE_TRANSITION, "reference": REFERENCE, "paper": PAPER,
            **{f"intro {k}": v for k, v in INTROS.items()}, **{f"glossary {t}": d for t, d in GLOSSARY}}


def test_every_fragment_is_well_formed_html():
    for name, fragment in every_fragment().items():
        assert unbalanced_tags(fragment) == [], name
        assert "&" not in re.sub(r"&\w+;", "", fragment), name  # a bare ampersand would be an HTML error


def test_openings_and_glossary_speak_plainly_and_the_reference_holds_the_paper_numbers():
    paper_numbers = re.compile(r"\beq\.|\bFig\.|\(\d\)|Finding I|Conjecture")
    for name, fragment in every_fragment().items():
        if name not in ("reference", "paper"):
            assert not paper_numbers.search(fragment), (name, paper_numbers.search(fragment).group())
    for quantity, equation in (("parameter dissimilarity C", 1), ("neural tangent kernel H", 3),
                               ("kernel distance S", 4), ("loss barrier B", 5), ("disagreement rate D", 6)):
        assert f"{quantity}, eq. ({equation})" in REFERENCE


def test_the_glossary_defines_each_term_once_and_the_sections_each_have_an_opening():
    terms = [term for term, _ in GLOSSARY]
    assert len(terms) == len(set(terms))
    assert {"C", "S", "D", "ghost", "transition", "B_linear"} <= set(terms)
    assert set(INTROS) == {"summary", "training", "chaos", "trajectory", "cone", "layers", "switching", "evidence",
                           "configuration"}
    assert all(text.strip().endswith((".", ".</p>")) for text in INTROS.values())
