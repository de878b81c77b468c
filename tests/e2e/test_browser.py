"""What a person sees, in a real browser (`make test-browser`): Debian's headless Chromium, driven by Selenium through
Debian's own chromedriver (no driver is ever downloaded), opens the MLflow UI of a report and the report's page.

The report is `make eval`'s code path (`recsys report`, here `pop` and a one-epoch 16-wide `sasrec` on a small
synthetic dataset, so the test takes about a minute) and the dashboard is `make mlflow-ui`'s (`recsys mlflow-ui`).
Checked: the experiment's runs table lists every run of the report, and its `test_ndcg_at_10` column (added through
the table's column selector, as a person would) shows each model's test NDCG@10 as the store has it; the champion's
registered-model page shows the `champion` alias on the version the registry gives it; `report.html` renders a
comparison row per model and every figure it embeds. Screenshots of the three pages are kept in `reports/browser/`
of the repository (outside the test's tmp dir on purpose: they are for people to look at)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from recsys.cli import main

from tests.conftest import REPO_ROOT
from tests.helpers import free_port, wait_until_up

pytestmark = pytest.mark.browser

SCREENSHOTS = REPO_ROOT / "reports" / "browser"
MODELS = ("pop", "sasrec")
NDCG = "test_ndcg_at_10"  # recsys.tracking's key for the test NDCG@10
WAIT = 60  # seconds for any page to show what is checked (two cores shared with everything else)


@contextmanager
def mlflow_ui(log: Path):
    """`recsys mlflow-ui` on a free port (its own session; one uvicorn worker and no job runner, which these pages
    do not use, to spare the two cores). Yields the base URL once /health answers; afterwards the dashboard is
    stopped by SIGTERM, as a service manager would, and must take its server's process group down with it."""
    port = free_port()
    env = dict(os.environ, MLFLOW_WORKERS="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "recsys", "mlflow-ui", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base, server, stopped = f"http://127.0.0.1:{port}", None, False
    try:
        wait_until_up(base, proc, 120, "the MLflow UI", log)
        # `recsys mlflow-ui` runs `mlflow ui` as its only child, in a session (and process group) of its own
        server = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
            deadline = time.monotonic() + 30
            while server is not None and time.monotonic() < deadline and not stopped:
                try:
                    os.killpg(server, 0)
                    time.sleep(0.5)
                except ProcessLookupError:
                    stopped = True
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if server is not None and not stopped:
            try:
                os.killpg(server, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert stopped, "SIGTERM to `recsys mlflow-ui` left the MLflow server's processes running"


@pytest.fixture
def driver(monkeypatch, caplog):
    """Headless Chromium through /usr/bin/chromedriver; skips only where Debian's chromium or its driver is absent
    (`make test-browser` installs both)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test-browser installs them)")
    pytest.importorskip("selenium", reason="the [browser] extra is not installed (make test-browser installs it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "1")  # should Selenium Manager ever run, it may not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    caplog.set_level(logging.DEBUG, logger="selenium.webdriver.common.driver_finder")
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        # the driver given is the one used: Selenium Manager (which downloads drivers and browsers) never ran
        assert "Skipping Selenium Manager" in caplog.text
        browser.set_page_load_timeout(WAIT)
        yield browser
    finally:
        browser.quit()


@contextmanager
def page(driver, name: str):
    """A screenshot of the page as it is when the block ends, passed or failed, in reports/browser/<name>.png."""
    from selenium.common.exceptions import WebDriverException

    passed = False
    try:
        yield
        passed = True
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        try:
            driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
        except WebDriverException:
            if passed:  # a browser that died must not hide why the block failed
                raise


def shown_equal(text: str, value: float) -> bool:
    """The number a page shows equals ``value`` up to the digits it shows."""
    digits = len(text.partition(".")[2]) if "e" not in text.lower() else 17
    return abs(float(text) - value) <= 0.5 * 10 ** -digits + 1e-15


def test_mlflow_ui_shows_runs_ndcg_and_champion_and_report_renders(driver, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    monkeypatch.chdir(tmp_path)
    assert main(["data", "build", "--dataset", "synthetic", "--set", "num_users=300", "--set", "num_items=120"]) == 0
    dataset = Path(capsys.readouterr().out.strip())
    assert main(["report", "--dataset", str(dataset), "--models", *MODELS, "--epochs", "1",
                 "--set", "sasrec.hidden_size=16"]) == 0
    name = json.loads((dataset / "manifest.json").read_text())["name"]

    # what the store holds, to compare the pages with
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(name).experiment_id
    runs = {r.info.run_id: r for r in client.search_runs([experiment])}
    names = {run_id: r.info.run_name for run_id, r in runs.items()}
    assert sorted(names.values()) == sorted([*MODELS, "report"])
    ndcg = {r.info.run_name: r.data.metrics[NDCG] for r in runs.values() if r.info.run_name in MODELS}
    champions = {}
    for model in MODELS:
        try:
            champions[model] = client.get_model_version_by_alias(f"recsys-{model}", "champion").version
        except Exception:
            pass
    assert len(champions) == 1
    (champion, version), = champions.items()
    version = str(version)
    wait = WebDriverWait(driver, WAIT, poll_frequency=0.5)

    with mlflow_ui(tmp_path / "mlflow-ui.log") as base:
        # MLflow 3 opens an experiment in its GenAI view; "Model training" (workflowType=machine_learning) lists runs
        with page(driver, "mlflow-runs"):
            driver.get(f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning")
            name_links = "[role=gridcell][col-id='attributes.`Run Name`'] a[href*='/runs/']"

            def shown_runs(d) -> dict[str, str]:
                return {link.get_attribute("href").rsplit("/runs/", 1)[1]: link.text
                        for link in d.find_elements(By.CSS_SELECTOR, name_links) if link.is_displayed()}

            wait.until(lambda d: shown_runs(d) == names)
            # the test NDCG@10 column, added through the column selector as a person would
            driver.find_element(By.CSS_SELECTOR, "[data-testid=column-selection-dropdown]").click()
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']")).send_keys(NDCG)
            wait.until(lambda d: d.find_element(
                By.XPATH, f"//*[@data-testid='column-selector-tree']//span[contains(@class, 'tree-title')]"
                          f"[normalize-space()='{NDCG}']")).click()
            driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']").send_keys(Keys.ESCAPE)
            for close in driver.find_elements(By.CSS_SELECTOR,
                                              "[data-component-id='mlflow.assistant.chat_panel.close']"):
                close.click()  # the assistant panel covers a quarter of the window; the screenshot wants the table

            def ndcg_cells(d) -> dict[str, object]:
                """run name → its cell in the NDCG@10 column (the grid splits a row between its pinned and
                scrolling parts; both carry the row's index)."""
                row_name = {}
                for link in d.find_elements(By.CSS_SELECTOR, name_links):
                    row = link.find_element(By.XPATH, "./ancestor::*[@role='row'][1]").get_attribute("row-index")
                    row_name[row] = link.text
                cells = {}
                for cell in d.find_elements(By.CSS_SELECTOR, f"[role=gridcell][col-id='metrics.`{NDCG}`']"):
                    row = cell.find_element(By.XPATH, "./ancestor::*[@role='row'][1]").get_attribute("row-index")
                    cells[row_name.get(row)] = cell
                return cells if set(MODELS) <= set(cells) and all(cells[m].text.strip() for m in MODELS) else {}

            cells = wait.until(ndcg_cells)
            for model in MODELS:
                driver.execute_script("arguments[0].scrollIntoView({block: 'nearest', inline: 'center'})",
                                      cells[model])
                assert cells[model].is_displayed()
                assert shown_equal(cells[model].text.strip(), ndcg[model]), (model, cells[model].text, ndcg[model])
            assert cells.get("report") is None or cells["report"].text.strip() in ("", "-")  # no metrics of its own

        # the registered model that won: its versions table shows the alias on the registry's champion version
        with page(driver, "mlflow-champion"):
            driver.get(f"{base}/#/models/recsys-{champion}")
            alias = wait.until(lambda d: next((e for e in d.find_elements(
                By.CSS_SELECTOR, "[role=row] [role=status][title=champion]") if e.is_displayed()), None))
            row = alias.find_element(By.XPATH, "./ancestor::*[@role='row'][1]")
            assert "champion" in alias.text
            assert row.find_element(By.XPATH, ".//a[starts-with(normalize-space(), 'Version')]").text.split() == \
                ["Version", version]

    # the report's page, opened from disk as a person would
    report = tmp_path / "reports" / name / "report.html"
    with page(driver, "report"):
        driver.get(report.as_uri())
        wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
        rows = driver.find_elements(By.XPATH, "//h2[normalize-space()='Comparison']/following-sibling::table[1]"
                                              "/tbody/tr/td[1]")
        assert [r.text for r in rows] == list(MODELS)
        images = driver.execute_script(
            "return [...document.images].map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width])")
        assert images and all(complete and natural > 0 and width > 0 for complete, natural, width in images), images
        # the whole page in one screenshot: a window as tall as the page and the browser's own frame
        height = driver.execute_script("return document.documentElement.scrollHeight + outerHeight - innerHeight")
        driver.set_window_size(1600, min(max(height, 1000), 8000))
    print(f"browser test: {time.monotonic() - started:.0f}s", file=sys.stderr)
