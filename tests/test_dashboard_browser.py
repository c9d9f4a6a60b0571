"""The dashboard in a real headless Chromium (Selenium): charts per model, live updates without reload."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest

from stream_app.monitor.dashboard import serve_in_thread
from stream_app.monitor.state import MonitorState, replay
from stream_app.monitor.windows import contribution
from tests.test_monitor import feed_reference_windows, metric_stream, record

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium and its driver: apt-get install -y chromium chromium-driver",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dashboard():
    state = MonitorState(topic="metrics-test")
    now = time.time()
    records = metric_stream("mf", n=200, drop_at=100, start=now - 300) + \
        metric_stream("pop", n=200, start=now - 300, recall=0.05, auc=0.7, seed=3)
    records.sort(key=lambda r: r["ts"])
    _, alerts = replay(records, state)
    assert len(alerts) == 1
    feed_reference_windows(state, records)  # what the faust tables would hand over
    for j in range(20):
        state.ingest_lag({"ts": now - 40 + 2 * j, "group": "workers", "topic": "events",
                          "partitions": {"0": 100 - 5 * j, "1": 50}, "total": 150 - 5 * j})
    port = free_port()
    server, thread = serve_in_thread(state, "127.0.0.1", port)
    try:
        yield state, f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # element not there yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def test_dashboard_renders_charts_and_updates_live(dashboard, browser, tmp_path):
    from selenium.webdriver.common.by import By

    state, url = dashboard
    browser.get(url)
    names = wait_until(lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".card .model-name")],
                       what="model cards")
    assert names == ["mf", "pop"]  # side by side, sorted
    for model in ("mf", "pop"):
        for chart in ("recall", "auc"):
            svg = browser.find_element(By.ID, f"chart-{chart}-{model}")
            assert svg.get_attribute("data-points") == "200"
            assert svg.find_elements(By.CSS_SELECTOR, "path.series"), f"no line in {chart} of {model}"
    assert browser.find_element(By.ID, "chart-eps").find_elements(By.CSS_SELECTOR, "path.series")
    # the lag chart: total and one line per partition, 20 samples each
    lag_chart = browser.find_element(By.ID, "chart-lag")
    assert lag_chart.get_attribute("data-points") == "60" and len(lag_chart.find_elements(By.CSS_SELECTOR, "path.series")) == 3
    assert "group workers on events" in browser.find_element(By.ID, "lag-title").text
    # the windowed aggregates: latest tumbling and hopping window per model
    keys = {(r.get_attribute("data-key"), r.get_attribute("data-kind"))
            for r in browser.find_elements(By.CSS_SELECTOR, "#windows tbody tr")}
    assert {("mf", "tumbling"), ("mf", "hopping"), ("pop", "tumbling"), ("pop", "hopping")} <= keys
    # the planted drop's alert: in the table and as a marker on mf's recall chart
    rows = browser.find_elements(By.CSS_SELECTOR, "#alerts tbody tr")
    assert len(rows) == 1 and "mf" in rows[0].text and "recall" in rows[0].text and "ADWIN" in rows[0].text
    assert browser.find_element(By.ID, "chart-recall-mf").find_elements(By.CSS_SELECTOR, ".alert-marker")
    wait_until(lambda: "live" in browser.find_element(By.ID, "status").text, what="the SSE stream")

    # a new metric record arrives: it shows up without a reload
    browser.execute_script("window.__no_reload = 'still here'")
    last_ts = state.series["pop"][-1]["ts"]
    state.ingest(record(last_ts + 1, model="pop", worker="w-1", recall=0.061, auc=0.71, events_seen=10**6))
    state.ingest(record(last_ts + 1, model="gru", worker="w-1", recall=0.3, auc=0.95, events_seen=10**6))
    wait_until(lambda: browser.find_element(By.ID, "chart-recall-pop").get_attribute("data-points") == "201",
               what="the new pop record on the chart")
    assert "0.0610" in browser.find_element(By.ID, "card-pop").text
    wait_until(lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".card .model-name")] == ["gru", "mf", "pop"],
               what="a card for the new model")
    # a lag sample and a window update arrive live too
    state.ingest_lag({"ts": time.time(), "group": "workers", "topic": "events", "partitions": {"0": 0, "1": 7},
                      "total": 7})
    wait_until(lambda: browser.find_element(By.ID, "chart-lag").get_attribute("data-points") == "63",
               what="the new lag sample on the chart")
    assert "now 7" in browser.find_element(By.ID, "lag-title").text
    start = float(int(last_ts + 100) // 10 * 10)
    state.put_windows([("tumbling", "model", "gru", start, contribution({"recall": 0.4321, "auc": 0.9}, 50))])
    row = wait_until(lambda: browser.find_element(By.CSS_SELECTOR, '#windows tr[data-key="gru"][data-kind="tumbling"]'),
                     what="the new window row")
    assert "0.4321" in row.text
    assert browser.execute_script("return window.__no_reload") == "still here"
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
