"""The report's HTML building blocks (dynprobe.report._html) and the page around them (dynprobe.report._page),
read back with Python's HTML parser: run strings are escaped, numbers formatted or shown as a dash, figures
round-trip through base64, and every page is well formed."""
from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from dynprobe.report._html import esc, fmt, img, interval_text, json_text, missing, note, table
from dynprobe.report._page import nav, page

VOID = {"meta", "img", "br", "hr", "link", "input"}


class Tree(HTMLParser):
    """Checks that tags nest, and collects attributes and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.attrs: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.attrs.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> Tree:
    tree = Tree()
    tree.feed(text)
    tree.close()
    assert tree.errors == [] and tree.stack == [], (tree.errors, tree.stack)
    return tree


HOSTILE = """<script>alert("x")</script> & 'quoted'"""


def test_escaped_run_strings_read_back_as_themselves_and_open_no_tag():
    tree = parse(f"<p>{esc(HOSTILE)}</p>")
    assert "".join(tree.text) == HOSTILE and [tag for tag, _ in tree.attrs] == ["p"]
    assert '"' not in esc('"') and "'" not in esc("'")  # safe inside attributes too


def test_numbers_are_formatted_to_significant_digits_and_missing_ones_are_a_dash():
    assert [fmt(v) for v in (None, float("nan"), float("inf"), np.float32("nan"))] == ["—"] * 4
    assert fmt(1 / 3) == "0.3333" and fmt(123456.0) == "1.235e+05" and fmt(2.5, digits=2) == "2.5"
    assert fmt(np.float64(0.000123456)) == "0.0001235"
    assert fmt(7) == "7" and fmt("<b>") == "&lt;b&gt;"  # non-floats are escaped text


def test_a_figure_round_trips_its_png_through_base64_with_an_escaped_alt():
    png = bytes(range(256)) * 3
    tree = parse(img(png, HOSTILE, caption="C map"))
    (_, figure), (_, image), (_, _) = tree.attrs
    assert image["alt"] == HOSTILE
    assert base64.b64decode(image["src"].removeprefix("data:image/png;base64,")) == png
    assert "".join(tree.text) == "C map"
    assert [tag for tag, _ in parse(img(png, "x")).attrs] == ["figure", "img"]  # no empty caption


def test_a_table_has_one_row_per_list_and_one_cell_per_item():
    tree = parse(table(["a", "b"], [["1", "2"], ["3", "4"]]))
    assert [tag for tag, _ in tree.attrs] == ["table", "tr", "th", "th", "tr", "td", "td", "tr", "td", "td"]
    assert tree.text == ["a", "b", "1", "2", "3", "4"]
    assert [tag for tag, _ in parse(table(None, [["x"]])).attrs] == ["table", "tr", "td"]


def test_intervals_notes_and_json():
    assert [interval_text(i) for i in (None, (None, None), (10, None), (None, 20), (10, 20))] == [
        "—", "… – …", "10 – …", "… – 20", "10 – 20"]
    assert parse(missing("no kernel")).attrs == [("div", {"class": "missing"})]
    assert parse(note("intro")).attrs == [("p", {"class": "intro"})]
    value = {"ε": 1e-3, "path": Path("/r")}
    assert json.loads(json_text(value)) == {"ε": 0.001, "path": "/r"} and "ε" in json_text(value)


def test_the_page_is_well_formed_with_an_escaped_title_and_one_link_per_section():
    body = nav([("summary", "Summary"), ("chaos", HOSTILE)]) + '<h2 id="summary">Summary</h2>'
    tree = parse(page(HOSTILE, body))
    links = [a["href"] for tag, a in tree.attrs if tag == "a"]
    assert links == ["#summary", "#chaos"] and HOSTILE in tree.text and "<script>" not in page(HOSTILE, "")
