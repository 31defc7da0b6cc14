"""Flower in a real headless Chromium: log in with basic auth, see the worker (with its device) and a
just-finished inference task (with its model id). Screenshots go to test-artifacts/."""

import base64
import shutil
import time

import pytest
import requests

from tests.support import ARTIFACTS, ManagedProcess, base_env, free_port, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs Debian's chromium and chromium-driver (scripts/test.sh installs them)",
    ),
]
USER, PASSWORD = "ops", "s3cret-flower"


@pytest.fixture(scope="module")
def flower(main_redis_url, main_worker):
    port = free_port()
    flower = ManagedProcess(
        "flower",
        base_env(main_redis_url, AETHERCORE_FLOWER_PORT=str(port), AETHERCORE_FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}"),
    )
    flower.spawn("flower")
    base = f"http://127.0.0.1:{port}"

    def up():
        assert flower.proc.poll() is None, flower.log()
        try:
            return requests.get(f"{base}/healthcheck", timeout=1).status_code in (200, 401)
        except requests.RequestException:
            return False

    wait_until(up, 60, 0.3, "Flower to listen")
    yield base
    flower.stop()


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def login(driver) -> None:
    """Basic auth as a browser sends it after the login prompt: an Authorization header on every request."""
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})


def page_shows(driver, url: str, needles: list[str], timeout: float = 45) -> str:
    deadline = time.monotonic() + timeout
    while True:
        driver.get(url)
        time.sleep(1.0)  # let the page's scripts fill the tables
        source = driver.page_source
        if all(n in source for n in needles) or time.monotonic() > deadline:
            return source


def test_flower_requires_login(flower):
    assert requests.get(f"{flower}/workers", timeout=5).status_code == 401
    assert requests.get(f"{flower}/workers", auth=(USER, PASSWORD), timeout=5).status_code == 200


def test_flower_lists_the_worker_and_a_finished_model_load(flower, browser, client, main_worker):
    """With AETHERCORE_TASK_EVENTS=control (the default) Flower shows the workers and the model loads and unloads;
    inference messages send no events (tests/unit/test_handlers.py checks both settings)."""
    login(browser)
    job = client.post("/models/tiny-mlp/load?wait=60").get_json()
    assert job["status"] == "succeeded", job

    source = page_shows(browser, f"{flower}/workers", [main_worker.name])
    browser.save_screenshot(str(ARTIFACTS / "flower-workers.png"))
    assert main_worker.name in source  # the worker's name carries its device: cpu.<pid>@<host>
    assert main_worker.name.startswith("cpu.")

    source = page_shows(browser, f"{flower}/tasks", ["aethercore.load_model", job["job_id"]])
    browser.save_screenshot(str(ARTIFACTS / "flower-tasks.png"))
    assert "aethercore.load_model" in source
    assert job["job_id"] in source and "tiny-mlp" in source
    assert "SUCCESS" in source
