"""The MLflow UI in a real browser: a tiny `dvc repro`, then `mlflow server` on 127.0.0.1
against its store, driven by headless Chromium through Selenium.

A second execution, `dvc exp run -S sample.guidance=3` (training comes from DVC's cache),
gives a coursework comparison. Checks that the experiment's runs table shows the parent
runs with their stage runs nested under them, with the Dataset and Models columns filled;
that a training run's *Model metrics* tab draws the loss curve over many optimizer steps
and shows the sample grids logged during training (the step slider moves between them);
that the registered model's page lists its versions with their DVC experiment; and that
the two parent runs, compared, show params, final metrics and sample grids side by side.

Screenshots go to a temporary folder; set DDPM_SCREENSHOT_DIR (e.g. to
`reports`) to keep a copy. DDPM_UI_PROJECT=<folder> runs the same checks on a project
that has run the real pipeline instead of the tiny one (the second experiment is added
to it, and its workspace left at it): that is how the README's screenshots are made,

    DDPM_UI_PROJECT=/path/to/clone DDPM_SCREENSHOT_DIR=reports pytest tests/test_mlflow_ui.py
Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from mlflow.tracking import MlflowClient
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from conftest import MIRROR, ROOT, TINY_PIPELINE, clean_env, copy_project, run, tiny_raw
from ddpm_core.tracking import EXPERIMENT, ROLE_TAG

CHROMIUM = Path(os.environ.get("DDPM_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("DDPM_CHROMEDRIVER", "/usr/bin/chromedriver"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no MNIST mirror at {MIRROR}"),
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason=f"needs Chromium at {CHROMIUM} and its driver at {CHROMEDRIVER} "
        "(Debian: apt-get install chromium chromium-driver)",
    ),
]

STAGES = ["fetch_data", "train_uncond", "train_cond", "train_evaluator", "sample", "evaluate", "plot"]
EPOCHS = 2
SECOND = "guidance-3"  # the second experiment
WAIT = 60  # seconds; a loaded 2-core machine renders the UI slowly


# --- fixtures: pipeline, server, browser -------------------------------------------------


# A project that ran the real pipeline, to check and photograph instead of the tiny one.
REAL = Path(os.environ["DDPM_UI_PROJECT"]).resolve() if os.environ.get("DDPM_UI_PROJECT") else None


@pytest.fixture(scope="module")
def project(request, tmp_path_factory) -> Path:
    """A copy of the shared tiny pipeline (two epochs), or the DDPM_UI_PROJECT, then one
    experiment more that changes only the guidance: two parent runs to compare."""
    if REAL is not None:
        project = REAL
        client = MlflowClient(f"sqlite:///{project}/mlflow.db")
        experiment = client.get_experiment_by_name(EXPERIMENT)
        parents = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'pipeline'")
        if SECOND in {r.info.run_name for r in parents}:
            return project  # added by an earlier call
    else:
        assert tiny_raw(**TINY_PIPELINE)["epochs"] == EPOCHS
        project = copy_project(request.getfixturevalue("tiny_pipeline"), tmp_path_factory.mktemp("ui") / "project")
    run(["dvc", "exp", "run", "-n", SECOND, "-S", "sample.guidance=3"], project)
    return project


@pytest.fixture(scope="module")
def runs(project) -> dict:
    """Ids of the experiment, the parent runs and the stage runs of the first, from the store itself."""
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    first, second = client.search_runs(
        [experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'pipeline'", order_by=["attributes.start_time ASC"]
    )
    assert second.info.run_name == SECOND
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{first.info.run_id}'")
    return {
        "client": client,
        "experiment_id": experiment.experiment_id,
        "parent": first,
        "second": second,
        "children": {r.info.run_name: r.info.run_id for r in children},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(project, tmp_path_factory) -> str:
    """`mlflow server` on 127.0.0.1 over the project's store, as the README starts `mlflow ui`."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "mlflow-server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{project}/mlflow.db",
        "--artifacts-destination", str(project / "mlartifacts"),
        "--workers", "1",
    ]  # fmt: skip
    # No job runner: it would start a dozen worker processes that the UI pages here don't use.
    env = clean_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log_path.open("w") as log:
        # Its own process group, so that teardown stops uvicorn's worker with it.
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(url + "health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {WAIT} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group, then SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--no-first-run",
        "--disable-sync", "--disable-quic", "--window-size=1600,1500",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(WAIT)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go (the shared pipeline copy is only read)."""
    return tmp_path_factory.mktemp("screenshots")


def screenshot(driver: WebDriver, folder: Path, name: str) -> Path:
    path = folder / name
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    if os.environ.get("DDPM_SCREENSHOT_DIR"):
        keep = Path(os.environ["DDPM_SCREENSHOT_DIR"])
        keep = keep if keep.is_absolute() else ROOT / keep
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / name)
    return path


# --- page helpers -------------------------------------------------------------------


def wait(driver: WebDriver, condition, what: str, timeout: float = WAIT):
    """Poll `condition` until it is truthy. The UI re-renders cards as data arrives, so an
    element found a moment ago may be gone: that poll counts as not yet, and the next
    finds the page afresh."""
    return WebDriverWait(
        driver, timeout, poll_frequency=0.5, ignored_exceptions=(StaleElementReferenceException,)
    ).until(condition, f"after {timeout} s: {what}")


def visible_lines(driver: WebDriver) -> set[str]:
    return {line.strip() for line in driver.find_element(By.TAG_NAME, "body").text.splitlines()}


def close_assistant(driver: WebDriver) -> None:
    """A fresh profile opens the "MLflow Assistant" side panel; it hides half the page."""
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()


def chart_card(driver: WebDriver, title: str) -> WebElement | None:
    """The chart card titled `title`, scrolling the virtualised card grid until it renders."""
    for attempt in range(20):
        for card in driver.find_elements(By.CSS_SELECTOR, "[data-testid='experiment-view-compare-runs-card']"):
            if card.text.split("\n", 1)[0].strip() == title:
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
                return card
        at_end = driver.execute_script(
            """let el = document.querySelector("[data-testid='draggable-chart-cards-grid']");
            while (el && !(el.scrollHeight > el.clientHeight && /auto|scroll/.test(getComputedStyle(el).overflowY))) el = el.parentElement;
            if (!el || el.scrollTop + el.clientHeight >= el.scrollHeight) return true;
            el.scrollTop += el.clientHeight / 2; return false;"""
        )
        if at_end and attempt > 0:
            return None
        time.sleep(0.5)
    return None


def logged_grids(client: MlflowClient, run_id: str, folder: Path) -> dict[int, list[np.ndarray]]:
    """The run's "samples" grids as logged, by step: each step's PNG and the compressed
    WebP MLflow writes beside it for its UI, in grey levels."""
    grids: dict[int, list[np.ndarray]] = {}
    for artifact in client.list_artifacts(run_id, "images"):
        name = artifact.path.rsplit("/", 1)[-1]
        if name.startswith("samples+step+"):
            path = client.download_artifacts(run_id, artifact.path, str(folder))
            grey = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
            grids.setdefault(int(name.split("+")[2]), []).append(grey)
    return grids


def distances(shown: np.ndarray, grids: dict[int, list[np.ndarray]]) -> dict[int, float]:
    """Mean absolute grey-level difference (0-255) between the grid the browser shows and
    each logged step's, the logged one resized to the size shown; the nearer of PNG and WebP."""
    size = (shown.shape[1], shown.shape[0])
    return {
        step: min(
            float(np.abs(np.asarray(Image.fromarray(g).resize(size, Image.Resampling.BILINEAR)) - shown).mean())
            for g in variants
        )
        for step, variants in grids.items()
    }


# A grid the browser shows is the logged one when nearer to it than this, in grey levels:
# the same file decoded (WebP is lossy, and the UI may scale) differs by a few levels; the
# tiny run's grids at two steps differ by tens.
SAME_GRID = 6.0


def shown_grid(state: dict) -> np.ndarray | None:
    """The grey levels of the grid GRID_STATE drew from the card's <img>, if one was decoded."""
    if not state.get("pixels"):
        return None
    png = base64.b64decode(state["pixels"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)


def grid_at_step(driver: WebDriver, step: int, grids: dict[int, list[np.ndarray]]) -> dict | None:
    """One poll: the "samples" image card's slider one arrow key nearer to `step`, as a user
    would move it (it starts below the first step); once there, the grid the card shows,
    if it is the one logged at `step`: its distances to each step's; else None. The card's state
    is read in one script, which React cannot re-render halfway through; only the key press
    goes through WebDriver. The grid is told by its pixels, not its URL: MLflow 3.17 shows
    the artifact's URL, 3.18 an anonymous blob."""
    if chart_card(driver, "samples") is None:
        return None
    state = driver.execute_script(GRID_STATE, "samples")
    if state is None or state["now"] is None:
        return None
    if state["now"] != step:
        card = chart_card(driver, "samples")
        slider = card and card.find_element(By.CSS_SELECTOR, "[role='slider']")
        if slider:
            slider.send_keys(Keys.ARROW_RIGHT if state["now"] < step else Keys.ARROW_LEFT)
        return None
    shown = shown_grid(state)
    if shown is None:
        return None
    far = distances(shown, grids)
    if far[step] >= SAME_GRID or min(far, key=far.__getitem__) != step:
        return None  # still the previous step's grid, or one being decoded
    return far


def show_grid_at_step(driver: WebDriver, step: int, grids: dict[int, list[np.ndarray]], shots: Path, name: str) -> dict:
    """The shown grid's distances to each logged step's, once the card shows the grid of
    `step` (see grid_at_step); a timeout fails with what the card showed, and a screenshot."""
    what = f"the slider at step {step} and its sample grid shown"
    try:
        return wait(driver, lambda d: grid_at_step(d, step, grids), what)
    except TimeoutException:
        state = driver.execute_script(GRID_STATE, "samples") or {}
        shown = shown_grid(state)
        if shown is not None:
            far = {k: round(v, 1) for k, v in distances(shown, grids).items()}
            state["pixels"] = f"{shown.shape[::-1]} image, grey levels from each step's: {far}"
        shot = screenshot(driver, shots, f"timeout_{name}_step{step}.png")
        raise AssertionError(f"after {WAIT} s: {what}; the card showed {state}; see {shot}") from None


# The chart card titled arguments[0] (the scripts below start with it), or undefined.
FIND_CARD = """
const card = [...document.querySelectorAll("[data-testid='experiment-view-compare-runs-card']")]
  .find(c => c.innerText.split('\\n')[0].trim() === arguments[0]);"""

# The image card titled arguments[0] in one read, its scroll areas first scrolled to their end (the
# image loads only when in view): its slider's value and maximum, its images (decoded or
# not), and the first decoded one's pixels as a PNG data URL, drawn on a canvas.
GRID_STATE = (
    FIND_CARD
    + """
if (!card) return null;
for (const el of card.querySelectorAll('*'))
  if (el.scrollHeight > el.clientHeight + 2 && /auto|scroll/.test(getComputedStyle(el).overflowY)) el.scrollTop = el.scrollHeight;
const slider = card.querySelector("[role='slider']");
const imgs = [...card.querySelectorAll('img')];
const img = imgs.find(i => i.complete && i.naturalWidth > 0);
let pixels = null;
if (img) {
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  canvas.getContext('2d').drawImage(img, 0, 0);
  pixels = canvas.toDataURL('image/png');
}
return {
  now: slider ? Number(slider.getAttribute('aria-valuenow')) : null,
  max: slider ? Number(slider.getAttribute('aria-valuemax')) : null,
  images: imgs.map(i => `${i.complete && i.naturalWidth > 0 ? 'decoded' : 'loading'} ${decodeURIComponent(i.src).split('/').pop()}`),
  pixels: pixels,
};
"""
)

# The decoded <img> of the image card titled arguments[0], scrolled into view (for the README's screenshot).
SHOW_GRID = (
    FIND_CARD
    + """
const img = card && [...card.querySelectorAll('img')].find(i => i.complete && i.naturalWidth > 0);
if (img) img.scrollIntoView({block: 'end'});
return Boolean(img);
"""
)


# The x values plotly draws in the chart card titled arguments[0], or null before it has.
PLOT_X = (
    FIND_CARD
    + """
const plot = card && card.querySelector('.js-plotly-plot');
return plot && plot.data && plot.data[0] && plot.data[0].x && plot.data[0].x.length ? Array.from(plot.data[0].x) : null;
"""
)


# --- the tests ----------------------------------------------------------------------


def test_runs_table_shows_the_parent_runs_their_stage_runs_datasets_and_models(browser, server, runs, shots):
    if REAL is None:
        assert sorted(runs["children"]) == sorted(STAGES)
    else:  # stages whose outputs DVC had in its cache did not run
        assert {"train_uncond", "train_cond", "sample", "evaluate"} <= set(runs["children"]) <= set(STAGES)
    parent_name = runs["parent"].info.run_name
    # `#/experiments/<id>` opens the GenAI overview; the runs table is under /runs, and
    # workflowType=machine_learning switches the sidebar to "Model training".
    browser.get(f"{server}#/experiments/{runs['experiment_id']}/runs?workflowType=machine_learning")
    wait(
        browser,
        lambda d: {parent_name, SECOND} <= visible_lines(d),
        f"parent runs {parent_name!r} and {SECOND!r} in the runs table",
    )
    close_assistant(browser)
    assert "train_uncond" not in visible_lines(browser), "stage runs should be folded under their parent"
    # The Dataset column: the training set, with its split, subset and content digest.
    logged = runs["client"].get_run(runs["children"]["train_cond"]).inputs.dataset_inputs[0].dataset
    if REAL is None:
        assert logged.name == f"mnist-train[:{TINY_PIPELINE['data']['train_subset']}]"
    assert f"{logged.name} ({logged.digest})" in visible_lines(browser), "the Dataset column names the training set"

    expand = wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']"),
        "the expand buttons of the parent runs",
    )
    assert len(expand) == 2, "both parent runs have children"
    expand[-1].click()  # the first execution, listed last (newest first)
    wait(
        browser,
        lambda d: set(runs["children"]) <= visible_lines(d),
        f"stage runs {sorted(runs['children'])} under the parent",
    )
    lines = visible_lines(browser)
    # The Models column: each training run's logged model.
    assert {"ddpm-mnist-cond", "ddpm-mnist-uncond"} <= lines, "the Models column names the logged models"
    screenshot(browser, shots, "mlflow_ui_runs.png")


@pytest.mark.parametrize("stage", ["train_uncond", "train_cond"])
def test_model_metrics_show_the_loss_curve_per_step_and_the_grids_during_training(browser, server, runs, shots, stage):
    run_id = runs["children"][stage]
    client = runs["client"]
    browser.get(
        f"{server}#/experiments/{runs['experiment_id']}/runs/{run_id}/model-metrics?workflowType=machine_learning"
    )
    wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid='experiment-view-compare-runs-card']"),
        "chart cards",
    )
    close_assistant(browser)

    # The loss chart: a line over the optimizer steps of train.log_every, drawn by plotly.
    logged = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert len(logged) > EPOCHS
    wait(browser, lambda d: chart_card(d, "loss"), "the 'loss' chart card")
    # The card re-renders as data arrives: read its plotly data afresh each time.
    drawn = wait(browser, lambda d: d.execute_script(PLOT_X, "loss"), "the loss curve drawn")
    if len(logged) <= 320:
        assert drawn == logged, "the chart draws every logged point"
    else:  # a long run: the UI draws a sample of the points, first and last among them
        assert set(drawn) <= set(logged) and drawn[0] == logged[0] and drawn[-1] == logged[-1], drawn[:5]
    lines = wait(
        browser, lambda d: (card := chart_card(d, "loss")) and card.text.splitlines(), "the 'loss' chart's text"
    )
    assert "Step" in lines and f"{stage} (loss)" in lines
    for name in ("lr", "grad_norm", "images_per_s", "epoch_loss"):
        wait(browser, lambda d, name=name: chart_card(d, name), f"the {name!r} chart")

    # The sample grids: the "samples" image card, its slider over the steps they were logged at.
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    steps = sorted({int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png")})
    assert len(steps) >= 2, steps
    top = wait(
        browser,
        lambda d: (
            (card := chart_card(d, "samples"))
            and card.find_element(By.CSS_SELECTOR, "[role='slider']").get_attribute("aria-valuemax")
        ),
        "the 'samples' image card",
    )
    assert int(top) == steps[-1]
    grids = logged_grids(client, run_id, shots.parent / f"grids_{stage}")
    assert sorted(grids) == steps
    for step in steps:  # each step shows its own grid: the logged one, nearer than any other step's
        far = show_grid_at_step(browser, step, grids, shots, stage)
        assert far[step] < SAME_GRID and all(far[other] > far[step] for other in steps if other != step), far
    if stage == "train_cond":  # one grid row per digit: the README's picture, the last grid in view
        wait(browser, lambda d: chart_card(d, "samples") and d.execute_script(SHOW_GRID, "samples"), "the last grid")
        screenshot(browser, shots, "mlflow_ui.png")
    # System metrics are charted on their own tab.
    browser.get(
        f"{server}#/experiments/{runs['experiment_id']}/runs/{run_id}/system-metrics?workflowType=machine_learning"
    )
    assert "system/cpu_utilization_percentage" in client.get_run(run_id).data.metrics
    # The tab's "System metrics" section titles its charts without the "system/" prefix.
    wait(
        browser,
        lambda d: chart_card(d, "cpu_utilization_percentage") or chart_card(d, "system/cpu_utilization_percentage"),
        "the CPU utilisation chart",
    )


def test_registered_model_lists_its_versions_with_their_experiment(browser, server, runs, shots):
    client = runs["client"]
    versions = client.search_model_versions("name = 'ddpm-mnist-cond'")
    # The second experiment trained nothing (DVC's cache): one version, from the first.
    assert [int(v.version) for v in versions] == [1] and versions[0].run_id == runs["children"]["train_cond"]
    browser.get(f"{server}#/models/ddpm-mnist-cond")
    wait(browser, lambda d: "Version 1" in visible_lines(d), "the version list of ddpm-mnist-cond")
    close_assistant(browser)
    lines = visible_lines(browser)
    assert "ddpm.project" in lines and "dvc.experiment" in lines
    screenshot(browser, shots, "mlflow_ui_registry.png")


def test_two_parent_runs_compare_params_metrics_and_sample_grids_side_by_side(browser, server, runs, shots):
    first, second = runs["parent"], runs["second"]
    ids = f'["{first.info.run_id}","{second.info.run_id}"]'
    browser.get(f'{server}#/compare-runs?runs={ids}&experiments=["{runs["experiment_id"]}"]')
    wait(browser, lambda d: "Comparing 2 Runs from 1 Experiment" in visible_lines(d), "the compare page")
    close_assistant(browser)
    lines = visible_lines(browser)
    # Params side by side, the changed one with both values; the runs' final metrics.
    assert {first.info.run_name, SECOND, "sample.guidance 2.0 3.0"} <= lines, sorted(lines)[:80]
    at = browser.find_element(By.TAG_NAME, "body").text.splitlines().index("Metrics")
    # (the table draws the rows in view: the run's alphabetically first metric is one of them)
    first_metric = min(first.data.metrics)
    assert first_metric in browser.find_element(By.TAG_NAME, "body").text.splitlines()[at:], "the final metrics"
    # The sample grids of both runs, side by side: the file they have in common, previewed.
    entry = wait(
        browser,
        lambda d: d.find_elements(By.XPATH, "//*[normalize-space(text())='samples_cond.png']"),
        "samples_cond.png in the common artifacts",
    )
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", entry[-1])
    entry[-1].click()
    shown = """return [...document.querySelectorAll('img')].filter(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0).map(i => i.src)"""
    wait(browser, lambda d: len(set(d.execute_script(shown))) >= 2, "both runs' sample grids previewed")
    screenshot(browser, shots, "mlflow_ui_compare.png")
