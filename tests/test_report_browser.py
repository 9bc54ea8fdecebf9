"""report.html in a real (headless) Chromium: no console errors, images load, no script injection,
and the "only differing items" filter shows the expected rows.

Uses the system Chromium (/usr/bin/chromium, Debian package `chromium`); playwright never downloads
a browser here. Set QUANTCHECK_SCREENSHOT=/path/shot.png to keep a full-page screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from quantcheck.report import render_report
from report_fixture import XSS_QUESTION_MARKER, build_partial_run_folder, build_run_folder

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install chromium)"
)


def expected_differing(run_dir: Path) -> tuple[int, dict[str, int]]:
    """From items.jsonl alone: (total items, items where each variant differs), and the union."""
    by_item: dict[str, dict[str, dict]] = defaultdict(dict)
    for line in (run_dir / "items.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            by_item[rec["item_id"]][rec["model"]] = rec

    def answers(rec: dict) -> tuple[str | None, str | None]:
        ll = rec.get("loglik")
        gen = rec.get("generative")
        return (ll["pred"] if ll else None, (gen["pred"] or "unparsable") if gen else None)

    per_variant: dict[str, set[str]] = defaultdict(set)
    for item_id, recs in by_item.items():
        ref = recs.get("reference")
        if ref is None:
            continue
        ref_ll, ref_gen = answers(ref)
        for model, rec in recs.items():
            if model == "reference":
                continue
            ll, gen = answers(rec)
            if (ref_ll and ll and ll != ref_ll) or (ref_gen and gen and gen != ref_gen):
                per_variant[model].add(item_id)
    counts = {m: len(ids) for m, ids in per_variant.items()}
    counts[""] = len(set().union(*per_variant.values())) if per_variant else 0
    return len(by_item), counts


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser, html_path: Path):
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    errors: list[str] = []
    dialogs: list[str] = []
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))

    def on_dialog(dialog) -> None:
        dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(html_path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, errors, dialogs


def _visible_rows(page) -> int:
    return page.locator("#item-table tbody tr:visible").count()


def test_report_in_chromium(browser, tmp_path: Path) -> None:
    run_dir = build_run_folder(tmp_path / "run")
    files = render_report(run_dir)
    page, errors, dialogs = _open(browser, files.html)

    # the verdict is on top and visible
    verdict = page.locator("#verdict")
    assert verdict.is_visible()
    assert page.locator("#verdict .headline").inner_text().startswith("Recommendation: ")
    assert page.locator("#verdict table.standings tbody tr").count() == 3
    assert page.locator("#verdict .card").count() == 3

    # every figure is there and decoded: the serve chart beside the recommendation, the others under Figures
    assert page.locator("#verdict #fig-serve img").count() == 1
    images = page.locator("#fig-serve img, #figures figure img")
    assert images.count() == len(files.figures) == 6
    for i in range(images.count()):
        img = images.nth(i)
        img.scroll_into_view_if_needed()
        assert img.is_visible()
        assert img.evaluate("el => el.complete && el.naturalWidth") > 0

    # screenshot for people to look at
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    if os.environ.get("QUANTCHECK_SCREENSHOT"):
        target = Path(os.environ["QUANTCHECK_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)

    # the injected question shows as text and runs nothing
    question = page.locator("#item-table .question", has_text=XSS_QUESTION_MARKER)
    assert question.count() == 1
    question.scroll_into_view_if_needed()
    assert question.is_visible()
    assert XSS_QUESTION_MARKER in question.inner_text()
    assert dialogs == []

    # the "only differing items" filter
    total, differing = expected_differing(run_dir)
    assert 0 < differing[""] < total  # the fixture must exercise the filter
    assert _visible_rows(page) == total
    page.locator("#only-diff").check()
    assert _visible_rows(page) == differing[""]
    assert page.locator("#item-count").inner_text() == f"showing {differing['']} of {total} items"
    for variant, count in differing.items():
        if variant:
            page.locator("#diff-variant").select_option(variant)
            assert _visible_rows(page) == count, variant
    page.locator("#diff-variant").select_option("")
    page.locator("#only-diff").uncheck()
    assert _visible_rows(page) == total

    # printing expands the generated texts and does not break the script
    page.emulate_media(media="print")
    page.evaluate("window.dispatchEvent(new Event('beforeprint'))")
    assert page.locator("#item-table details[open]").count() > 0

    assert dialogs == []
    assert errors == []
    page.close()


def test_partial_report_in_chromium(browser, tmp_path: Path) -> None:
    run_dir = build_partial_run_folder(tmp_path / "partial")
    files = render_report(run_dir)
    page, errors, dialogs = _open(browser, files.html)
    assert page.locator("#verdict").is_visible()
    missing = page.locator("#missing")
    missing.scroll_into_view_if_needed()
    assert missing.is_visible()
    assert "items.jsonl is missing" in missing.inner_text()
    for i in range(page.locator("figure img").count()):
        assert page.locator("figure img").nth(i).evaluate("el => el.naturalWidth") > 0
    assert errors == [] and dialogs == []
    page.close()
