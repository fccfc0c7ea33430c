"""The operator page and the docs page in a real headless chromium, against a real gunicorn.

Needs Debian's chromium and chromium-driver (and selenium from the dev extra). Where they are
missing the tests skip, loudly; in CI (CI=true) they fail instead, as .ci/run installs them.
Set CONSOLE_SCREENSHOT=<path.png> to save the page as the approval test sees it (the README's
screenshot is made that way).
"""

from __future__ import annotations

import os
import shutil

import pytest
import requests

from tests.servers import Gunicorn, unavailable, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser]

USER, ADMIN = "user-secret", "admin-secret"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT = 20


def _browser_or_skip():
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER))
               if path is None]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium")
    if missing:
        unavailable(f"BROWSER TESTS SKIPPED: {', '.join(missing)} not installed",
                    required_by="CI")
    return webdriver


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("console")
    (directory / "metrics").mkdir()  # prometheus reads every *.db file there: its own only
    gunicorn = Gunicorn(env={"AGENTOS_DB": str(directory / "runs.db"),
                             "OS_SECURITY_KEY": USER, "OS_ADMIN_KEY": ADMIN,
                             "SCRIPTED_MODEL_LATENCY_MS": "1000",
                             "PROMETHEUS_MULTIPROC_DIR": str(directory / "metrics")},
                        workers=2).start()
    yield gunicorn
    gunicorn.stop()


@pytest.fixture(scope="module")
def browser():
    webdriver = _browser_or_skip()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-gpu", "--window-size=1400,1000", "--no-proxy-server"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def until(driver, condition, what: str):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page re-renders its tables as answers arrive: a row read mid-render is read again.
    return WebDriverWait(driver, WAIT, poll_frequency=0.1,
                         ignored_exceptions=[StaleElementReferenceException]).until(
        condition, message=what)


def sign_in(driver, base: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/console")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()  # the page starts without the previous test's credential
    field = driver.find_element(By.ID, "credential")
    field.send_keys(key)
    driver.find_element(By.ID, "sign-in").click()
    until(driver, lambda d: "Signed in" in d.find_element(By.ID, "whoami").text, "sign-in")


def paused_approval_run(base: str) -> dict:
    return requests.post(f"{base}/agents/approval-agent/runs", timeout=30,
                         headers={"Authorization": f"Bearer {USER}"},
                         data={"message": "web", "stream": "false"}).json()


def approval_row(driver, approval_id: str):
    from selenium.webdriver.common.by import By

    selector = f'#approvals tr[data-approval-id="{approval_id}"]'
    return until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, selector),
                 f"approval {approval_id} listed")[0]


def event_names(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [item.get_attribute("data-event")
            for item in driver.find_elements(By.CSS_SELECTOR, "#events li")]


def test_an_admin_approves_a_paused_run_with_a_note_and_sees_it_complete(server, browser):
    from selenium.webdriver.common.by import By

    waiting = paused_approval_run(server.url)  # stays pending: the list keeps showing it
    run = paused_approval_run(server.url)
    assert run["status"] == "PAUSED"
    approval_id = run["tools"][0]["approval_id"]
    sign_in(browser, server.url, ADMIN)
    row = approval_row(browser, approval_id)
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[:2] == ["approval-agent", "deploy_app"] and '"web"' in cells[2]
    row.find_element(By.CSS_SELECTOR, "input.note").send_keys("ship it")
    row.find_element(By.CSS_SELECTOR, "button.approve").click()
    until(browser, lambda d: d.find_element(By.ID, "run-status").text == "COMPLETED",
          "the run to complete on the page")
    until(browser, lambda d: "RunCompleted" in event_names(d), "RunCompleted listed")
    names = event_names(browser)
    assert names.index("RunPaused") < names.index("RunContinued") < names.index("RunCompleted")
    decisions = browser.find_element(By.ID, "tool-calls").text
    assert "confirmed (approved)" in decisions
    transcript = browser.find_element(By.ID, "transcript").text
    assert "Deployed: deployed web" in transcript
    approval = requests.get(f"{server.url}/approvals/{approval_id}", timeout=10,
                            headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert (approval["status"], approval["resolved_by"], approval["resolution_data"]) == (
        "approved", "admin-key", {"note": "ship it"})
    until(browser, lambda d: not d.find_elements(
        By.CSS_SELECTOR, f'#approvals tr[data-approval-id="{approval_id}"]'),
        "the approval to leave the pending list")
    approval_row(browser, waiting["tools"][0]["approval_id"])
    if os.environ.get("CONSOLE_SCREENSHOT"):
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(os.environ["CONSOLE_SCREENSHOT"])


def test_a_rejection_with_a_note_reaches_the_model_and_the_page(server, browser):
    from selenium.webdriver.common.by import By

    run = paused_approval_run(server.url)
    sign_in(browser, server.url, ADMIN)
    row = approval_row(browser, run["tools"][0]["approval_id"])
    row.find_element(By.CSS_SELECTOR, "input.note").send_keys("not on a Friday")
    row.find_element(By.CSS_SELECTOR, "button.reject").click()
    until(browser, lambda d: d.find_element(By.ID, "run-status").text == "COMPLETED",
          "the rejected run to complete on the page")
    assert "Not deployed: not on a Friday" in browser.find_element(By.ID, "transcript").text
    assert "rejected: not on a Friday" in browser.find_element(By.ID, "tool-calls").text


def test_a_user_key_sees_the_approval_but_no_approve_button(server, browser):
    from selenium.webdriver.common.by import By

    run = paused_approval_run(server.url)
    sign_in(browser, server.url, USER)
    row = approval_row(browser, run["tools"][0]["approval_id"])
    assert row.find_elements(By.TAG_NAME, "button") == []
    assert browser.find_elements(By.CSS_SELECTOR, "button.approve") == []
    assert browser.find_element(By.ID, "approvals-readonly").is_displayed()
    assert "read-only" in browser.find_element(By.ID, "whoami").text
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "filter-agent")).select_by_value("approval-agent")
    Select(browser.find_element(By.ID, "filter-status")).select_by_visible_text("PAUSED")
    browser.find_element(By.CSS_SELECTOR, "#run-filter button").click()
    row = f'#runs tr[data-run-id="{run["run_id"]}"]'

    def filtered(driver):
        agents = {r.find_elements(By.TAG_NAME, "td")[1].text
                  for r in driver.find_elements(By.CSS_SELECTOR, "#runs tbody tr")}
        statuses = {c.text for c in driver.find_elements(By.CSS_SELECTOR, "#runs td .status")}
        return driver.find_elements(By.CSS_SELECTOR, row) and statuses == {"PAUSED"} \
            and agents == {"approval-agent"}

    until(browser, filtered, "only paused approval-agent runs, this one among them")


def test_the_live_view_shows_the_events_of_a_run_as_it_executes(server, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, server.url, USER)
    with requests.post(f"{server.url}/agents/chat-agent/runs", stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {USER}"},
                       data={"message": "live"}) as started:
        run_id = started.headers["Location"].split("/runs/")[1].split("/")[0]
    browser.get(f"{server.url}/console#run=chat-agent/{run_id}")  # a link to the run
    until(browser, lambda d: d.find_element(By.ID, "run-id").text == run_id, "the run opened")
    at_open = event_names(browser)
    assert "RunCompleted" not in at_open, "the run ended before the page could follow it"
    until(browser, lambda d: "following" in d.find_element(By.ID, "live").text, "live mode")
    until(browser, lambda d: "RunCompleted" in event_names(d), "RunCompleted arriving live")
    names = event_names(browser)
    assert len(names) > len(at_open)
    assert names[0] == "RunStarted" and names[-1] == "RunCompleted"
    assert "RunContent" in names
    until(browser, lambda d: d.find_element(By.ID, "run-status").text == "COMPLETED",
          "the status to follow")


def test_the_docs_page_shows_every_operation_of_the_document(server, browser):
    from selenium.webdriver.common.by import By

    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    wanted = {(method.upper(), path) for path, item in document["paths"].items()
              for method in item if method in ("get", "post", "put", "patch", "delete")}
    browser.get(f"{server.url}/docs")

    def shown(driver):
        found = set()
        for block in driver.find_elements(By.CSS_SELECTOR, ".opblock"):
            method = block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text
            path = block.find_element(By.CSS_SELECTOR, ".opblock-summary-path")
            found.add((method.strip(), path.get_attribute("data-path")))
        return found if found >= wanted else None

    until(browser, shown, "every operation rendered")
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "Unable to render this definition" not in page
    assert wait_until(lambda: shown(browser), 1) == wanted
