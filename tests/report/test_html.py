"""report.html: one well-formed, self-contained page with the three plots of the report."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from allot import Budget, compress
from allot.report.html import REPORT_HTML
from allot.report.markdown import write_report
from allot.zoo import create_model

VOID = {"meta", "br", "img", "hr", "input", "link", "line", "rect", "circle", "polyline", "path"}


class Page(HTMLParser):
    """Checks that every element is closed in order, and records elements and references."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.open[-1] if self.open else 'nothing'}")
        else:
            self.open.pop()

    def tags(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [
            a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())
        ]


def _parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    assert not page.problems and not page.open, (page.problems, page.open)
    return page


def _self_contained(page: Page, text: str) -> None:
    assert not page.tags("script") and not page.tags("link") and not page.tags("img")
    for _, attrs in page.elements:
        for key, value in attrs.items():
            if key in ("src", "href") or (value or "").startswith(("http:", "https:", "//")):
                assert key == "xmlns", (key, value)  # the SVG namespace is a name, not a fetch
    assert "url(" not in text and "@import" not in text


@pytest.mark.parametrize(("method", "prediction"), [("cet", True), ("uniform-quant", False)])
def test_report_page_is_well_formed_self_contained_and_has_the_plots(
    digits, tmp_path, method, prediction
) -> None:
    budget = Budget("ratio", 4) if method == "cet" else Budget("bits", 4)
    result = compress(create_model("test-cnn"), digits, method, budget, progress=False)
    evaluation = {"float": {"accuracy": 0.9}, "compressed": {"accuracy": 0.89}}
    markdown = write_report(result.plan, evaluation, tmp_path)
    assert REPORT_HTML in markdown.read_text()
    text = (tmp_path / REPORT_HTML).read_text()
    assert text.startswith("<!DOCTYPE html>")
    page = _parse(text)
    _self_contained(page, text)
    assert len(page.tags("svg")) == (3 if prediction else 2)
    assert len(page.tags("rect", **{"class": "layer"})) == len(result.plan.layers)
    assert len(page.tags("circle", id="chosen")) == 1  # the chosen plan on the Pareto curve
    bars = page.tags("rect", **{"class": "check"})
    assert len(bars) == (4 if prediction else 0)  # predicted twice, measured twice
    assert ("No prediction check" in text) != prediction
    for layer in result.plan.layers:
        assert layer.scheme.label() in text


def test_text_from_the_plan_is_escaped(digits, tmp_path) -> None:
    result = compress(
        create_model("test-cnn"), digits, "uniform-quant", Budget("bits", 4), progress=False
    )
    result.plan.model = "<b>model & co</b>"
    write_report(result.plan, {"float": {"note": "<i>x</i>"}}, tmp_path)
    text = (tmp_path / REPORT_HTML).read_text()
    assert "<b>model" not in text and "&lt;b&gt;model &amp; co&lt;/b&gt;" in text
    _parse(text)
