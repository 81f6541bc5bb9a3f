"""What a user sees of a pipeline run in the MLflow UI (3.17), read from headless Chromium: the page the run
prints, the experiment's runs table with the pipeline's children, and MLflow's compare view of them.

The selectors are the UI's own test ids and component ids (mlflow/server/js: RunNameCellRenderer.tsx, the
assistant's chat panel), and the runs table is AG Grid's (a row per run under `row-id`, a cell per column
under `col-id`)."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any

from tests.helpers.browser import page_text, wait_until
from vfm.registry import model_name
from vfm.tracking import TRAINING_VIEW, ui_url

EXPAND = "button[data-component-id*='runnamecellrenderer']"  # the [+] before a parent run's name
CLOSE_ASSISTANT = "button[data-component-id='mlflow.assistant.chat_panel.close']"
GENAI_ONLY = ("Judges", "Sessions", "Prompts & versions")  # sidebar entries of the GenAI view, not of training


def compare_url(uri: str, experiment_id: str, run_ids: list[str]) -> str:
    q = urllib.parse.quote
    runs, experiments = q(json.dumps(run_ids)), q(json.dumps([experiment_id]))
    return f"{uri}/#/compare-runs?runs={runs}&experiments={experiments}&{TRAINING_VIEW}"


def _close_assistant(driver: Any) -> None:
    """The MLflow Assistant panel opens beside every page and covers a third of a screenshot."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, CLOSE_ASSISTANT):
        if button.is_displayed():
            button.click()


def _assert_training_view(driver: Any) -> None:
    text = page_text(driver)
    genai = [w for w in GENAI_ONLY if f"\n{w}\n" in text]
    assert not genai, f"the GenAI view (its {genai}) at {driver.current_url}:\n{text[:800]}"


def _cell(driver: Any, run_id: str, column: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"[row-id='{run_id}'] [col-id='attributes.`{column}`']").text.strip()


def _scrolled_lines(driver: Any, heading: str) -> set[str]:
    """Every line of the compare view's `heading` section. The metrics table is a react-virtualized grid that
    renders only the rows in its 300 px window, so the window is scrolled through and each position's rows kept."""
    from selenium.webdriver.common.by import By

    section = driver.find_elements(By.XPATH, f"//div[contains(@class, 'collapse-item')]"
                                             f"[.//*[normalize-space(text())='{heading}']]")[-1]
    grids = section.find_elements(By.CSS_SELECTOR, ".ReactVirtualized__Grid")
    lines: set[str] = set() if grids else set(section.text.splitlines())  # a plain table renders every row
    for grid in grids:
        height, window = driver.execute_script("return [arguments[0].scrollHeight, arguments[0].clientHeight]", grid)
        for top in [*range(0, max(height - window, 0), max(window // 2, 1)), height]:
            driver.execute_script("arguments[0].scrollTop = arguments[1]", grid, top)
            time.sleep(0.2)  # react-virtualized renders the new window on the next frame
            lines.update(grid.text.splitlines())
    return lines


def _section(text: str, heading: str, until: str) -> str:
    """The lines of the compare view between its `heading` line and its `until` line (the last such pair)."""
    m = list(re.finditer(rf"^{re.escape(heading)}\n(.*?)^{re.escape(until)}\n", text, re.M | re.S))
    assert m, f"the compare view has no {heading!r} section before {until!r}:\n{text[-3000:]}"
    return m[-1].group(1)


def check_pipeline_in_mlflow_ui(driver: Any, client: Any, run: Any, printed_url: str, shots: list[Path]) -> None:
    """The pipeline run `run` as the UI shows it; screenshots of the runs table and the compare view go to each
    folder in `shots` (mlflow-runs.png, mlflow-compare.png)."""
    from selenium.webdriver.common.by import By

    uri, exp_id, run_id = client.tracking_uri.rstrip("/"), run.info.experiment_id, run.info.run_id
    kids = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    names = {k.info.run_id: k.info.run_name for k in kids}
    assert kids and all(n and n.startswith(run.data.tags["vfm.recipe"]) for n in names.values()), names

    # 1. the address the run printed opens the run in the model-training view, not the GenAI one
    driver.get(printed_url)
    wait_until(driver, lambda: run.info.run_name in page_text(driver) and "Model registry" in page_text(driver),
               f"the run page of {run.info.run_name} in the Model training view")
    _assert_training_view(driver)
    _close_assistant(driver)

    # 2. the experiment's runs table: the parent expands to a row per child, each with its name, its datasets
    # (the training or evaluation manifest) and, for a training run, its exported model
    driver.get(ui_url(uri, exp_id))
    wait_until(driver, lambda: driver.find_element(By.CSS_SELECTOR, f"[row-id='{run_id}'] {EXPAND}"),
               f"the pipeline run {run_id} as a parent row").click()
    wait_until(driver, lambda: all(driver.find_elements(By.CSS_SELECTOR, f"[row-id='{k}']") for k in names),
               f"a row per child run: {sorted(names.values())}")
    for kid in kids:
        cid = kid.info.run_id
        datasets = [i.dataset.name for i in client.get_run(cid).inputs.dataset_inputs]
        assert datasets, f"{names[cid]} logged no dataset"
        shown = wait_until(driver, lambda cid=cid: _cell(driver, cid, "Dataset") not in ("", "-") and
                           _cell(driver, cid, "Dataset"), f"the Dataset cell of {names[cid]}")
        assert any(d in shown for d in datasets), (names[cid], shown, datasets)
        assert names[cid] in driver.find_element(By.CSS_SELECTOR, f"[row-id='{cid}'] [col-id='attributes.`Run Name`']").text
        if model_id := kid.data.tags.get("vfm.model_id"):  # the export; the UI names the registered one instead
            models = (client.get_logged_model(model_id).name, model_name(run.data.tags["vfm.recipe"]))
            wait_until(driver, lambda cid=cid, models=models: any(m in _cell(driver, cid, "Models") for m in models),
                       f"the Models cell of {names[cid]} naming one of {models}")
        source = kid.data.tags["mlflow.source.name"]  # "vfm finetune", "vfm eval", …
        assert source in _cell(driver, cid, "Source"), (names[cid], _cell(driver, cid, "Source"), source)
    for folder in shots:
        driver.save_screenshot(str(folder / "mlflow-runs.png"))

    # 3. MLflow's compare view of the children: readable run names, our metric names, the paper's claim.* tags
    driver.get(compare_url(uri, exp_id, list(names)))
    wait_until(driver, lambda: f"Comparing {len(names)} Runs" in page_text(driver) and "\nTags\n" in page_text(driver),
               f"the compare view of {len(names)} runs")
    _assert_training_view(driver)
    text = page_text(driver)
    details = _section(text, "Run details", "Parameters")
    assert all(n in details for n in names.values()), (sorted(names.values()), details[:2000])
    metrics = _scrolled_lines(driver, "Metrics")
    expected = {m for k in kids for m in k.data.metrics if not m.startswith("system/")}
    assert expected <= metrics, sorted(expected - metrics)
    tags = "\n".join(sorted(_scrolled_lines(driver, "Tags")))
    claims = {k: v for k, v in run.data.tags.items() if k.startswith("claim.")}
    assert claims and all(re.search(rf"^{re.escape(k)} {re.escape(v)}(?= |$)", tags, re.M) for k, v in claims.items()), \
        (claims, tags[:2000])
    driver.refresh()  # the screenshot with the tables at their top (the scrolled grids don't realign when set back)
    wait_until(driver, lambda: "\nTags\n" in page_text(driver), "the compare view again")
    heading = driver.find_element(By.XPATH, "//*[normalize-space(text())='Metrics'][not(ancestor::label)]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", heading)
    for folder in shots:
        driver.save_screenshot(str(folder / "mlflow-compare.png"))
