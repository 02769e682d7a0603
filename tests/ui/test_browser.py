"""The audit pages in a real browser (Debian's Chromium through chromedriver) against a real api-server with a
finished demo run: the numbers are the audit's, the AN search finds a known AN and refuses an unknown one, the
preview is a PNG of the series' size, and no page holds a clear AN, patient name, patient ID or UID.

Screenshots of every page go to the test's output directory; with ``PACSFLOW_DOCS_SCREENSHOTS=1`` they also
replace the ones in ``docs/`` that the README shows.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from pacsflow.core.audit import AuditStore, Outcome
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.demo.environment import REPO_ROOT
from pacsflow.demo.hospital.plan import UID_ROOT
from pydicom import dcmread
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from tests.helpers import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS
from tests.ui.conftest import DAG_ID, RUN_IDS

WINDOW = "--window-size=1280,1000"
DOCS = REPO_ROOT / "docs"

pytestmark = [pytest.mark.airflow, pytest.mark.orthanc]


@pytest.fixture(scope="module")
def browser(api_server, tmp_path_factory) -> Iterator[webdriver.Chrome]:
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).exists():
            pytest.fail(f"{binary} is missing: run `make test` (it installs chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, WINDOW):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        driver.get(f"{api_server.url}/pacsflow-audit/static/audit.css")  # the origin, before its cookie is set
        driver.add_cookie({"name": "_token", "value": api_server.token("auditor"), "path": "/"})
        yield driver
    finally:
        driver.quit()


class Pages:
    """Visits pages, keeps their HTML for the identifier check and saves a screenshot of each."""

    def __init__(self, driver: webdriver.Chrome, base: str, out: Path) -> None:
        self.driver, self.base, self.out = driver, base, out
        self.html: dict[str, str] = {}

    def visit(self, path: str, name: str) -> None:
        self.driver.get(self.base + path)
        self.seen(name)

    def seen(self, name: str) -> None:
        self.html[name] = self.driver.page_source
        self.driver.save_screenshot(str(self.out / f"{name}.png"))

    def number(self, selector: str) -> int:
        return int(self.driver.find_element(By.CSS_SELECTOR, selector).text.replace(",", ""))


def run_path(index: int) -> str:
    return f"/pacsflow-audit/dags/{DAG_ID}/runs/{quote(RUN_IDS[index], safe='')}"


def test_an_auditor_follows_a_run_down_to_the_images(browser, api_server, demo_audit, tmp_path):
    pages = Pages(browser, api_server.url, tmp_path)
    key = Pseudonymizer.from_environment(demo_audit.data_root / ".pacsflow-key")
    with AuditStore.connect(demo_audit.audit_url) as store:
        summaries = [store.summary(demo_audit.run_key(i)) for i in range(2)]
        stories = store.accession_outcomes(demo_audit.run_key(1))

    # runs list: both runs, newest first, with the audit's counts
    pages.visit("/pacsflow-audit/runs", "runs")
    rows = browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    assert [row.get_attribute("data-run-id") for row in rows] == [RUN_IDS[1], RUN_IDS[0]]
    for row, summary in zip(rows, reversed(summaries), strict=True):
        assert int(row.find_element(By.CSS_SELECTOR, "[data-k=cohort]").text) == summary.cohort
        for outcome in Outcome:
            cell = row.find_element(By.CSS_SELECTOR, f"[data-k={outcome.value}]")
            assert int(cell.text) == summary.outcomes.get(outcome.value, 0)

    # the run page: the numbers are the audit's, the reasons too
    rows[0].find_element(By.LINK_TEXT, RUN_IDS[1]).click()
    pages.seen("run")
    summary = summaries[1]
    assert pages.number("#summary [data-k=cohort]") == summary.cohort > 0
    for outcome in Outcome:
        assert pages.number(f"#summary [data-k={outcome.value}]") == summary.outcomes.get(outcome.value, 0)
    assert pages.number("#summary [data-k=instances]") == summary.instances > 0
    assert browser.find_element(By.CSS_SELECTOR, "#summary [data-k=reconciled]").text == "yes"
    for reason, count in summary.reasons.items():
        assert int(browser.find_element(By.CSS_SELECTOR, f'#reasons [data-reason="{reason}"]').text) == count
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart")) == 4
    browser.find_element(By.CSS_SELECTOR, "figure.wide").screenshot(str(tmp_path / "run_timeline.png"))

    # the AN search: a clear AN typed in, its story found by reference
    known = next(
        an for an, row in sorted(stories.items()) if row["outcome"] == Outcome.RETRIEVED and row["modality"] == "CT"
    )
    search(browser, known)
    pages.seen("accession")
    assert browser.find_element(By.ID, "an-ref").text == key.ref(known)
    assert stories[known]["outcome"] in browser.find_element(By.CSS_SELECTOR, "[data-k=outcome]").text
    assert known not in browser.page_source

    # a retrieved CT series: its page, its rule decision, its preview of the series' size
    browser.find_element(By.CSS_SELECTOR, "#an-series a.ref").click()
    pages.seen("series")
    assert browser.find_element(By.CSS_SELECTOR, "[data-k=decision]").text == "kept"
    image = browser.find_element(By.ID, "preview")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64
    assert browser.execute_script("return arguments[0].naturalHeight", image) == 64
    status, png, headers = api_server.get(image.get_attribute("src").removeprefix(api_server.url), "auditor")
    assert status == 200 and headers["content-type"] == "image/png"
    assert png_size(png) in series_sizes(demo_audit, known)

    # an AN of no run: refused, and not echoed back
    browser.get(api_server.url + run_path(1))
    search(browser, "NOT-AN-AN-42")
    pages.seen("search_unknown")
    assert browser.find_element(By.ID, "message-title").text == "AN not in this run"
    assert "NOT-AN-AN-42" not in browser.page_source
    status, _, _ = api_server.get(run_path(1) + "/search", "auditor", data=b"accession_number=NOT-AN-AN-42")
    assert status == 404

    # the comparison of the two runs: the second covers the whole cohort, the first half of it
    pages.visit(f"/pacsflow-audit/dags/{DAG_ID}/compare", "compare")
    assert browser.find_element(By.CSS_SELECTOR, "select[name=a] option[selected]").text == RUN_IDS[0]
    only_b = browser.find_element(By.CSS_SELECTOR, "#compare-outcomes tr:last-child td:nth-child(3)").text
    assert int(only_b) == summaries[1].cohort - summaries[0].cohort

    # a mammography series: the image itself
    mammo = next(
        an for an, row in sorted(stories.items()) if row["outcome"] == Outcome.RETRIEVED and row["modality"] == "MG"
    )
    browser.get(api_server.url + run_path(1))
    search(browser, mammo)
    browser.find_element(By.XPATH, "//table[@id='an-series']//tr[td[2]='MG']//a").click()
    pages.seen("series_mammography")
    image = browser.find_element(By.ID, "preview")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64

    # inside Airflow's own UI: the "Extraction audit" navigation entry shows the runs page in the UI's frame
    browser.get(api_server.url + "/plugin/pacsflow-audit")
    frame = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "iframe"))
    WebDriverWait(browser, 30).until(lambda d: "Extraction audit" in d.page_source)
    pages.seen("airflow_nav")
    browser.switch_to.frame(frame)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#runs tbody tr"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")) == 2
    browser.switch_to.default_content()

    assert_no_identifier(pages.html, demo_audit)
    if os.environ.get("PACSFLOW_DOCS_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        for name in ("airflow_nav", "runs", "run", "run_timeline", "accession", "series", "compare"):
            shutil.copyfile(tmp_path / f"{name}.png", DOCS / f"audit-{name.replace('_', '-')}.png")


def test_the_audit_is_a_tab_of_the_dag_run_and_forbidden_to_an_outsider(browser, api_server, tmp_path):
    body = json.dumps({"dag_run_id": RUN_IDS[1], "logical_date": None, "conf": {}}).encode()
    status, answer, _ = api_server.get(
        f"/api/v2/dags/{DAG_ID}/dagRuns", "operator", data=body, content_type="application/json"
    )
    assert status in (200, 409), answer[:300]  # 409: created by an earlier test of the session
    pages = Pages(browser, api_server.url, tmp_path)
    browser.get(f"{api_server.url}/dags/{DAG_ID}/runs/{quote(RUN_IDS[1], safe='')}/plugin/pacsflow-audit-run")
    frame = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "iframe"))
    pages.seen("airflow_run_tab")
    browser.switch_to.frame(frame)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#summary"))
    assert RUN_IDS[1] in browser.find_element(By.TAG_NAME, "h1").text
    browser.switch_to.default_content()
    pages.seen("airflow_run_tab")

    browser.delete_cookie("_token")
    browser.add_cookie({"name": "_token", "value": api_server.token("outsider"), "path": "/"})
    try:
        pages.visit(run_path(1), "forbidden")
        assert "Forbidden" in browser.page_source and "summary" not in browser.page_source
        pages.visit("/pacsflow-audit/runs", "runs_outsider")
        assert not browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    finally:
        browser.delete_cookie("_token")
        browser.add_cookie({"name": "_token", "value": api_server.token("auditor"), "path": "/"})
    if os.environ.get("PACSFLOW_DOCS_SCREENSHOTS") == "1":
        shutil.copyfile(tmp_path / "airflow_run_tab.png", DOCS / "audit-airflow-run-tab.png")


def test_downloads_hold_every_an_by_reference_only(api_server, demo_audit, tmp_path):
    import pyarrow.parquet as pq

    with AuditStore.connect(demo_audit.audit_url) as store:
        summary = store.summary(demo_audit.run_key(1))
    status, body, headers = api_server.get(run_path(1) + "/audit.csv", "auditor")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    lines = body.decode().splitlines()
    assert len(lines) == summary.cohort + 1 and lines[0].startswith("an_ref,")
    status, body, _ = api_server.get(run_path(1) + "/audit.parquet", "auditor")
    (tmp_path / "audit.parquet").write_bytes(body)
    table = pq.read_table(tmp_path / "audit.parquet")
    assert table.num_rows == summary.cohort
    assert {"accession_number", "patient_id"}.isdisjoint(table.column_names)
    outcomes = table.column("outcome").to_pylist()
    assert {o: outcomes.count(o) for o in set(outcomes)} == summary.outcomes
    assert_no_identifier({"csv": lines and "\n".join(lines), "parquet": str(table.to_pylist())}, demo_audit)


def search(browser: webdriver.Chrome, accession_number: str) -> None:
    field = browser.find_element(By.NAME, "accession_number")
    field.send_keys(accession_number)
    field.submit()


def assert_no_identifier(texts: dict[str, str], demo_audit) -> None:
    forbidden = {UID_ROOT}
    for accession in demo_audit.truth["accessions"]:
        forbidden.add(accession["accession_number"])
        forbidden.add(accession["patient_id"])
        forbidden.update(study["accession_number"] for study in accession["studies"] if study["accession_number"])
    for name in demo_audit.patient_names:
        family, _, given = name.partition("^")
        forbidden.update({name, f"{given} {family}", f"{family}, {given}"})
    for page, text in texts.items():
        leaked = sorted(value for value in forbidden if value and value in text)
        assert not leaked, f"{page} holds {len(leaked)} clear identifier(s)"


def png_size(data: bytes) -> tuple[int, int]:
    """(rows, columns) of a valid PNG: signature, IHDR, and IDAT that inflates to the declared size."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    position, idat = 8, b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        payload = data[position + 8 : position + 8 + length]
        assert zlib.crc32(kind + payload) & 0xFFFFFFFF == struct.unpack(">I", data[position + 8 + length :][:4])[0]
        idat += payload if kind == b"IDAT" else b""
        position += 12 + length
    assert (depth, colour) == (8, 0)
    assert len(zlib.decompress(idat)) == height * (width + 1)
    return height, width


def series_sizes(demo_audit, accession_number: str) -> set[tuple[int, int]]:
    """(rows, columns) of the AN's retrieved series, read from their files on disk."""
    with AuditStore.connect(demo_audit.audit_url) as store:
        kept = [
            row
            for row in store.series_rows(demo_audit.run_key(1), kept=True)
            if row["accession_number"] == accession_number
        ]
    sizes = set()
    for row in kept:
        for path in (demo_audit.data_root / "dicom" / row["study_uid"] / row["series_uid"]).glob("*.dcm"):
            header = dcmread(path, stop_before_pixels=True)
            sizes.add((int(header.Rows), int(header.Columns)))
    assert sizes, "the AN has no retrieved file"
    return sizes
