"""ImageNet weights through timm and the Hugging Face hub, against a local stand-in for the hub.

The stand-in answers as huggingface.co does for a file stored in LFS: ``HEAD/GET {endpoint}/{repo}/resolve/{rev}/
{file}`` is a 302 to a second origin (the CDN) carrying ``X-Repo-Commit``, ``X-Linked-Etag`` and ``X-Linked-Size``;
the CDN serves the bytes with ``ETag`` and ``Content-Length``. Unknown files are a 404 with ``X-Error-Code:
EntryNotFound``. Nothing here reaches the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import timm
import torch
from safetensors.torch import save_file

from drift import models, weights

ARCH = "resnet10t"
REPO = timm.models.get_pretrained_cfg(ARCH).hf_hub_id
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Two local HTTP servers, the hub and its CDN, serving ``files`` ((repo, filename) -> bytes) at ``COMMIT``."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.hub = self._serve()
        self.cdn = self._serve()
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def _serve(self) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        server.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        server.thread.start()
        return server

    def blobs(self) -> dict[str, bytes]:
        return {hashlib.sha256(data).hexdigest(): data for data in self.files.values()}

    def stop(self) -> None:
        for server in (self.hub, self.cdn):
            if server.thread.is_alive():
                server.shutdown()
                server.server_close()
                server.thread.join(timeout=5)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 5

        def log_message(self, *args) -> None:
            pass

        def _answer(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body)), "Connection": "close"}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)
            self.close_connection = True

        def _reply(self) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            on_cdn = self.server is hub.cdn
            resolve = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", path)
            blob = re.fullmatch(r"/blobs/([0-9a-f]{64})", path)
            if resolve and not on_cdn and (resolve[1], resolve[3]) in hub.files:
                data = hub.files[(resolve[1], resolve[3])]
                sha = hashlib.sha256(data).hexdigest()
                self._answer(302, {"Location": f"{hub.cdn_url}/blobs/{sha}", "X-Repo-Commit": COMMIT,
                                   "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)), "ETag": '"ptr"'})
            elif blob and on_cdn and blob[1] in hub.blobs():
                data = hub.blobs()[blob[1]]
                self.send_response(200)
                for key, value in {"ETag": f'"{blob[1]}"', "Content-Length": str(len(data)),
                                   "Content-Type": "application/octet-stream", "Connection": "close"}.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)
                self.close_connection = True
            else:
                self._answer(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT,
                                   "X-Error-Message": "Entry not found"}, b"Entry not found")

        do_HEAD = do_GET = _reply

    return Handler


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running stand-in for the hub; ``HF_ENDPOINT`` points to it and the hub cache is an empty temporary folder."""
    fake = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    yield fake
    fake.stop()


def _served_state(arch: str = ARCH, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full timm state dict of ``arch`` (classifier included, as on the hub) with random values."""
    torch.manual_seed(seed)
    sd = timm.create_model(arch).state_dict()
    return {k: (torch.randn_like(v) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def _safetensors_bytes(sd: dict[str, torch.Tensor], tmp_path: Path) -> bytes:
    path = tmp_path / "served.safetensors"
    save_file(sd, str(path))
    return path.read_bytes()


def _assert_backbone_is(model: models.Classifier, served: dict[str, torch.Tensor]) -> None:
    own = model.backbone.state_dict()
    assert own and set(own) == {k for k in served if not k.startswith("fc.")}
    for key, value in own.items():
        assert torch.equal(value, served[key]), key


def test_download_on_first_use_then_the_cache_with_the_hub_gone(hub, tmp_path):
    served = _served_state()
    hub.files[(REPO, "model.safetensors")] = _safetensors_bytes(served, tmp_path)
    model = models.build(ARCH, 3)
    head = [p.detach().clone() for p in model.head.parameters()]
    origin = weights.load_imagenet(model)
    assert REPO in origin and "model.safetensors" in origin and COMMIT in origin
    _assert_backbone_is(model, served)
    assert all(torch.equal(a, b) for a, b in zip(head, model.head.parameters()))
    assert ("HEAD", f"/{REPO}/resolve/main/model.safetensors") in hub.requests
    assert any(m == "GET" and p.startswith("/blobs/") for m, p in hub.requests)
    cached = tmp_path / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT / "model.safetensors"
    assert cached.is_file()

    hub.stop()
    asked = len(hub.requests)
    again = models.build(ARCH, 3)
    assert weights.load_imagenet(again) == origin
    _assert_backbone_is(again, served)
    assert len(hub.requests) == asked


def test_pickled_file_when_the_repo_has_no_safetensors(hub, tmp_path):
    served = _served_state(seed=1)
    torch.save(served, tmp_path / "pytorch_model.bin")
    hub.files[(REPO, "pytorch_model.bin")] = (tmp_path / "pytorch_model.bin").read_bytes()
    model = models.build(ARCH, 3)
    assert "pytorch_model.bin" in weights.load_imagenet(model)
    _assert_backbone_is(model, served)
    assert ("HEAD", f"/{REPO}/resolve/main/model.safetensors") in hub.requests


def test_offline_with_an_empty_cache_names_the_repo_and_the_cache(hub, tmp_path, monkeypatch):
    hub.files[(REPO, "model.safetensors")] = _safetensors_bytes(_served_state(), tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        weights.load_imagenet(models.build(ARCH, 3))
    msg = str(err.value)
    for part in (ARCH, REPO, "model.safetensors", "pytorch_model.bin", str(tmp_path / "hub"), "HF_HUB_OFFLINE",
                 "model.weights_file", "~/.cache/huggingface/hub"):
        assert part in msg, part
    assert isinstance(err.value, FileNotFoundError)
    assert hub.requests == []


def test_corrupt_served_file_is_named(hub, tmp_path):
    hub.files[(REPO, "model.safetensors")] = b"<html><body>rate limited</body></html>"
    with pytest.raises(ValueError) as err:
        weights.load_imagenet(models.build(ARCH, 3))
    msg = str(err.value)
    assert f"{REPO}/model.safetensors" in msg and "not a valid safetensors file" in msg
    assert "snapshots" in msg and "delete" in msg and "Traceback" not in msg


def test_served_file_of_another_model_is_named(hub, tmp_path):
    hub.files[(REPO, "model.safetensors")] = _safetensors_bytes(_served_state("resnet18"), tmp_path)
    with pytest.raises(ValueError) as err:
        weights.load_imagenet(models.build(ARCH, 3))
    msg = str(err.value)
    assert f"{REPO}/model.safetensors" in msg and "resnet10t" in msg


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_corrupt_local_weights_file_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00not a checkpoint" * 8)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        weights.load_imagenet(models.build(ARCH, 3), str(path))


def test_local_file_in_the_hubs_format_loads(tmp_path):
    served = _served_state(seed=2)
    save_file(served, str(tmp_path / "model.safetensors"))
    model = models.build(ARCH, 3)
    assert weights.load_imagenet(model, str(tmp_path / "model.safetensors")) == str(tmp_path / "model.safetensors")
    _assert_backbone_is(model, served)


def test_a_fresh_process_reads_HF_ENDPOINT_at_import(hub, tmp_path):
    """The way a user runs it: the environment is set before Python starts, and huggingface_hub reads it at import."""
    served = _served_state(seed=3)
    hub.files[(REPO, "model.safetensors")] = _safetensors_bytes(served, tmp_path)
    script = (
        "import json, sys, torch\n"
        "from huggingface_hub import constants\n"
        "from drift import models, weights\n"
        "m = models.build(sys.argv[1], 3)\n"
        "origin = weights.load_imagenet(m)\n"
        "torch.save(m.backbone.state_dict(), sys.argv[2])\n"
        "print(json.dumps({'endpoint': constants.ENDPOINT, 'origin': origin}))\n"
    )
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "NO_PROXY": "127.0.0.1"}
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", script, ARCH, str(tmp_path / "bb.pt")], env=env, capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["endpoint"] == hub.url and REPO in report["origin"]
    got = torch.load(tmp_path / "bb.pt", weights_only=True)
    assert set(got) == {k for k in served if not k.startswith("fc.")}
    assert all(torch.equal(v, served[k]) for k, v in got.items())
    assert any(m == "GET" and p.startswith("/blobs/") for m, p in hub.requests)


def test_checkpoint_round_trip_and_refusals(tmp_path):
    torch.manual_seed(1)
    m = models.build("resnet10t", 4).eval()
    sha = weights.save_checkpoint(m, tmp_path / "c.pt", {"phase": "transfer"})
    assert sha == weights.sha256_file(tmp_path / "c.pt")
    m2 = weights.load_checkpoint(tmp_path / "c.pt", "resnet10t", 4)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), m2.eval()(x))
    with pytest.raises(ValueError, match="expected resnet18"):
        weights.load_checkpoint(tmp_path / "c.pt", "resnet18", 4)

    import argparse  # any class outside the weights-only allow-list stands for an arbitrary pickled object

    torch.save({"state_dict": {}, "payload": argparse.Namespace(a=1)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        weights.load_state(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        weights.load_state(tmp_path / "junk.pt")


def test_imagenet_weights_offline_and_absent_name_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: nothing is fetched, the error names what was looked for
    m = models.build("resnet10t", 3)
    with pytest.raises(FileNotFoundError, match="resnet10t"):
        weights.load_imagenet(m)
    with pytest.raises(FileNotFoundError, match="nothere"):
        weights.load_imagenet(m, str(tmp_path / "nothere.pth"))


def test_backbone_weights_file_loads_and_wrong_one_is_named(tmp_path):
    src = models.build("resnet10t", 3)
    torch.save(src.backbone.state_dict(), tmp_path / "w.pth")
    dst = models.build("resnet10t", 3)
    weights.load_backbone_weights(dst, weights.load_state(tmp_path / "w.pth"), "w.pth")
    assert torch.equal(dst.backbone.conv1[0].weight, src.backbone.conv1[0].weight)
    with pytest.raises(ValueError, match="w.pth"):
        weights.load_backbone_weights(models.build("resnet18", 3), weights.load_state(tmp_path / "w.pth"), "w.pth")


def test_imagenet_weights_come_from_a_local_hub_cache(tmp_path, monkeypatch):
    """A cache laid out as the hub lays it out (refs/main -> snapshots/<rev>/model.safetensors) is used offline."""
    import timm
    from safetensors.torch import save_file

    src = models.build("resnet10t", 3)
    hub = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id
    repo = tmp_path / "hub" / ("models--" + hub.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in src.backbone.state_dict().items()}, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    dst = models.build("resnet10t", 3)
    origin = weights.load_imagenet(dst)
    assert hub in origin
    assert torch.equal(dst.backbone.conv1[0].weight, src.backbone.conv1[0].weight)
