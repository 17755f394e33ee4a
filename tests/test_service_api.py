"""The triage service's HTTP API, through a real HTTP client against `cxr-oneclass serve` started on a free
localhost port: uploads, the worklist, studies, pictures, the model, metrics, tokens, limits, restarts."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import blob_images, free_port
from cxr_oneclass.cli import main

ROOT = Path(__file__).resolve().parents[1]


class Server:
    """`cxr-oneclass serve` in a subprocess, on a free port; waits until /healthz answers."""

    def __init__(self, run: Path, db: Path, *extra: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "cxr_oneclass", "serve", str(run), "--port", str(self.port), "--db", str(db), *extra],
                                     env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.communicate()[1][-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def run(tiny_run) -> Path:
    return tiny_run


@pytest.fixture
def server(run, tmp_path):
    s = Server(run, tmp_path / "db.sqlite")
    yield s
    s.stop()


def test_upload_worklist_study_pictures_and_model(server):
    films = blob_images(3, 64, seed=5)
    files = [("files", (f"film{i}.png", png(f), "image/png")) for i, f in enumerate(films)]
    r = httpx.post(f"{server.url}/v1/images", files=files, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 3 and len(body["studies"]) == 3
    assert all(i["flag"] in ("normal", "abnormal") and i["score"] is not None and not i["duplicate"] for i in body["images"])
    wl = httpx.get(f"{server.url}/v1/studies").json()
    assert wl["total"] == 3 and [s["score"] for s in wl["items"]] == sorted((s["score"] for s in wl["items"]), reverse=True)
    page = httpx.get(f"{server.url}/v1/studies", params={"limit": 2, "offset": 2}).json()
    assert page["total"] == 3 and len(page["items"]) == 1
    today = wl["items"][0]["date"]
    assert httpx.get(f"{server.url}/v1/studies", params={"date_from": today, "date_to": today}).json()["total"] == 3
    assert httpx.get(f"{server.url}/v1/studies", params={"date_from": "29991231"}).json()["total"] == 0
    assert httpx.get(f"{server.url}/v1/studies", params={"date_from": "yesterday"}).status_code == 422
    flag = wl["items"][0]["flag"]
    assert all(s["flag"] == flag for s in httpx.get(f"{server.url}/v1/studies", params={"flag": flag}).json()["items"])
    study = httpx.get(f"{server.url}/v1/studies/{wl['items'][0]['study_key']}").json()
    assert study["images"][0]["file_name"].startswith("film")
    heat = httpx.get(server.url + study["images"][0]["heatmap_url"])
    assert heat.status_code == 200 and heat.headers["content-type"] == "image/png" and heat.content[:4] == b"\x89PNG"
    model = httpx.get(f"{server.url}/v1/model").json()
    assert model["threshold"] is not None and model["research_use_only"]
    assert "Model card" in httpx.get(f"{server.url}/v1/model-card").text
    assert "cxr_images_total" in httpx.get(f"{server.url}/metrics").text
    assert httpx.get(f"{server.url}/docs").status_code == 200 and "/v1/images" in httpx.get(f"{server.url}/openapi.json").text
    page_html = httpx.get(server.url + "/").text
    assert "worklist" in page_html and "auto-cleared" in page_html


def test_the_same_image_twice_is_stored_once(server):
    film = png(blob_images(1, 64, seed=6)[0])
    for name in ("a.png", "b.png"):
        r = httpx.post(f"{server.url}/v1/images", files=[("files", (name, film, "image/png"))], timeout=60)
        assert r.status_code == 200
    assert r.json()["images"][0]["duplicate"] is True
    assert httpx.get(f"{server.url}/healthz").json()["images"] == 1


def test_a_bad_file_is_a_4xx_naming_it_and_the_others_are_kept(server):
    good = png(blob_images(1, 64, seed=7)[0])
    files = [("files", ("good.png", good, "image/png")), ("files", ("../../etc/passwd", b"not an image", "image/png")),
             ("files", ("empty.png", b"", "image/png"))]
    r = httpx.post(f"{server.url}/v1/images", files=files, timeout=60)
    assert r.status_code == 422
    errors = {e["file"]: e["problem"] for e in r.json()["errors"]}
    assert set(errors) == {"passwd", "empty.png"} and "empty" in errors["empty.png"]  # the name is shown, never a path
    flags = {i["file_name"]: i["flag"] for i in r.json()["images"]}
    assert flags["good.png"] in ("normal", "abnormal")
    items = httpx.get(f"{server.url}/v1/studies").json()["items"]
    assert {i["flag"] for i in items} >= {"error"}  # a film that was not scored is listed, flagged, never cleared
    assert httpx.post(f"{server.url}/v1/images", files=[], data={"x": "1"}).status_code in (400, 422)


def test_limits_and_the_token(run, tmp_path):
    s = Server(run, tmp_path / "db.sqlite", "--token", "s3cret")
    try:
        assert httpx.get(f"{s.url}/v1/studies").status_code == 401
        assert httpx.get(f"{s.url}/healthz").status_code == 200
        ok = httpx.get(f"{s.url}/v1/studies", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        page = httpx.get(f"{s.url}/?token=s3cret")
        assert page.status_code == 200 and "cxr_token" in page.headers.get("set-cookie", "")
        big = b"\0" * (513 * 2**20)  # over the request limit: refused from its Content-Length
        r = httpx.post(f"{s.url}/v1/images", headers={"Authorization": "Bearer s3cret"}, files=[("files", ("big.png", big, "image/png"))], timeout=60)
        assert r.status_code == 413
    finally:
        s.stop()
    # anything but loopback without a token: refused before it starts
    assert main(["serve", str(run), "--host", "0.0.0.0", "--port", "1"]) == 2


def test_a_restart_keeps_the_worklist(run, tmp_path):
    db = tmp_path / "db.sqlite"
    s = Server(run, db)
    try:
        httpx.post(f"{s.url}/v1/images", files=[("files", ("f.png", png(blob_images(1, 64, seed=8)[0]), "image/png"))], timeout=60)
    finally:
        s.stop(signal.SIGKILL)
    s2 = Server(run, db)
    try:
        assert httpx.get(f"{s2.url}/v1/studies").json()["total"] == 1
    finally:
        s2.stop()


def test_kill9_during_concurrent_uploads_loses_nothing_it_acknowledged(run, tmp_path):
    """Concurrent clients upload different films; the server is killed (-9) mid-way and restarted: every upload
    that got a success response is in the worklist, and nothing is there twice."""
    import threading

    db = tmp_path / "db.sqlite"
    s = Server(run, db)
    acked: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=30) as http:
            for i in range(40):
                name = f"c{c}-{i}.png"
                try:
                    r = http.post(f"{s.url}/v1/images", files=[("files", (name, png(blob_images(1, 64, seed=1000 + 40 * c + i)[0]), "image/png"))])
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 200:
                    with lock:
                        acked.append(name)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while time.time() < deadline and len(acked) < 20:
        time.sleep(0.05)
    s.stop(signal.SIGKILL)
    for t in threads:
        t.join()
    s2 = Server(run, db)
    try:
        listed = httpx.get(f"{s2.url}/v1/studies", params={"limit": 1000}).json()
        names = []
        for item in listed["items"]:
            names += [i["file_name"] for i in httpx.get(f"{s2.url}/v1/studies/{item['study_key']}").json()["images"]]
        assert len(acked) >= 20 and set(acked) <= set(names)  # every acknowledged upload survived the kill
        assert len(names) == len(set(names)) == httpx.get(f"{s2.url}/healthz").json()["images"]  # nothing twice
    finally:
        s2.stop()
