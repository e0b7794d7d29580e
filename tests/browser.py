"""The MLflow UI in a real browser: Debian's headless Chromium driven by Selenium through
Debian's chromedriver (both installed by `make setup`; nothing is downloaded at run time).

`check_run_in_ui` opens a run's metric charts, one of its attention heatmaps and its
registered model, waits until each has rendered, saves a screenshot of each and returns
what it saw. `open_link` opens a link attnpipe prints and `heatmap_card` measures what an
image card on a run's Model metrics tab shows. Run as a script, it does the same against a
work directory's store, e.g. the main job's, for the README's pictures:

    .venv/bin/python tests/browser.py --work-dir attnpipe-work --out docs/images
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.tracking import UI_VIEW  # the UI's model-training view, as attnpipe links it

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# No network beyond loopback: Chromium's own background connections are turned off.
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1600,1000",
)  # fmt: skip


@contextlib.contextmanager
def chromium(user_data_dir: Path) -> Iterator[Any]:
    """A headless Chromium session with an empty profile of its own."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        raise AssertionError(
            f"{', '.join(missing)} not found: `make setup` installs Debian's chromium and "
            "chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # a node React replaced while we read it
            if value := condition():
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the MLflow UI did not show {what} within {timeout:.0f} s")
        time.sleep(0.5)


def body_text(driver: Any) -> str:
    return str(driver.find_element("tag name", "body").text)


def sections(driver: Any) -> dict[str, int]:
    """The metric chart sections on a run's page: a name line, then its chart count "(N)"."""
    lines = body_text(driver).splitlines()
    return {
        name: int(count[1:-1])
        for name, count in itertools.pairwise(lines)
        if re.fullmatch(r"\(\d+\)", count)
    }


def close_side_panels(driver: Any) -> None:
    """The UI opens an assistant panel beside the page; close it for an uncluttered view."""
    for button in driver.find_elements("css selector", "button[aria-label='Close']"):
        with contextlib.suppress(Exception):
            if button.is_displayed():
                button.click()


def open_link(driver: Any, url: str, *shows: str) -> str:
    """Open `url` as a user would a link attnpipe printed; once the page shows every text in
    `shows`, its text."""
    driver.get(url)

    def showing() -> str:
        text = body_text(driver)
        return text if all(s in text for s in shows) else ""

    return str(wait_until(showing, f"{', '.join(shows)} at {url}"))


# The image card of `arguments[0]` on a run's Model metrics tab: its image, whether the
# browser decoded it, its rendered size, and how much of it shows (inside every clipping
# ancestor, the card's scrolling body included, and the window; not covered at the centre
# of that part). While the card shows no image yet: what it says instead.
CARD_IMAGE_JS = """
const key = arguments[0];
const card = [...document.querySelectorAll('[data-testid=experiment-view-compare-runs-card]')]
  .find(c => [...c.querySelectorAll('h4')].some(h => h.textContent.trim() === key));
if (!card) {  // cards render once scrolled to: scroll the charts on by half a page
  const grid = document.querySelector('[data-testid=draggable-chart-cards-grid]');
  for (let e = grid; e; e = e.parentElement) {
    if (/(auto|scroll)/.test(getComputedStyle(e).overflowY) && e.scrollHeight > e.clientHeight) {
      e.scrollBy(0, e.clientHeight / 2);
      break;
    }
  }
  return null;
}
card.scrollIntoView({block: 'start'});
const img = card.querySelector('img');
if (!img || !img.complete || !img.naturalWidth) return {text: card.innerText};
const r = img.getBoundingClientRect();
let [top, bottom, left, right] = [r.top, r.bottom, r.left, r.right];
for (let e = img.parentElement; e; e = e.parentElement) {
  const s = getComputedStyle(e);
  if (s.overflowX + s.overflowY !== 'visiblevisible') {
    const c = e.getBoundingClientRect();
    [top, bottom] = [Math.max(top, c.top), Math.min(bottom, c.bottom)];
    [left, right] = [Math.max(left, c.left), Math.min(right, c.right)];
  }
}
[top, bottom] = [Math.max(top, 0), Math.min(bottom, window.innerHeight)];
[left, right] = [Math.max(left, 0), Math.min(right, window.innerWidth)];
const shown = bottom > top && right > left;
const onTop = shown && document.elementFromPoint((left + right) / 2, (top + bottom) / 2) === img;
return {text: card.innerText, src: img.src, natural_width: img.naturalWidth,
        width: Math.round(r.width), height: Math.round(r.height),
        visible_width: shown ? Math.round(right - left) : 0,
        visible_height: shown ? Math.round(bottom - top) : 0, on_top: onTop};
"""


def heatmap_card(driver: Any, run_page: str, key: str) -> dict[str, Any]:
    """Open the Model metrics tab of `run_page` (a run's UI page) and measure the image card
    of `key` as it first shows (MLflow's default card: size, step, run details), once its
    image has loaded or it says there is none."""
    from selenium.webdriver.common.keys import Keys

    base, _, query = run_page.partition("?")
    driver.get(f"{base}/model-metrics" + (f"?{query}" if query else ""))
    close_side_panels(driver)
    search = wait_until(
        lambda: driver.find_element("css selector", "input[placeholder='Search metric charts']"),
        "the chart search box",
    )
    if search.get_attribute("value"):  # the UI keeps a search typed earlier: clear it
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(Keys.DELETE)
    driver.execute_script("document.querySelectorAll('*').forEach(e => { e.scrollTop = 0 })")

    def settled() -> dict[str, Any] | None:
        card = driver.execute_script(CARD_IMAGE_JS, key)
        if card and ("src" in card or "No image logged" in card["text"]):
            return dict(card)
        return None

    card = wait_until(settled, f"the image card {key}")
    time.sleep(1.0)  # the page settles (charts above it render, sections expand)
    return dict(driver.execute_script(CARD_IMAGE_JS, key) or card)


@dataclass
class Seen:
    chart_sections: dict[str, int] = field(default_factory=dict)
    charts: int = 0
    heatmap: str = ""
    heatmap_width: int = 0
    card: dict[str, Any] = field(default_factory=dict)
    model_text: str = ""
    screenshots: list[Path] = field(default_factory=list)


def image_key(path: str) -> str:
    """The key an image artifact was logged with (`mlflow.log_image(key=..., step=...)`
    writes images/<key, "/" as "~">+step+<step>+<time>+<id>.png)."""
    return path.rsplit("/", 1)[-1].split("+", 1)[0].replace("~", "/")


def check_run_in_ui(
    driver: Any,
    uri: str,
    experiment_id: str,
    run_id: str,
    heatmap_path: str,
    model_name: str,
    out: Path,
) -> Seen:
    seen = Seen()
    out.mkdir(parents=True, exist_ok=True)

    def shot(name: str) -> None:
        close_side_panels(driver)
        time.sleep(0.5)
        path = out / f"mlflow-{name}.png"
        driver.save_screenshot(str(path))
        seen.screenshots.append(path)

    run_page = f"{uri}/#/experiments/{experiment_id}/runs/{run_id}"
    view = f"?{UI_VIEW}"  # the UI's model-training view, as attnpipe's links open it
    # 1. The metric charts: Plotly charts grouped by metric prefix (train/, val/)
    driver.get(f"{run_page}/model-metrics{view}")
    wait_until(lambda: "train" in sections(driver), "the train/ chart section")
    scroll = (
        "document.querySelectorAll('*').forEach(e => {"
        " if (e.scrollHeight > e.clientHeight + 50) e.scrollTop = e.scrollHeight })"
    )

    def val_section() -> bool:
        driver.execute_script(scroll)  # sections below the fold render once scrolled to
        return "val" in sections(driver)

    wait_until(val_section, "the val/ chart section")
    seen.charts = wait_until(
        lambda: len(driver.find_elements("css selector", ".js-plotly-plot svg.main-svg")),
        "a rendered metric chart",
    )
    seen.chart_sections = sections(driver)
    search = driver.find_element("css selector", "input[placeholder='Search metric charts']")
    search.send_keys("loss")  # the picture: train/loss and val/loss side by side
    wait_until(lambda: sections(driver).get("train") == 1, "the charts filtered to loss")
    header = driver.find_element("xpath", "//*[normalize-space(text())='train']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", header)
    shot("metrics")
    # 2. An attention heatmap: its image card as the Model metrics tab first shows it (what
    # it shows is returned, not judged), then the image itself from the run's artifacts
    seen.card = heatmap_card(driver, f"{run_page}{view}", image_key(heatmap_path))
    driver.get(f"{run_page}/artifacts/{heatmap_path}{view}")

    def rendered_heatmap() -> int:
        for img in driver.find_elements("css selector", "img[src^='blob:']"):
            width = driver.execute_script(
                "return arguments[0].complete ? arguments[0].naturalWidth : 0", img
            )
            if width:
                return int(width)
        return 0

    seen.heatmap_width = wait_until(rendered_heatmap, "the heatmap image")
    seen.heatmap = heatmap_path
    shot("heatmap")
    # 3. The registered model, its versions and aliases
    driver.get(f"{uri}/#/models/{model_name}{view}")
    wait_until(lambda: "@ champion" in body_text(driver), f"{model_name}'s champion alias")
    seen.model_text = body_text(driver)
    shot("model")
    return seen


def main() -> None:
    """Screenshots of a work directory's latest run that logged heatmaps."""
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import tracking_uri
    from pipeline.tracking.server import MlflowServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("attnpipe-work"))
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--model", help="registered model (default: the run's)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="attnpipe-ui-"))
    server = MlflowServer(
        scratch / "server",
        store_uri=tracking_uri(None, args.work_dir),
        artifacts=args.work_dir / "mlartifacts",
    )
    server.start()
    try:
        client = MlflowClient(server.uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        for run in client.search_runs(experiments, order_by=["attributes.start_time DESC"]):
            images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
            heatmaps = sorted(p for p in images if p.endswith(".png"))
            versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
            if heatmaps and (versions or args.model):
                break
        else:
            raise SystemExit(f"{args.work_dir}: no run with heatmaps and a registered model")
        name = args.model or versions[0].name
        with chromium(scratch / "profile") as driver:
            seen = check_run_in_ui(
                driver, server.uri, run.info.experiment_id, run.info.run_id,
                heatmaps[-1], name, args.out,
            )  # fmt: skip
        for path in seen.screenshots:
            print(path)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
