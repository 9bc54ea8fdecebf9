"""`report/html` directly: the per-item table (row order, which variant differs, the cut at max_rows and what the page
says about it), escaping of untrusted text, the row data the page's script parses, and inlined figures. A defect here
shows only in a browser, far from the numbers."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markupsafe import Markup

from quantcheck.analysis.recommend import recommend
from quantcheck.report.data import load_run
from quantcheck.report.html import MAX_ITEM_ROWS, data_uri, item_table, nobreak, render_html, variant_differs
from quantcheck.report.plots import FIGURES, model_colors
from quantcheck.schema.results import GeneratedAnswer, ItemRecord, LoglikAnswer
from report_fixture import DATASET, GEN_PRED, LOGLIK, XSS_QUESTION_MARKER, build_results, build_run_folder

IDS = [entry["item_id"] for entry in DATASET]


def expected_differs(variant: str) -> set[str]:
    """Written from the fixture's answers: another log-likelihood letter, or another parsed generated answer (an
    unparsable one counts as an answer) where both models generated."""
    ids = set()
    for index, item_id in enumerate(IDS):
        if LOGLIK[variant][index] != LOGLIK["reference"][index]:
            ids.add(item_id)
        elif variant in GEN_PRED:
            reference_gen, variant_gen = GEN_PRED["reference"][index], GEN_PRED[variant][index]
            if (reference_gen or "unparsable") != (variant_gen or "unparsable"):
                ids.add(item_id)
    return ids


class Page(HTMLParser):
    """What a browser would see: start tags with their attributes (entities decoded) and the text."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str]]:
        return [attrs for name, attrs in self.tags if name == tag]


def render(data) -> str:
    return render_html(data, {}, [], {}, model_colors(data.results, data.items))


@pytest.fixture
def data(tmp_path: Path):
    return load_run(build_run_folder(tmp_path / "run"))


def test_rows_follow_the_dataset_order_then_items_found_only_in_items_jsonl(data):
    """Rows come in dataset.jsonl's order whatever items.jsonl's; variants in results.json's order, then the rest."""
    data.items.reverse()
    only_here = ItemRecord(item_id="aaa-only-in-items", model="reference", answer="C")
    stray = ItemRecord(item_id=IDS[0], model="a-model-not-in-results", answer="B")
    data.items += [only_here, stray]
    table = item_table(data)
    assert [row.item_id for row in table.rows] == [*IDS, "aaa-only-in-items"]
    assert table.variants == ["int8-wo", "nf4", "a-model-not-in-results"]  # hqq-2bit failed: it has no items
    assert table.reference == "reference"
    last = table.rows[-1]
    assert (last.question, last.choices, last.answer) == ("", [], "C")
    first = table.rows[0]
    assert first.question == DATASET[0]["question"] and first.answer == DATASET[0]["answer"]
    assert first.choices == list(zip("ABCD", DATASET[0]["choices"]))


def test_a_variant_differs_where_its_loglik_or_parsed_generated_answer_is_not_the_references(data):
    """Each row lists the variants whose answer differs; their cells (never the reference's) are flagged."""
    table = item_table(data)
    for row in table.rows:
        assert row.differs == [name for name in ("int8-wo", "nf4") if row.item_id in expected_differs(name)]
        assert row.reference.differs is False and row.reference.pred == LOGLIK["reference"][IDS.index(row.item_id)]
        for cell in row.variants:
            assert cell.differs == (cell.model in row.differs)
            assert cell.pred == LOGLIK[cell.model][IDS.index(row.item_id)]
    assert table.n_differing == len(expected_differs("int8-wo") | expected_differs("nf4")) == 4
    unparsable = table.rows[IDS.index("mmlu-marketing-0003")]
    assert unparsable.reference.gen_pred == "unparsable" and unparsable.differs == ["int8-wo"]


def record(model: str, pred: str | None = "B", generated: str | None | bool = False) -> ItemRecord:
    rec = ItemRecord(item_id="q", model=model, answer="B")
    if pred is not None:
        rec.loglik = LoglikAnswer(pred=pred, correct=pred == "B", choice_logprobs=[-1.0, -0.5, -2.0, -3.0])
    if generated is not False:
        rec.generative = GeneratedAnswer(
            text="...", pred=generated, correct=generated == "B", new_tokens=3, seconds=0.1
        )
    return rec


def test_variant_differs_compares_only_answers_both_models_gave():
    """A missing record or an answer one side never gave is no difference; an unparsable answer is one."""
    reference = record("reference", "B", "B")
    assert variant_differs(reference, record("v", "C")) is True
    assert variant_differs(reference, record("v", "B", "A")) is True
    assert variant_differs(reference, record("v", "B", None)) is True  # unparsable vs "B"
    assert variant_differs(record("reference", "B", None), record("v", "B", None)) is False
    assert variant_differs(reference, record("v", "B")) is False  # the variant did not generate
    assert variant_differs(reference, record("v", None, "B")) is False  # no log-likelihood answer to compare
    assert variant_differs(None, record("v", "C")) is False
    assert variant_differs(reference, None) is False


@pytest.mark.parametrize(
    ("max_rows", "kept"),
    [
        (5, [0, 1, 3, 4, 5]),  # every differing row, then the first rows where none differs, in order
        (3, [1, 3, 4, 5]),  # the differing rows are kept even beyond max_rows
        (6, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_max_rows_cut_keeps_every_differing_row_and_the_first_others(data, max_rows, kept):
    """Beyond max_rows, rows where no variant differs are left out, the last of them first; the total is kept."""
    table = item_table(data, max_rows=max_rows)
    assert [row.item_id for row in table.rows] == [IDS[index] for index in kept]
    assert (table.total, table.n_differing, table.truncated) == (6, 4, max_rows < 6)


def test_the_page_says_how_many_items_it_lists_when_it_cuts(data):
    """Past MAX_ITEM_ROWS the page lists MAX_ITEM_ROWS rows and says how many of how many, and how many differ."""
    extra = MAX_ITEM_ROWS
    for index in range(extra):
        for model in ("reference", "int8-wo"):
            rec = record(model)
            rec.item_id = f"zz-extra-{index:04d}"
            data.items.append(rec)
    total = len(DATASET) + extra
    page = render(data)
    text = " ".join("".join(Page(page).text).split())
    assert f"4 of {total} items differ for at least one variant." in text
    assert f"Only {MAX_ITEM_ROWS} of {total} items are listed (every differing item is included)" in text
    rows = [attrs["data-item"] for attrs in Page(page).all("tr") if "data-item" in attrs]
    assert len(rows) == MAX_ITEM_ROWS
    assert rows[: len(IDS)] == IDS  # dataset rows, differing or not, come before the extras
    kept_extras = MAX_ITEM_ROWS - len(IDS)  # the last extras are the ones left out
    assert rows[len(IDS) :] == [f"zz-extra-{index:04d}" for index in range(kept_extras)]


def test_untrusted_text_is_escaped_and_row_data_stays_parseable_json(tmp_path):
    """A hostile question, generated text and variant name render as text; data-differs decodes to the names."""
    results, items = build_results()
    hostile = "int8'wo\"<b>x</b>"
    results.models[1].name = hostile
    results.recommendation = recommend(results)
    for rec in items:
        rec.model = hostile if rec.model == "int8-wo" else rec.model
    run = tmp_path / "run"
    build_run_folder(run)
    (run / "results.json").write_text(results.model_dump_json())
    (run / "items.jsonl").write_text("".join(rec.model_dump_json() + "\n" for rec in items))
    page = render(load_run(run))
    parsed = Page(page)
    assert XSS_QUESTION_MARKER not in page and "<img src=x" not in page and "<b>x</b>" not in page
    assert len(parsed.all("script")) == 1 and parsed.all("img") == []  # the page's own script; no figures given
    shown = "".join(parsed.text)
    assert DATASET[2]["question"] in shown  # as the user wrote it, once the browser decodes it
    assert "B <img src=x onerror=alert(2)> penetration pricing" in shown
    differs = {
        attrs["data-item"]: json.loads(attrs["data-differs"]) for attrs in parsed.all("tr") if "data-item" in attrs
    }
    renamed = {"int8-wo": hostile, "nf4": "nf4"}
    assert differs == {
        item_id: [renamed[name] for name in ("int8-wo", "nf4") if item_id in expected_differs(name)] for item_id in IDS
    }
    assert {attrs["data-col"] for attrs in parsed.all("th") if "data-col" in attrs} == {hostile, "nf4"}


def test_figures_are_inlined_as_data_uris_and_only_those_drawn(data, tmp_path):
    """Each drawn figure's PNG bytes are in its <img> as base64; the serve figure leads; undrawn ones are absent."""
    drawn = {}
    for key in ("serve", "kl"):
        drawn[key] = tmp_path / f"{key}.png"
        drawn[key].write_bytes(b"\x89PNG\r\n\x1a\n" + key.encode() * 50)
    page = render_html(data, drawn, FIGURES, {"Cost": "needs cost"}, model_colors(data.results, data.items))
    parsed = Page(page)
    figures = [attrs["id"] for attrs in parsed.all("figure")]
    assert figures == ["fig-serve", "fig-kl"]
    images = parsed.all("img")
    for key, attrs in zip(("serve", "kl"), images, strict=True):
        scheme, _, payload = attrs["src"].partition(",")
        assert scheme == "data:image/png;base64"
        assert base64.b64decode(payload, validate=True) == drawn[key].read_bytes()
        assert attrs["alt"] == next(spec.title for spec in FIGURES if spec.key == key)
    assert data_uri(drawn["kl"]) == images[1]["src"]


def test_nobreak_lets_a_number_wrap_only_before_a_bracket_and_escapes_it():
    """Spaces before "[" or "(" may break; none inside "[a, b]"; the text is escaped once, as Markup."""
    assert nobreak("+1.2 pts [-0.5, +2.9] (p 0.31)") == (
        '<span class="nw">+1.2 pts</span> <span class="nw">[-0.5, +2.9]</span> <span class="nw">(p 0.31)</span>'
    )
    assert nobreak("a<b & c") == '<span class="nw">a&lt;b &amp; c</span>'
    assert nobreak(0.5) == '<span class="nw">0.5</span>'
    assert isinstance(nobreak("x"), Markup)
