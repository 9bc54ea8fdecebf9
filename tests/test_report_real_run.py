"""The report of a real run (the shared `small_run` of the built-in model), in files and in Chromium."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import XSS_QUESTION, quantcheck, read_results
from quantcheck.report.markdown import parse_md_table

CHROMIUM = Path("/usr/bin/chromium")


def number(cell: str) -> float:
    return float(re.search(r"[-+−]?\d+(?:\.\d+)?", cell).group(0).replace("−", "-"))


def test_markdown_verdict_table_carries_the_numbers_of_results_json(small_run):
    results = read_results(small_run)
    markdown = (small_run / "report.md").read_text()
    rows = {row[0]: row for row in parse_md_table(markdown, "Variant")}
    for model in results["models"][1:]:
        row = rows[model["name"]]
        assert row[1] == model["verdict"]["decision"]
        assert number(row[5]) == pytest.approx(model["agreement"]["kl"]["mean"]["value"], abs=5e-4)
        assert number(row[6]) == pytest.approx(100 * model["agreement"]["top1_agreement"]["value"], abs=0.05)
        assert number(row[3]) == pytest.approx(100 * model["paired_loglik"]["difference"], abs=0.05)


def test_report_command_rerenders_from_the_files_alone(small_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(small_run, copy)
    for name in ("report.html", "report.md", "metrics.csv"):
        (copy / name).unlink()
    shutil.rmtree(copy / "models")  # the report needs results.json, items.jsonl and dataset.jsonl only
    result = quantcheck("report", str(copy))
    assert result.returncode == 0, result.stderr
    assert (copy / "report.html").stat().st_size > 10_000
    assert (copy / "report.md").read_text() == (small_run / "report.md").read_text()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install chromium)")
def test_real_report_in_chromium(small_run, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        errors, dialogs = [], []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto((small_run / "report.html").resolve().as_uri())
        assert page.locator("#verdict").is_visible()
        assert page.locator("#verdict .card").count() == len(read_results(small_run)["models"]) - 1
        images = page.locator("#figures figure img")
        assert images.count() == 5
        for index in range(images.count()):
            images.nth(index).scroll_into_view_if_needed()
            assert images.nth(index).evaluate("image => image.complete && image.naturalWidth") > 0
        hostile = page.locator("#item-table .question", has_text="<script>alert(1)</script>")
        assert hostile.count() == 1 and XSS_QUESTION in hostile.inner_text()
        screenshot = Path(os.environ.get("QUANTCHECK_SCREENSHOT", tmp_path / "report.png"))
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 50_000
        browser.close()
    assert errors == [] and dialogs == []
