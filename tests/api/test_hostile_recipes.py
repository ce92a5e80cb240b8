"""Hostile recipes against the live API: an alias bomb, deep nesting and oversized recipes get a small, quick 422
naming ``recipe`` and the limit, and the server logs no traceback.

The app is served by uvicorn on 127.0.0.1 as in tests/api/test_app.py, over a real SQLite store; every request
here is refused before a job exists, so the dispatcher is a stand-in and no Ray starts.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import httpx
import pytest

from api.app import create_app
from service.engine.options import MAX_ERROR_CHARS, OptionsError
from service.jobs.job_store import JobStore
from service.jobs.settings import Settings
from tests.api_server import NoWorkers, Server

KEY = "alice-secret-1"
HEAD = "s_stage:\n  g_modifiers:\n    SparseGPTModifier:\n      sparsity: 0.5\n"


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "artifacts").mkdir()
    settings = Settings(api_keys=f"alice:{KEY}", admin_keys="", database_url=f"sqlite:///{root / 'jobs.db'}",
                        artifacts_root=str(root / "artifacts"), hub_offline=True)
    store = JobStore(settings.database_url)
    dispatcher = NoWorkers()
    try:
        with Server(create_app(settings, store, dispatcher)) as url, \
                httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as client:
            client.dispatcher = dispatcher
            yield client
    finally:
        store.close()


def body(recipe) -> dict:
    return {"model": "s3://models/stories260K", "recipe": recipe, "output": f"s3://out/{uuid.uuid4().hex}/",
            "dataset": {"source": "s3://data/calib.txt", "num_samples": 8, "seq_len": 64}}


def laughs(levels: int = 9, width: int = 9) -> str:
    """The report's bomb: about 650 bytes, 9 ** 9 nodes once expanded, inside SparseGPTModifier's arguments."""
    lines = [f"      l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return HEAD + "\n".join(lines) + f"\n      ignore: *l{levels - 1}\n"


def deep_list_body(depth: int) -> bytes:
    """A JSON body whose recipe is a list form with ``ignore`` nested ``depth`` lists deep (written out as text:
    json.dumps itself recurses)."""
    text = json.dumps(body([{"SparseGPTModifier": {"sparsity": 0.5, "ignore": "DEEP"}}]))
    return text.replace('"DEEP"', "[" * depth + "]" * depth).encode()


HOSTILE = {
    "alias bomb": (laughs(), "expands to more than 5000 nodes through YAML aliases"),
    "alias bomb in merge keys": (
        HEAD + "      m0: &m0 {x: 1}\n"
        + "".join(f"      m{i}: &m{i} {{<<: [*m{i - 1}], k: [*m{i - 1}, *m{i - 1}, *m{i - 1}]}}\n"
                  for i in range(1, 12)),
        "through YAML aliases"),
    "[ x 1000 in YAML": (HEAD + "      ignore: " + "[" * 1000 + "]" * 1000 + "\n", "nests deeper than 32 levels"),
    "{a: x 1000 in YAML": (HEAD + "      ignore: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n",
                           "nests deeper than 32 levels"),
    "[ x 1000 as JSON text": ("[" * 1000 + "]" * 1000, "nests deeper than 32 levels"),
    "[ x 60 K as JSON text": ("[" * 60_000, "nests deeper than 32 levels"),
    "text over the size limit": (HEAD + "      ignore: [" + ", ".join(["lm_head"] * 8000) + "]\n",
                                 "larger than 65536 bytes"),
    "a 60 KB one-line text": ("x" * 60_000, "recipe file not found"),
}


def assert_refused(response: httpx.Response, fragment: str, seconds: float) -> None:
    assert response.status_code == 422, response.text[:500]
    assert len(response.content) < 2048, len(response.content)  # the input is never echoed
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "recipe"] and fragment in error["msg"], error
    assert seconds < 1.0, f"{seconds:.2f} s"


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_recipe_texts_get_a_small_quick_422(http, name, caplog, capfd):
    recipe, fragment = HOSTILE[name]
    assert len(recipe.encode()) < 1_048_576  # under the body limit: the recipe limits answer, not the 413
    started = time.perf_counter()
    with caplog.at_level(logging.INFO):
        response = http.post("/v1/jobs", json=body(recipe))
    assert_refused(response, fragment, time.perf_counter() - started)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert "Traceback" not in "".join(capfd.readouterr())


@pytest.mark.parametrize("depth", [40, 200, 900])
def test_a_deeply_nested_json_list_recipe_gets_a_small_quick_422(http, depth, caplog, capfd):
    started = time.perf_counter()
    with caplog.at_level(logging.INFO):
        response = http.post("/v1/jobs", content=deep_list_body(depth), headers={"Content-Type": "application/json"})
    assert_refused(response, "nests deeper than 32 levels", time.perf_counter() - started)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert "Traceback" not in "".join(capfd.readouterr())


def test_hostile_recipes_never_became_jobs_and_a_real_one_does(http):
    assert http.dispatcher.submitted == []
    text = HEAD + '      mask_structure: "2:4"\n      ignore: ["re:.*lm_head"]\n'
    response = http.post("/v1/jobs", json=body(text))
    assert response.status_code == 201, response.text
    assert http.dispatcher.submitted == [response.json()["id"]]


def test_every_validation_message_is_bounded():
    long = OptionsError("recipe: " + "x" * 10_000, ("recipe",))
    assert len(str(long)) <= MAX_ERROR_CHARS and str(long).endswith("(cut from 10008 characters)")
    assert str(OptionsError("recipe: short", ("recipe",))) == "recipe: short"
