"""Rendering of report tables for the book, without a study: markdown text that shows as written, and wide HTML
tables that stay inside the content column (scrolling sideways there)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from ppcr import report
from ppcr.report.tables import Column, MeanStd, Table, markdown_text, to_html, to_markdown

RAW_TAG = re.compile(r"<[A-Za-z/][^>]*>")  # what a markdown renderer would take for an HTML tag


def test_markdown_text_escapes_angle_brackets_outside_code() -> None:
    assert markdown_text("where is <the expression>?") == "where is &lt;the expression&gt;?"
    assert markdown_text("run `ppcr predict --out <file>` then a < b") == \
        "run `ppcr predict --out <file>` then a &lt; b"
    assert markdown_text("plain") == "plain"


def test_status_caption_placeholder_is_not_an_html_tag_in_markdown() -> None:
    """The front page's caption ("where is <the expression>?") in the markdown the book includes."""
    table = Table(title="a <b>", columns=[Column("split", "dataset/split"), Column("v", "<v> mIoU")],
                  rows=[{"split": "synref/val", "v": 1.0}, {"split": "<x>", "v": None}],
                  caption="the LLaVA answering \u201cwhere is <the expression>?\u201d", notes=["<note>"])
    text = to_markdown(table)
    assert not RAW_TAG.search(text), text
    assert "\u201cwhere is &lt;the expression&gt;?\u201d" in text
    assert "where is <the expression>" in to_html(table).replace("&lt;", "<").replace("&gt;", ">")


def _wide_table(n: int) -> Table:
    columns = [Column("method", "Method"), Column("source", "source")]
    columns += [Column(f"c{i}", "Val", ("RefCOCO ~ synref", "mIoU")) for i in range(n)]
    rows = [{"method": "Absolute (PPCR \u2212 GLaMM-style)", "source": "reproduced (demo)",
             **{f"c{i}": MeanStd(55.123, 1.234, 2) for i in range(n)}},
            {"method": "LISA", "source": "paper", **{f"c{i}": 67.24 for i in range(n)}}]
    return Table(title="Table 1", columns=columns, rows=rows, caption="caption")


def test_wide_html_table_scrolls_inside_the_content_column() -> None:
    class Walk(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[tuple[str, dict]] = []
            self.table_parents: list[list[tuple[str, dict]]] = []

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.table_parents.append(list(self.stack))
            if tag not in ("br", "wbr", "img"):
                self.stack.append((tag, dict(attrs)))

        def handle_endtag(self, tag):
            while self.stack and self.stack.pop()[0] != tag:
                pass

    for table in (_wide_table(16), report.Table(title="", columns=[Column("a", "a")], rows=[{"a": 1}])):
        walk = Walk()
        text = table._repr_html_()
        walk.feed(text)
        (parents,) = walk.table_parents
        tag, attrs = parents[-1]  # the table sits in a box that scrolls sideways, styled inline and by class
        assert tag == "div" and "ppcr-scroll" in attrs["class"]
        assert "overflow-x:auto" in attrs["style"] and "max-width:100%" in attrs["style"]
        assert "div.ppcr-scroll{overflow-x:auto" in text
    wide = to_html(_wide_table(16))
    assert "scroll it sideways" in wide and "scroll it sideways" not in to_html(_wide_table(3))
    # "mean ± std" may break before the "±" only; a hyphenated word is kept whole; text wraps at spaces
    assert '<span class="nobr">55.12</span> <span class="nobr">\u00b1 1.23</span>' in wide
    assert 'Absolute (PPCR \u2212 <span class="nobr">GLaMM-style)</span>' in wide
    assert "white-space:nowrap}" not in report.TABLE_STYLE.split("span.nobr")[0]  # cells themselves may wrap
