"""The web dashboard in headless Chromium, against a real ``llmpress serve`` with real Ray running stories260K jobs.

One server (a subprocess of ``python -m api.cli serve`` on a free loopback port it takes itself, SQLite store, artifacts folder and
API keys in a temporary folder) and one browser serve the whole module. The tests run in file order and share two
jobs: one submitted through the form that runs to ``succeeded``, one submitted slow enough to be cancelled.

Screenshots of the jobs page and of a job page, at a laptop and a phone size, are written to
``test-artifacts/dashboard/`` at the repository root (``LLMPRESS_TEST_ARTIFACTS`` overrides the folder); the path
is printed. Skipped, saying why, when Playwright, Chromium (``/usr/bin/chromium``, Debian's package, which
``deploy/setup.sh --test`` installs) or Ray is missing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests.api.test_service_restart import LISTENING, is_ready
from tests.fixture_paths import FIXTURES, REPO, STORIES

CALIB = FIXTURES / "data" / "wikitext-2" / "valid.txt"
EVAL_TEXT = FIXTURES / "data" / "tinystories" / "valid-subset.txt"
CHROMIUM = os.environ.get("LLMPRESS_CHROMIUM", "/usr/bin/chromium")
KEYS = {"alice": "alice-dashboard-secret", "bob": "bob-dashboard-secret"}
LAYERS = 5  # stories260K's decoder blocks
SHOTS = Path(os.environ.get("LLMPRESS_TEST_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"
DESKTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None


class Served:
    """The running server: its URL, root folder and artifacts folder, and what the module's tests hand on."""

    def __init__(self, url: str, root: Path):
        self.url, self.root, self.artifacts = url, root, root / "artifacts"
        self.jobs: dict[str, str] = {}

    def http(self, name: str = "alice") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEYS[name]}"}, timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("ray", reason="Ray is not installed")
    root = tmp_path_factory.mktemp("dashboard")
    # `llmpress serve` reads local inputs only from its artifacts folder: put the model and texts there.
    inputs = root / "artifacts" / "inputs"
    shutil.copytree(STORIES, inputs / "stories260K")
    shutil.copy(CALIB, inputs / "valid.txt")
    shutil.copy(EVAL_TEXT, inputs / "eval.txt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMPRESS_", "RAY_"))}
    env.update({
        "LLMPRESS_DATABASE_URL": f"sqlite:///{root / 'jobs.db'}",
        "LLMPRESS_ARTIFACTS_ROOT": str(root / "artifacts"),
        "LLMPRESS_API_KEYS": ",".join(f"{k}:{v}" for k, v in KEYS.items()),
        "LLMPRESS_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    })
    log_path = root / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", "0"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = None
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"llmpress serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            # Port 0: the service takes a free port before it starts Ray (whose processes take free ports of their
            # own) and names it in its log.
            if url is None and (found := LISTENING.search(log_path.read_bytes())):
                url = found.group(1).decode()
            if url is not None and is_ready(url):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"llmpress serve was not ready in 120 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.25)
        yield Served(url, root)
    finally:
        # SIGINT: uvicorn shuts down cleanly and the dispatcher shuts its local Ray down with it.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install playwright; deploy/setup.sh --test installs it)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set LLMPRESS_CHROMIUM; "
                    "deploy/setup.sh --test installs it)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A fresh browser context (so a fresh sessionStorage) on the dashboard. Every request the page makes is
    recorded and, after the test, checked to have gone to the server's own origin; console errors fail the test."""
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    page = context.new_page()
    requests, errors = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(30_000)
    yield page
    context.close()
    foreign = [u for u in requests if not (u.startswith(server.url + "/") or u.startswith(("blob:", "data:")))]
    assert requests and not foreign, f"requests left the origin: {foreign}"
    # The 401 of a wrong key, the 404 of another key's job and the 422 of a bad recipe are logged by Chromium as
    # failed resources; nothing else may be.
    unexpected = [e for e in errors if not any(f"status of {code}" in e for code in (401, 404, 422))]
    assert not unexpected, unexpected


def sign_in(page, server, name: str = "alice") -> None:
    page.goto(server.url + "/")
    page.get_by_label("API key", exact=True).fill(KEYS[name])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()


def screenshot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


# ------------------------------------------------------------------------------------------------------- tests


def test_local_artifact_path_serves_only_listed_files_inside_the_output(tmp_path):
    from api.dashboard import local_artifact_path

    root = tmp_path / "artifacts"
    (root / "run" / "sub").mkdir(parents=True)
    (root / "run" / "model.bin").write_bytes(b"weights")
    (root / "run" / "sub" / "cfg.json").write_text("{}")
    (root / "run" / "manifest.json").write_text("{}")
    (root / "secret.txt").write_text("not yours")
    (root / "run" / "escape.bin").symlink_to(root / "secret.txt")
    (root / "run" / "stray.bin").write_bytes(b"not published")
    listed = ["model.bin", "sub/cfg.json", "escape.bin", "../secret.txt", "/etc/passwd"]
    manifest = {"uri": (root / "run").as_uri(), "key": "manifest.json",
                "files": [{"key": key, "size": 0, "sha256": ""} for key in listed]}
    assert local_artifact_path(manifest, "model.bin", root) == root / "run" / "model.bin"
    assert local_artifact_path(manifest, "sub/cfg.json", root) == root / "run" / "sub" / "cfg.json"
    assert local_artifact_path(manifest, "manifest.json", root) == root / "run" / "manifest.json"
    # Listed or not, nothing outside the output folder: not through '..', an absolute key or a symlink.
    for key in ("escape.bin", "../secret.txt", "/etc/passwd", "stray.bin", "sub", "missing.bin"):
        with pytest.raises(LookupError):
            local_artifact_path(manifest, key, root)
    # An output recorded outside the artifacts folder is refused as a whole.
    outside = {**manifest, "uri": tmp_path.as_uri()}
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(LookupError):
        local_artifact_path(outside, "model.bin", root)


def test_page_is_served_with_a_self_only_csp(server):
    response = httpx.get(server.url + "/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script>" not in response.text and "src=\"/static/app.js\"" in response.text  # no inline script
    for asset in ("/static/app.js", "/static/style.css"):
        got = httpx.get(server.url + asset)
        assert got.status_code == 200 and got.headers["content-security-policy"] == csp
    recipes = httpx.get(server.url + "/ui/recipes").json()
    assert "sparsegpt_2of4" in {r["name"] for r in recipes}
    assert httpx.get(server.url + "/static/../api/dashboard.py").status_code == 404


def test_sign_in_submit_and_follow_a_job_to_succeeded(page, server):
    page.goto(server.url + "/")
    page.get_by_label("API key", exact=True).fill("not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#api-key-error")).to_have_text("This key was not accepted.")
    sign_in(page, server)
    assert page.evaluate("sessionStorage.getItem('llmpress.apiKey')") == KEYS["alice"]
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []

    page.get_by_role("link", name="New job").click()
    page.get_by_label("Model", exact=True).fill("inputs/stories260K")
    page.get_by_label("Start from an example").select_option(label="sparsegpt_2of4")
    expect(page.get_by_label("Recipe (YAML)")).to_have_value(
        (REPO / "service" / "recipes" / "sparsegpt_2of4.yaml").read_text())
    page.get_by_label("Source", exact=True).fill("inputs/valid.txt")
    # Enough samples that each layer takes a visible moment, so the 1 s polling sees the bar move.
    page.get_by_label("Samples", exact=True).fill("512")
    page.get_by_label("Tokens per sample").fill("128")
    page.get_by_label("Output", exact=True).fill("dash-run")
    page.get_by_label("Evaluate perplexity before and after").check()
    page.get_by_label("Evaluation text").fill("inputs/eval.txt")
    page.get_by_label("Max perplexity ratio").fill("50")
    page.get_by_label("Max tokens (optional)").fill("4096")
    page.get_by_label("Labels (optional)").fill("team=web, run=dash")
    # Record every value the progress bar takes from now on.
    page.evaluate("""() => {
        window.__bar = [];
        const bar = document.getElementById('job-bar');
        new MutationObserver(() => window.__bar.push([bar.getAttribute('aria-valuenow'),
                                                      bar.getAttribute('aria-valuetext')]))
            .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
    }""")
    page.get_by_role("button", name="Submit job").click()

    page.wait_for_url("**/#/jobs/*")
    job_id = page.url.rsplit("/", 1)[1]
    server.jobs["done"] = job_id
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=120_000)
    seen = page.evaluate("window.__bar")
    values = [int(v) for v, _ in seen]
    assert values == sorted(values) and values[-1] == 100, seen  # the bar only moves forward, to the end
    assert any(0 < int(v) < 100 and "layer" in text for v, text in seen), seen  # seen mid-way, at a layer

    with server.http() as http:
        job = http.get(f"/v1/jobs/{job_id}").json()
        manifest = http.get(f"/v1/jobs/{job_id}/artifacts").json()
    assert job["labels"] == {"team": "web", "run": "dash"} and job["request"]["dataset"]["num_samples"] == 512

    # The chart: one loss bar and one sparsity point per layer, the loss bars' heights ordered as the losses.
    chart = page.locator("#job-chart svg.layer-chart")
    expect(chart.locator("rect.loss-bar")).to_have_count(LAYERS)
    expect(chart.locator("circle.sparsity-point")).to_have_count(LAYERS)
    losses = {}
    for module in job["metrics"]["modules"].values():
        losses[module["layer"]] = losses.get(module["layer"], 0.0) + module["loss"]
    heights = [float(chart.locator(f"rect.loss-bar[data-layer='{i}']").get_attribute("height")) for i in range(LAYERS)]
    assert sorted(range(LAYERS), key=lambda i: heights[i]) == sorted(range(LAYERS), key=lambda i: losses[i])
    cys = {float(c.get_attribute("cy")) for c in chart.locator("circle.sparsity-point").all()}
    assert len(cys) == 1  # 2:4 reaches exactly 50% in every layer: the points sit on one line

    # The per-module table, the quality verdict, the recipe and the event log.
    expect(page.locator("#modules-body tr")).to_have_count(len(job["metrics"]["modules"]))
    expect(page.locator("#job-gate")).to_contain_text("Quality gate passed")
    before = job["report"]["perplexity"]["eval"]["before"]
    expect(page.locator("#job-quality")).to_contain_text(page.evaluate("(x) => x.toPrecision(4)", before))
    expect(page.locator("#job-recipe")).to_contain_text("SparseGPTModifier")
    expect(page.locator("#job-events li[data-type='status']").last).to_contain_text("succeeded")
    expect(page.locator("#job-cancel")).to_be_hidden()

    # Artifacts: every manifest file listed with its size and sha256; a download through the link has that sha256.
    rows = page.locator("#artifacts-table tbody tr")
    expect(rows).to_have_count(len(manifest["files"]))
    shard = next(f for f in manifest["files"] if f["key"].endswith(".safetensors"))
    row = page.locator(f"#artifacts-table tr[data-key='{shard['key']}']")
    expect(row).to_contain_text(shard["sha256"])
    with page.expect_download() as info:
        row.get_by_role("link", name="Download").click()
    path = info.value.path()
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == shard["sha256"]
    assert Path(path).stat().st_size == shard["size"] and info.value.suggested_filename == shard["key"].split("/")[-1]

    screenshot(page, "job-desktop")
    page.set_viewport_size(PHONE)
    expect(page.locator("#job-chart svg.layer-chart")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling
    screenshot(page, "job-phone")


def test_artifact_download_route_checks_key_owner_and_path(server):
    job_id = server.jobs.get("done")
    if job_id is None:
        pytest.skip("needs the job of test_sign_in_submit_and_follow_a_job_to_succeeded")
    with server.http() as http:
        manifest = http.get(f"/v1/jobs/{job_id}/artifacts").json()
        for entry in manifest["files"]:
            got = http.get(f"/v1/jobs/{job_id}/artifacts/{entry['key']}")
            assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == entry["sha256"]
        assert http.get(f"/v1/jobs/{job_id}/artifacts/{manifest['manifest_key']}").json()["files"]
        # Only what the manifest lists: not a file next to it, not the inputs, no climbing out.
        (server.artifacts / "dash-run" / "stray.txt").write_text("not published")
        for key in ("stray.txt", "../inputs/valid.txt", "%2e%2e/inputs/valid.txt", "..%2finputs%2fvalid.txt",
                    "nothing.bin"):
            assert http.get(f"/v1/jobs/{job_id}/artifacts/{key}").status_code == 404, key
    first = manifest["files"][0]["key"]
    assert httpx.get(f"{server.url}/v1/jobs/{job_id}/artifacts/{first}").status_code == 401
    with server.http("bob") as bob:
        assert bob.get(f"/v1/jobs/{job_id}/artifacts/{first}").status_code == 404


def test_jobs_page_lists_filters_and_shows_progress(page, server):
    if "done" not in server.jobs:
        pytest.skip("needs the job of test_sign_in_submit_and_follow_a_job_to_succeeded")
    sign_in(page, server)
    row = page.locator(f"#jobs-body tr[data-job='{server.jobs['done']}']")
    expect(row).to_be_visible()
    expect(row.locator(".badge")).to_have_text("succeeded")
    expect(row).to_contain_text("SparseGPT")
    expect(row).to_contain_text("team=web")
    expect(row.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    expect(row.locator("td[data-label='Duration']")).not_to_have_text("–")
    screenshot(page, "jobs-desktop")
    page.set_viewport_size(PHONE)
    expect(row).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, "jobs-phone")
    page.set_viewport_size(DESKTOP)

    page.get_by_label("Status", exact=True).select_option("failed")
    expect(page.locator("#jobs-empty")).to_be_visible()
    expect(page.locator("#jobs-body tr")).to_have_count(0)
    page.get_by_label("Status", exact=True).select_option("")
    page.get_by_label("Label", exact=True).fill("team=web")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#jobs-body tr")).to_have_count(1)
    page.get_by_label("Label", exact=True).fill("team=other")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#jobs-body tr")).to_have_count(0)


def test_bad_recipe_shows_the_error_next_to_the_field(page, server):
    sign_in(page, server)
    page.goto(server.url + "/#/submit")
    page.get_by_label("Model", exact=True).fill("inputs/stories260K")
    page.get_by_label("Recipe (YAML)").fill("sparsity_stage:\n  sparsity_modifiers:\n    NoSuchModifier:\n"
                                             "      sparsity: 0.5\n")
    page.get_by_label("Source", exact=True).fill("inputs/valid.txt")
    page.get_by_label("Output", exact=True).fill("dash-bad")
    page.get_by_role("button", name="Submit job").click()
    recipe = page.get_by_label("Recipe (YAML)")
    expect(recipe).to_have_attribute("aria-invalid", "true")
    error = page.locator("#f-recipe-error")
    expect(error).to_contain_text("NoSuchModifier")
    # "Next to the field": the message is the field's description and sits right under it.
    assert "f-recipe-error" in recipe.get_attribute("aria-describedby")
    box, under = recipe.bounding_box(), error.bounding_box()
    assert 0 <= under["y"] - (box["y"] + box["height"]) < 40 and abs(under["x"] - box["x"]) < 5
    expect(page.locator("#f-model-error")).to_be_empty()
    expect(page).to_have_url(server.url + "/#/submit")  # not submitted

    # A type error from the request schema lands on its own field too.
    page.get_by_label("Recipe (YAML)").fill((REPO / "service" / "recipes" / "sparsegpt_2of4.yaml").read_text())
    page.get_by_label("Samples", exact=True).fill("0")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator("#f-samples-error")).to_contain_text("num_samples")
    expect(page.locator("#f-recipe-error")).to_be_empty()
    with server.http() as http:
        assert all(j["request"]["output"] != "dash-bad" for j in http.get("/v1/jobs").json()["items"])


def test_jobs_page_follows_a_running_job_and_its_page_cancels_it(page, server):
    sign_in(page, server)
    page.evaluate("window.__loaded_once = true")  # gone if anything reloads the page
    with server.http() as http:
        # Many samples: each layer takes a moment, and the job stops between layers once cancelled.
        job = http.post("/v1/jobs", json={
            "model": "inputs/stories260K",
            "recipe": (REPO / "service" / "recipes" / "sparsegpt_50.yaml").read_text(),
            "dataset": {"source": "inputs/valid.txt", "num_samples": 384, "seq_len": 256},
            "output": "dash-cancel", "labels": {"team": "web", "run": "cancel"},
        }).json()
    server.jobs["cancelled"] = job["id"]
    # The jobs page picks the new job up by itself, newest first, and follows it layer by layer with an ETA.
    rows = page.locator("#jobs-body tr")
    expect(rows.first).to_have_attribute("data-job", job["id"])
    row = page.locator(f"#jobs-body tr[data-job='{job['id']}']")
    expect(row.locator("td[data-label='Progress']")).to_contain_text(re.compile(r"layer [1-4]/5 · .*ETA \d"),
                                                                    timeout=120_000)
    expect(row.locator(".badge")).to_have_text("running")
    assert int(row.get_by_role("progressbar").get_attribute("aria-valuenow")) > 0

    row.get_by_role("link", name=job["id"]).click()
    expect(page.locator("#job-progress-text")).to_contain_text(re.compile(r"Compressing · layer [1-4] of 5"))
    expect(page.locator("#job-status")).to_have_text("running")
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=60_000)
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    expect(page.locator("#job-artifacts")).to_contain_text("Nothing was published")
    expect(page.locator("#job-events li[data-type='cancel_requested']")).to_have_count(1)
    assert page.evaluate("window.__loaded_once") is True
    with server.http() as http:
        done = http.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "cancelled" and done["progress"]["layer"] < LAYERS
    assert not (server.artifacts / "dash-cancel").exists()


def test_another_key_sees_none_of_the_first_keys_jobs(page, server):
    sign_in(page, server, "bob")
    expect(page.locator("#jobs-empty")).to_be_visible()
    expect(page.locator("#jobs-body tr")).to_have_count(0)
    for job_id in server.jobs.values():
        page.goto(f"{server.url}/#/jobs/{job_id}")
        expect(page.locator("#job-missing")).to_contain_text("not found")
        expect(page.locator("#job-body")).to_be_hidden()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key", exact=True)).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('llmpress.apiKey')") is None


def test_a_job_page_shows_its_workers_where_it_resumed_and_what_it_waits_for(page, server):
    """What the workers write into a job's progress (``workers``, ``resumed``; ``waiting`` while queued) and the
    request's ``resources``, on the job page. The jobs are written straight into the server's store, as a worker
    would, and never handed to Ray."""
    from sqlalchemy import update

    from service.jobs.job_store import JobRow, JobStore

    recipe = (REPO / "service" / "recipes" / "sparsegpt_2of4.yaml").read_text()
    workers = [{"rank": rank, "node_id": f"{rank + 10:x}" * 28, "node_ip": "127.0.0.1", "cpus": 1, "gpus": 0}
               for rank in (1, 0)]  # in any order: the table goes by rank
    waiting = "2 workers of 1 CPU each: the cluster has 1 CPU free now"
    store = JobStore(f"sqlite:///{server.root / 'jobs.db'}")
    try:
        running, _ = store.create_job("alice", {
            "model": "inputs/stories260K", "recipe": recipe, "output": "dash-workers",
            "resources": {"workers": 2, "gpus_per_worker": 0, "cpus_per_worker": 1}})
        assert store.transition(running.id, ["queued"], "running")
        assert store.set_progress(running.id, {"stage": "compressing", "layer": 3, "layers": LAYERS, "fraction": 0.4,
                                               "workers": workers, "resumed": {"layer": 3, "layers": LAYERS}})
        queued, _ = store.create_job("alice", {"model": "inputs/stories260K", "recipe": recipe,
                                               "output": "dash-waiting", "resources": {"workers": 2}})
        with store.session() as s:  # what the dispatcher records of a job Ray has not started yet
            s.execute(update(JobRow).where(JobRow.id == queued.id).values(progress={"waiting": waiting}))
    finally:
        store.close()

    sign_in(page, server)
    page.goto(f"{server.url}/#/jobs/{running.id}")
    rows = page.locator("#workers-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first.locator("td")).to_have_text(["0", workers[1]["node_id"], "127.0.0.1", "1", "0"])
    expect(rows.last.locator("td")).to_have_text(["1", workers[0]["node_id"], "127.0.0.1", "1", "0"])
    expect(page.locator("#job-resumed")).to_contain_text(f"resumed at layer 3 of {LAYERS}")
    expect(page.locator("#job-waiting")).to_be_hidden()
    expect(page.locator("#job-request")).to_contain_text("2 workers, 1 CPU each, 0 GPUs each")
    page.set_viewport_size(PHONE)
    expect(rows.first).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, "job-workers-phone")
    page.set_viewport_size(DESKTOP)

    page.goto(f"{server.url}/#/jobs/{queued.id}")
    expect(page.locator("#job-status")).to_have_text("queued")
    expect(page.locator("#job-waiting")).to_have_text(f"Waiting: {waiting}")
    expect(page.locator("#job-workers-card")).to_be_hidden()
    expect(page.locator("#job-resumed")).to_be_hidden()
    expect(page.locator("#job-request")).to_contain_text("2 workers, 1 CPU each, a GPU each if the cluster has one")
