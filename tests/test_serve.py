"""A real uvicorn server on a loopback port: every endpoint, the limits, malformed input, the CLI, the page."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import promcse.cli
from conftest import make_prompt_checkpoint, make_sentences

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from promcse.corpus.search import Index  # noqa: E402
from promcse.serving.launch import BackgroundServer, load_server  # noqa: E402
from promcse.serving.app import Limits, create_app  # noqa: E402

CORPUS = list(dict.fromkeys(make_sentences(40, seed=12)))
LIMITS = Limits(max_texts=8, max_chars=200, max_body_bytes=20_000, max_top_k=10)


@pytest.fixture(scope="module")
def served(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve")
    models = {"news": str(make_prompt_checkpoint(tiny_bert, root / "news", pooler="cls", head="always", length=3, seed=1)),
              "legal": str(make_prompt_checkpoint(tiny_bert, root / "legal", pooler="avg", head="none", length=3, seed=2))}
    index = Index(models["news"], kind="flat", device="cpu")
    index.add(CORPUS)
    index.save(root / "idx")
    other = Index(models["legal"], kind="flat", device="cpu")  # the same corpus under another prompt
    other.add(CORPUS)
    other.save(root / "idx-legal")
    registry, indexes = load_server(models, {"captions": str(root / "idx"), "captions-legal": str(root / "idx-legal")},
                                    device="cpu")
    with BackgroundServer(create_app(registry, indexes, LIMITS)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield {"client": client, "registry": registry, "url": server.url, "root": root, "models": models,
                   "indexes": indexes}


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["status"] == response.status_code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_health_models_and_page(served) -> None:
    client = served["client"]
    assert client.get("/health").json() == {"status": "ok", "models": 2, "indexes": 2}
    info = client.get("/models").json()
    assert [m["name"] for m in info["models"]] == ["news", "legal"]  # the index reuses "news": nothing added
    assert info["models"][0]["prompt_length"] == 3 and info["models"][0]["dim"] == 32
    assert info["indexes"][0] == {"name": "captions", "size": len(CORPUS), "dim": 32, "backend": "flat", "model": "news"}
    assert info["indexes"][1]["model"] == "legal"
    assert len(served["registry"].backbones) == 1
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="search-form"' in page.text and 'id="compare-form"' in page.text


def test_embed(served) -> None:
    client, registry = served["client"], served["registry"]
    texts = CORPUS[:3]
    body = client.post("/embed", json={"texts": texts, "model": "legal"}).json()
    assert body["dim"] == 32 and body["model"] == "legal" and len(body["embeddings"]) == 3
    vectors = np.array(body["embeddings"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors, registry.encode(texts, "legal"), atol=1e-6)
    default = client.post("/embed", json={"texts": texts, "normalize": False}).json()
    assert default["model"] == "news"
    assert np.allclose(default["embeddings"], registry.encode(texts, "news", normalize=False), atol=1e-5)


def test_similarity(served) -> None:
    client, registry = served["client"], served["registry"]
    body = client.post("/similarity", json={"a": CORPUS[:2], "b": CORPUS[:3], "model": "legal"}).json()
    assert np.array(body["scores"]).shape == (2, 3)
    assert np.allclose(body["scores"], registry.similarity(CORPUS[:2], CORPUS[:3], "legal"), atol=1e-5)


def test_search(served) -> None:
    client = served["client"]
    body = client.post("/search", json={"query": CORPUS[5], "index": "captions", "top_k": 4}).json()
    results = body["results"]
    assert body["index"] == "captions" and body["model"] == "news" and len(results) == 4
    assert set(results[0]) == {"text", "score", "id"}
    assert results[0]["text"] == CORPUS[results[0]["id"]]
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:]))
    cut = results[1]["score"]
    kept = client.post("/search", json={"query": CORPUS[5], "top_k": 10, "threshold": cut}).json()["results"]
    assert kept and all(r["score"] >= cut for r in kept)


BAD_REQUESTS = [  # (path, raw body or JSON, expected status)
    ("/embed", {"texts": [f"t{i}" for i in range(9)]}, 413),
    ("/embed", {"texts": ["x" * 201]}, 413),
    ("/similarity", {"a": ["a"], "b": ["b"] * 9}, 413),
    ("/search", {"query": "q" * 201}, 413),
    ("/embed", {"texts": ["a" * 150] * 8, "pad": "z" * 25_000}, 413),  # body over max_body_bytes
    ("/search", {"query": "q", "top_k": 11}, 422),
    ("/search", {"query": "q", "top_k": 0}, 422),
    ("/search", {"query": "q", "top_k": "3"}, 422),
    ("/search", b'{"query": "q", "threshold": NaN}', 422),
    ("/embed", b'{"texts": ["a"', 422),
    ("/embed", b"\xff\xfe not utf-8", 422),
    ("/embed", b"", 422),
    ("/embed", [1, 2], 422),
    ("/embed", {"texts": "not a list"}, 422),
    ("/embed", {"texts": [1, 2]}, 422),
    ("/embed", {"texts": []}, 422),
    ("/embed", {"texts": ["a"], "extra": 1}, 422),
    ("/embed", {"texts": ["a"], "normalize": "yes"}, 422),
    ("/similarity", {"a": ["a"]}, 422),
    ("/embed", {"texts": ["a"], "model": "nope"}, 404),
    ("/embed", {"texts": ["a"], "model": "../../../../etc/passwd"}, 404),
    ("/search", {"query": "q", "index": str(Path(__file__).parent)}, 404),
]


@pytest.mark.parametrize(("path", "payload", "status"), BAD_REQUESTS)
def test_bad_input_gets_a_json_error_never_500(served, path: str, payload, status: int) -> None:
    client = served["client"]
    if isinstance(payload, bytes):
        response = client.post(path, content=payload, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=payload)
    assert response.status_code == status, response.text
    error_of(response)


def test_streamed_body_over_the_limit_and_other_routes(served) -> None:
    client = served["client"]
    chunks = (b'{"texts": ["' + b"a" * 5_000 + b'"]' for _ in range(6))  # chunked: no Content-Length
    assert client.post("/embed", content=chunks, headers={"content-type": "application/json"}).status_code == 413
    assert error_of(client.get("/embed"))["status"] == 405
    assert error_of(client.get("/no/such/route"))["status"] == 404
    assert client.get("/health").status_code == 200  # still serving


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serve_in_a_subprocess(served) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "promcse", "serve", "--model", f"news={served['models']['news']}",
            "--index", f"captions={served['root'] / 'idx'}", "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)
        hits = httpx.post(f"http://127.0.0.1:{port}/search", json={"query": CORPUS[0], "top_k": 1}).json()
        assert len(hits["results"]) == 1
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert f"http://127.0.0.1:{port}/" in output


def test_cli_serve_rejects_bad_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert promcse.cli.main(["serve", "--model", "bad name=x"]) == 2
    assert promcse.cli.main(["serve", "--model", "a=x", "--model", "a=y"]) == 2
    for bad in (["--port", "70000"], ["--max-texts", "0"], ["--max-chars", "-5"], ["--max-wait-ms", "nan"],
                ["--max-batch-tokens", "0"], ["--request-timeout", "0"]):
        with pytest.raises(SystemExit) as stop:  # argparse refuses the value, naming the option
            promcse.cli.main(["serve", "--model", "a=x", *bad])
        assert stop.value.code == 2
    assert promcse.cli.main(["serve", "--model", f"a={tmp_path}"]) == 2  # not a model directory
    assert promcse.cli.main(["serve", "--model", "minilm", "--index", f"i={tmp_path}"]) == 2  # not an index


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(chromium_paths() is None, reason="needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver)")
def test_page_in_headless_chromium(served, tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium_paths()  # type: ignore[misc]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        wait = WebDriverWait(driver, 20)
        driver.get(served["url"] + "/")
        wait.until(lambda d: "captions" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "query").send_keys(CORPUS[7])
        driver.find_element(By.ID, "search-btn").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results li")))
        rows = driver.find_elements(By.CSS_SELECTOR, "#results li")
        assert len(rows) == 5  # the page's default top k
        scores = [float(r.find_element(By.CLASS_NAME, "score").text) for r in rows]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0001 for s in scores)
        assert all(r.find_element(By.CLASS_NAME, "text").text in CORPUS for r in rows)
        driver.find_element(By.ID, "text-a").send_keys("a man is playing guitar")
        driver.find_element(By.ID, "text-b").send_keys("a man is playing guitar")
        driver.find_element(By.ID, "compare-btn").click()
        wait.until(lambda d: d.find_element(By.ID, "compare-score").text not in ("", "–"))
        assert abs(float(driver.find_element(By.ID, "compare-score").text) - 1.0) < 1e-3
        driver.find_element(By.ID, "side-query").send_keys(CORPUS[3])
        driver.find_element(By.ID, "side-btn").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#side-right-results li")))
        columns = {side: driver.find_elements(By.CSS_SELECTOR, f"#side-{side}-results li") for side in ("left", "right")}
        assert [len(rows) for rows in columns.values()] == [5, 5]
        assert "captions (model news)" in driver.find_element(By.ID, "side-left-info").text
        assert "captions-legal (model legal)" in driver.find_element(By.ID, "side-right-info").text
        for side, name in (("left", "captions"), ("right", "captions-legal")):  # each column is its index's ranking
            hits = served["indexes"][name][0].search(CORPUS[3], top_k=len(CORPUS))[0]
            score_of = {h.text: h.score for h in hits}
            shown = [(r.find_element(By.CLASS_NAME, "text").text, float(r.find_element(By.CLASS_NAME, "score").text))
                     for r in columns[side]]
            # The same ranking, up to near-ties: the server encodes the query in a batch, the index alone, and a
            # tiny random model's scores can differ in the last bits (two texts 1e-6 apart may swap).
            assert [s for _, s in shown] == pytest.approx([h.score for h in hits[:5]], abs=1e-3)
            assert all(abs(score_of[text] - score) < 1e-3 for text, score in shown)
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()
