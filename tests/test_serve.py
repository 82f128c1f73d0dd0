"""`cm3 serve` as a user runs it: a subprocess on loopback with its own Ray, real HTTP, concurrent clients,
every kind of bad request, back-pressure, and a shutdown that takes its Ray down and leaves another one alone."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from cm3.model.checkpoint import save_checkpoint
from cm3.model.config import CM3Config
from cm3.model.decoder import CM3
from cm3.tokenizers.multimodal import MultimodalTokenizer
from cm3.tokenizers.text import TextTokenizer
from cm3.tokenizers.vqgan import VQGAN, VQGANConfig
from cm3.workflows.ray_cluster import LocalRayCluster
from conftest import BIN, RAY_ENV, free_port

MAX_BATCH_IMAGES = 4
MARKER = "CM3_SERVE_TEST"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny decoder with a 32x32 VQ-GAN (8x8 = 64 tokens per image) and a context of 96 positions."""
    captions = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")]
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(ch=8, ch_mult=(1, 2, 2), z_channels=16, embed_dim=16, n_embed=16, resolution=32,
                           norm_groups=8, num_res_blocks=1, attn_resolutions=())).eval()
    tokenizer = MultimodalTokenizer(TextTokenizer.train(captions * 4, vocab_size=300), vq)
    model = CM3(CM3Config(vocab_size=tokenizer.vocab.size, n_layers=2, d_model=32, n_heads=4, max_seq_len=96))
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.3)
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", model, tokenizer)


def call(url: str, body: bytes | dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except json.JSONDecodeError:
            return err.code, {"text": text.decode(errors="replace")}


def wait_for_health(url: str, proc: subprocess.Popen, deadline_s: float) -> dict:
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"cm3 serve exited {proc.returncode}:\n{proc.stderr.read()}")
        try:
            status, body = call(f"{url}/health", timeout=5)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.5)  # polling a condition with a deadline, not synchronising on time
    raise AssertionError(f"{url}/health never answered 200 within {deadline_s} s")


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries marker (the server and every process its Ray started)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split(") ", 1)[1]
        except (OSError, IndexError):
            continue
        if marker.encode() in environ and not state.startswith("Z"):
            found.append(int(proc.name))
    return found


def png(payload: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert image.format == "PNG"
    return image


@pytest.mark.slow  # two Ray clusters and a Serve application
def test_cm3_serve_batches_refuses_bad_requests_and_shuts_down_its_own_ray(checkpoint, monkeypatch):
    monkeypatch.setenv("RAY_raylet_start_wait_time_s", "300")  # Ray's 60 s is short on a busy 2-core machine
    marker = f"{MARKER}={os.getpid()}-{time.time_ns()}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with LocalRayCluster(head_cpus=1) as other_ray:  # someone else's Ray on the same machine
        other_pids = other_ray.pids()
        assert other_pids
        env = {**os.environ, **RAY_ENV, marker.split("=")[0]: marker.split("=")[1]}
        proc = subprocess.Popen(
            [str(BIN / "cm3"), "serve", str(checkpoint), "--port", str(port), "--max-batch-images",
             str(MAX_BATCH_IMAGES), "--batch-wait-ms", "50", "--max-queued", "8", "--max-body-bytes", "65536"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            health = wait_for_health(url, proc, deadline_s=300)
            assert health["status"] == "ok" and health["max_batch_images"] == MAX_BATCH_IMAGES

            # 8 concurrent clients; two of them send the same request (batched apart, the same images)
            requests = [{"prompt": "a red circle", "n": 1 + i % 2, "seed": i, "guidance": 2.0 + i,
                         "method": ("top_p", "cd_k", "mix")[i % 3], "temperature": 0.9} for i in range(7)]
            requests.append(dict(requests[1]))
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda body: call(f"{url}/generate", body), requests))
            for body, (status, answer) in zip(requests, answers):
                assert status == 200, answer
                assert len(answer["images"]) == body["n"] and answer["seconds"] > 0
                assert all(png(image).size == (32, 32) for image in answer["images"])
            assert answers[1][1]["images"] == answers[7][1]["images"]
            assert answers[1][1]["images"] != answers[4][1]["images"]

            # every bad request gets its 4xx naming the field; the server keeps serving
            bad = [
                (b"{not json", 400, None),
                (b"[1, 2]", 400, None),
                ({"prompt": "a red circle", "colour": "red"}, 422, "colour"),
                ({"prompt": "a red circle", "n": 0}, 422, "n"),
                ({"prompt": "a red circle", "n": MAX_BATCH_IMAGES + 1}, 422, "n"),
                ({"prompt": "a red circle", "n": "2"}, 422, "n"),
                ({"prompt": "red " * 200}, 422, "prompt"),
                ({"prompt": "a red circle", "method": "beam"}, 422, "method"),
                ({"prompt": "a red circle", "temperature": 0}, 422, "temperature"),
                ({"prompt": "a red circle", "retrieved": 2}, 422, "retrieved"),
                ({"n": 1}, 422, "prompt"),
                (b"x" * 70_000, 413, None),
            ]
            for body, status, field in bad:
                got, answer = call(f"{url}/generate", body)
                assert (got, answer.get("field")) == (status, field), (body if len(str(body)) < 200 else "big", answer)
                assert field is None or answer["error"].startswith(f"{field}:")
            not_an_image = base64.b64encode(b"GIF89a not really").decode()
            for body, field in [({"image": not_an_image}, "image"), ({"image": "%%%"}, "image"),
                                ({"image": not_an_image, "question": 3}, "question")]:
                got, answer = call(f"{url}/caption", body)
                assert (got, answer.get("field")) == (422, field), answer

            status, answer = call(f"{url}/generate", {"prompt": "a green square", "n": 2, "seed": 5})
            assert status == 200 and len(answer["images"]) == 2
            buffer = io.BytesIO()
            Image.new("RGB", (48, 40), (200, 30, 30)).save(buffer, format="JPEG")
            status, answer = call(f"{url}/caption", {"image": base64.b64encode(buffer.getvalue()).decode(),
                                                     "question": "what colour?"})
            assert status == 200 and isinstance(answer["caption"], str)

            # back-pressure: far more requests than the replica takes plus the queue -> some 503s, no waiting
            burst = [{"prompt": "a blue circle", "n": MAX_BATCH_IMAGES, "seed": i} for i in range(40)]
            with ThreadPoolExecutor(40) as pool:
                statuses = [status for status, _ in pool.map(lambda body: call(f"{url}/generate", body), burst)]
            assert set(statuses) == {200, 503}, statuses  # served up to the limits, refused beyond them
            assert call(f"{url}/generate", {"prompt": "a red square", "seed": 1})[0] == 200

            ours = [pid for pid in marked_pids(marker) if pid != proc.pid]
            assert len(ours) >= 3  # its Ray: GCS, raylet, workers (Serve's controller, proxy, replica)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
            assert proc.returncode == 0, proc.stderr.read()
            deadline = time.time() + 30
            while marked_pids(marker) and time.time() < deadline:
                time.sleep(0.2)
            assert marked_pids(marker) == []
            assert all(Path(f"/proc/{pid}").exists() for pid in other_pids)  # the other Ray is untouched
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pid in marked_pids(marker):
                os.kill(pid, signal.SIGKILL)
