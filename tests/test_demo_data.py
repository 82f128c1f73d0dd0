"""The embedded demo data set: generator, pixel checker and loopback server (real HTTP)."""

from __future__ import annotations

import io
import json
import re
import socket
import struct
import threading
import urllib.error
import urllib.request
import zlib
from collections import Counter
from dataclasses import replace

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from cm3.synthetic import shapes
from cm3.synthetic.checker import read_attributes, score
from cm3.synthetic.server import (
    BROKEN_CASES,
    COLUMNS,
    URL_LIST_FORMATS,
    DemoDataServer,
    write_url_list,
)
from PIL import Image

N_SERVED = 40
SLOW_SECONDS = 3.0


# --- generator ----------------------------------------------------------------------------


def test_render_is_byte_for_byte_deterministic() -> None:
    for index in range(5):
        spec = shapes.spec_for(index, seed=7)
        assert spec == shapes.spec_for(index, seed=7)
        again = shapes.spec_for(index, seed=7)
        assert shapes.encode_png(shapes.render(spec)) == shapes.encode_png(shapes.render(again))
        assert shapes.encode_jpeg(shapes.render(spec)) == shapes.encode_jpeg(shapes.render(spec))


def test_different_indices_and_seeds_give_different_specs() -> None:
    specs = [spec for _, spec in shapes.iter_dataset(100)]
    assert len(set(specs)) >= 90  # independent draws: a few repeats among the ~1,000 possible specs
    assert [shapes.spec_for(i, seed=1) for i in range(20)] != specs[:20]
    assert shapes.spec_for(3, split="heldout") != shapes.spec_for(3, split="train")


def test_splits_are_separated() -> None:
    train = [(s.shape, s.colour) for _, s in shapes.iter_dataset(2000, split="train")]
    heldout = [(s.shape, s.colour) for _, s in shapes.iter_dataset(300, split="heldout")]
    assert not set(train) & set(shapes.HELD_OUT)
    assert set(heldout) == set(shapes.HELD_OUT)
    with pytest.raises(ValueError):
        shapes.spec_for(0, split="validation")


def test_every_attribute_value_appears_in_training() -> None:
    train = [spec for _, spec in shapes.iter_dataset(2000)]
    assert {s.shape for s in train} == set(shapes.SHAPES)
    assert {s.colour for s in train} == set(shapes.COLOURS)
    assert {s.size for s in train} == set(shapes.SIZES)
    assert {s.position for s in train} == set(shapes.POSITIONS)
    assert {s.background for s in train} == set(shapes.BACKGROUNDS)
    assert len(shapes.HELD_OUT) == len(shapes.SHAPES) == len({shape for shape, _ in shapes.HELD_OUT})


def test_shapes_lie_inside_the_canvas_on_the_token_grid() -> None:
    """Every box starts and ends on a cell edge inside the canvas, and each (size, position) is one box: the decoder
    draws a handful of whole-cell patterns, and positions of one size are shifts of each other."""
    boxes = {}
    for _, spec in shapes.iter_dataset(2000):
        x0, y0, x1, y1 = spec.bbox
        assert 0 <= x0 < x1 <= shapes.CANVAS
        assert 0 <= y0 < y1 <= shapes.CANVAS
        assert all(v % shapes.CELL == 0 for v in spec.bbox), spec
        assert x1 - x0 == y1 - y0 == shapes.SIZE_CELLS[spec.size] * shapes.CELL
        assert boxes.setdefault((spec.size, spec.position), spec.bbox) == spec.bbox
    assert len(boxes) == len(shapes.SIZES) * len(shapes.POSITIONS)


def test_captions() -> None:
    pattern = re.compile(
        r"a (\w+) (circle|square|triangle) "
        r"(in the center|at the (top left|top|top right|left|right|bottom left|bottom|bottom right)) "
        r"on a (white|black) background"
    )
    for _, spec in shapes.iter_dataset(300):
        match = pattern.fullmatch(spec.caption)
        assert match, spec.caption
        assert match[1] == spec.colour and match[2] == spec.shape and match[5] == spec.background
        assert (match[3] == "in the center") == (spec.position == "center")
    spec = shapes.ShapeSpec("circle", "red", "large", "top left", "white", 96.0, 96.0, 96.0)
    assert spec.caption == spec.alt_text == "a red circle at the top left on a white background"
    assert spec.describe(("size", "position")) == "a large red circle at the top left"


def test_alt_text_names_colour_and_shape_always_and_each_detail_about_half_the_time() -> None:
    specs = [spec for _, spec in shapes.iter_dataset(2000)]
    for spec in specs[:300]:
        assert spec.alt_text.startswith("a ") and f"{spec.colour} {spec.shape}" in spec.alt_text
        assert (spec.size in spec.alt_text.split()) == ("size" in spec.details)
        assert ("background" in spec.alt_text) == ("background" in spec.details)
        assert (" at the " in spec.alt_text or " in the center" in spec.alt_text) == ("position" in spec.details)
    for detail in shapes.DETAILS:
        share = sum(detail in spec.details for spec in specs) / len(specs)
        assert abs(share - shapes.DETAIL_PROBABILITY) < 0.05, (detail, share)


# --- checker ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_dataset() -> list[tuple[shapes.ShapeSpec, np.ndarray]]:
    """300 train + 100 heldout images, rendered then JPEG-encoded at quality 90."""
    train = [s for _, s in shapes.iter_dataset(300)]
    specs = train + [s for _, s in shapes.iter_dataset(100, split="heldout")]
    decode = lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # noqa: E731
    return [(spec, decode(shapes.encode_jpeg(shapes.render(spec), quality=90))) for spec in specs]


def _accuracy(pairs: list[tuple[shapes.ShapeSpec, np.ndarray]]) -> dict[str, float]:
    totals: Counter[str] = Counter()
    for spec, pixels in pairs:
        totals.update(key for key, ok in score(pixels, spec).items() if ok)
    keys = ("colour_ok", "shape_ok", "size_ok", "position_ok", "background_ok")
    return {key: totals[key] / len(pairs) for key in keys}


def test_checker_reads_back_its_own_jpeg_images(jpeg_dataset) -> None:
    accuracy = _accuracy(jpeg_dataset)
    assert accuracy["colour_ok"] == accuracy["shape_ok"] == accuracy["background_ok"] == 1.0, accuracy
    assert accuracy["size_ok"] >= 0.97 and accuracy["position_ok"] >= 0.97, accuracy


def test_checker_survives_noise_and_blur(jpeg_dataset) -> None:
    rng = np.random.default_rng(0)
    degraded = []
    for spec, pixels in jpeg_dataset:
        noisy = np.clip(pixels + rng.normal(0.0, 8.0, pixels.shape), 0, 255).astype(np.uint8)
        degraded.append((spec, cv2.blur(noisy, (3, 3))))
    accuracy = _accuracy(degraded)
    assert accuracy["colour_ok"] >= 0.95 and accuracy["shape_ok"] >= 0.95, accuracy


def test_checker_reads_heavily_blurred_shapes_by_their_taper(jpeg_dataset) -> None:
    """Blur (sigma 6 px) fills a triangle's box towards a circle's fill; its taper still tells it."""
    blurred = [(spec, cv2.GaussianBlur(pixels, (0, 0), 6)) for spec, pixels in jpeg_dataset]
    accuracy = _accuracy(blurred)
    assert accuracy["shape_ok"] >= 0.98, accuracy
    triangles = [pair for pair in blurred if pair[0].shape == "triangle"]
    assert triangles and _accuracy(triangles)["shape_ok"] == 1.0


def test_blobs_that_are_none_of_the_shapes_read_as_no_shape() -> None:
    """A ring, a bar and a smear wider at the top are read as no shape, not credited to the nearest one."""
    canvas = np.zeros((256, 256, 3), np.uint8)
    ring = cv2.circle(canvas.copy(), (128, 128), 60, (220, 30, 30), thickness=30)
    bar = cv2.rectangle(canvas.copy(), (40, 110), (216, 146), (30, 70, 230), thickness=-1)
    wedge = cv2.fillPoly(canvas.copy(), [np.array([[60, 60], [196, 60], [128, 190]], np.int32)], (30, 160, 50))
    for image, colour in ((ring, "red"), (bar, "blue"), (wedge, "green")):
        reading = read_attributes(image)
        assert reading.ok and reading.colour == colour and reading.shape is None, reading


def test_image_accuracy_scores_erased_and_recoloured_shapes_wrong() -> None:
    from cm3.workflows.demo import evaluate

    specs = [shapes.spec_for(i) for i in range(30)]
    images = evaluate.spec_images(specs, 256)
    images[:10] = images[:10, :, :1, :1].expand(-1, -1, 256, 256)  # the shape erased: background only
    asked = specs[:20] + [replace(spec, colour="red" if spec.colour != "red" else "blue") for spec in specs[20:]]
    result = evaluate.image_accuracy(images, asked)
    assert result == {"colour_accuracy": pytest.approx(10 / 30), "shape_accuracy": pytest.approx(20 / 30),
                      "images": 30}


class _Favouring(torch.nn.Module):
    """A decoder whose logits are raised by ``bias`` (only in sequences holding ``word``, when given): zero
    logits plus a bias give a known distribution."""

    def __init__(self, model, bias: torch.Tensor, word: int | None = None):
        super().__init__()
        self.model, self.bias, self.word = model, bias, word

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.word is None:
            return self.model(ids) + self.bias
        return self.model(ids) + (ids == self.word).any(dim=1).float()[:, None, None] * self.bias


def test_image_nll_is_per_image_token(tmp_path) -> None:
    import math

    from cm3.model.config import CM3Config
    from cm3.model.decoder import CM3
    from cm3.workflows.demo import evaluate
    from factories import TINY_F32, captions, make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tokenizer", TINY_F32, captions())
    vocab = tokenizer.vocab
    model = CM3(CM3Config.from_dict({"vocab_size": vocab.size, "n_layers": 1, "d_model": 32, "n_heads": 2,
                                     "max_seq_len": 128, "positions": "rope"})).eval()
    torch.nn.init.zeros_(model.tok_emb.weight)  # zero inputs stay zero through every block: all logits 0
    specs = [shapes.spec_for(i) for i in range(3)]
    documents = evaluate.caption_first_documents(tokenizer, [spec.alt_text for spec in specs],
                                                 evaluate.spec_codes(tokenizer, specs))
    assert all(sum(vocab.is_image(np.asarray(doc))) == tokenizer.tokens_per_image for doc in documents)
    assert evaluate.image_nll(model, vocab, documents) == pytest.approx(math.log(vocab.size), abs=1e-3)
    # all the mass on image ids: uniform over the image codes, and text targets (then ~30 nats) must not count
    image_only = torch.where(torch.from_numpy(np.asarray(vocab.is_image(np.arange(vocab.size)))), 30.0, 0.0)
    nll = evaluate.image_nll(_Favouring(model, image_only), vocab, documents)
    assert nll == pytest.approx(math.log(vocab.image_vocab_size), abs=1e-3)


def test_caption_reliance_is_the_loss_rise_of_the_swapped_word_only(tmp_path) -> None:
    import math

    from cm3.model.config import CM3Config
    from cm3.model.decoder import CM3
    from cm3.workflows.demo import evaluate
    from factories import TINY_F32, captions, make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tokenizer", TINY_F32, captions())
    vocab = tokenizer.vocab
    model = CM3(CM3Config.from_dict({"vocab_size": vocab.size, "n_layers": 1, "d_model": 32, "n_heads": 2,
                                     "max_seq_len": 128, "positions": "rope"})).eval()
    torch.nn.init.zeros_(model.tok_emb.weight)  # all logits 0: it reads nothing
    specs = [spec for spec in (shapes.spec_for(i) for i in range(60)) if spec.colour == "red"][:3]
    documents = evaluate.reliance_documents(tokenizer, specs, evaluate.spec_codes(tokenizer, specs))
    ignoring = evaluate.caption_reliance(model, vocab, documents)
    assert ignoring["full_caption"] == pytest.approx(math.log(vocab.size), abs=1e-3)
    assert all(abs(rise) < 1e-5 for name, rise in ignoring.items() if name != "full_caption"), ignoring

    red = sorted(set(documents["full_caption"][0]) - set(documents["colour_swapped"][0]))[0]  # "red" in this BPE
    image_only = torch.where(torch.from_numpy(np.asarray(vocab.is_image(np.arange(vocab.size)))), 30.0, 0.0)
    reading = evaluate.caption_reliance(_Favouring(model, image_only, word=red), vocab, documents)
    assert reading["full_caption"] == pytest.approx(math.log(vocab.image_vocab_size), abs=1e-3)
    assert reading["colour_swapped"] == pytest.approx(math.log(vocab.size / vocab.image_vocab_size), abs=1e-3)
    assert all(abs(rise) < 1e-5 for name, rise in reading.items() if name not in ("full_caption", "colour_swapped"))


def test_checker_accepts_pil_images_of_any_size() -> None:
    spec = shapes.spec_for(11)
    reading = read_attributes(shapes.render(spec, size=512))
    assert reading.ok
    assert (reading.colour, reading.shape, reading.size, reading.position, reading.background) == (
        spec.colour, spec.shape, spec.size, spec.position, spec.background,
    )  # fmt: skip


def test_blank_image_is_not_ok() -> None:
    reading = read_attributes(np.full((256, 256, 3), 255, np.uint8))
    assert not reading.ok and reading.background == "white" and reading.shape is None
    spec = shapes.spec_for(0)
    assert score(np.zeros((64, 64, 3), np.uint8), spec) == {
        "colour_ok": False, "shape_ok": False, "size_ok": False, "position_ok": False,
        "background_ok": spec.background == "black",
    }  # fmt: skip


# --- server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with DemoDataServer(n=N_SERVED, seed=0, slow_seconds=SLOW_SECONDS) as running:
        yield running


def _get(url: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes, str]:
    """(status, headers, body, final url) of a GET, following redirects, never raising on 4xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read(), response.url
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read(), url


def _outcome(url: str, timeout: float) -> str:
    """Classify a download the way an ingester must (the names used by BROKEN_CASES)."""
    try:
        status, headers, body, _ = _get(url, timeout)
    except (TimeoutError, urllib.error.URLError) as error:
        assert "timed out" in str(error)
        return "timeout"
    if status != 200:
        return f"http_{status}"
    if not headers["Content-Type"].startswith("image/"):
        return "not_an_image"
    try:
        with Image.open(io.BytesIO(body)) as image:
            image.load()
    except Image.DecompressionBombError:
        return "image_too_large"
    except OSError:
        return "truncated"
    return "success"


def test_image_route_serves_the_rendered_jpeg(server) -> None:
    status, headers, body, _ = _get(f"{server.url}/images/train/3.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert int(headers["Content-Length"]) == len(body)
    image = Image.open(io.BytesIO(body))
    assert image.format == "JPEG" and image.size == (256, 256)
    rendered = shapes.render(shapes.spec_for(3))
    assert body == shapes.encode_jpeg(rendered)
    assert np.abs(np.asarray(image.convert("RGB"), float) - np.asarray(rendered, float)).mean() < 2.0


@pytest.mark.parametrize(
    "path", [f"/images/train/{N_SERVED}.jpg", "/images/test/0.jpg", "/images/train/x.jpg", "/nope"]
)
def test_unknown_paths_are_404(server, path: str) -> None:
    assert _get(server.url + path)[0] == 404


def _parse(fmt: str, body: bytes) -> pd.DataFrame:
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(body)).to_pandas()
    if fmt == "jsonl":
        return pd.DataFrame([json.loads(line) for line in body.decode().splitlines()])
    if fmt in ("csv", "tsv"):
        return pd.read_csv(io.BytesIO(body), sep="," if fmt == "csv" else "\t", dtype=str)
    return pd.DataFrame({"url": body.decode().splitlines()})


@pytest.mark.parametrize("fmt", list(URL_LIST_FORMATS))
def test_url_lists_parse_with_rows_and_columns(server, fmt: str) -> None:
    status, headers, body, _ = _get(f"{server.url}/urls.{fmt}")
    assert status == 200 and headers["Content-Type"] == URL_LIST_FORMATS[fmt]
    table = _parse(fmt, body)
    assert list(table.columns) == (["url"] if fmt == "txt" else list(COLUMNS))
    assert len(table) == N_SERVED
    assert table["url"][5] == f"{server.url}/images/train/5.jpg"
    if fmt != "txt":
        spec = shapes.spec_for(5)
        assert table["caption"][5] == spec.alt_text and table["shape"][5] == spec.shape

    limited = _parse(fmt, _get(f"{server.url}/urls.{fmt}?n=7&broken=1")[2])
    assert len(limited) == 7 + len(BROKEN_CASES)
    assert list(limited["url"][7:]) == [server.url + path for path, _ in BROKEN_CASES.values()]
    if fmt != "txt":
        assert limited["caption"].str.startswith("a ").all()


@pytest.mark.parametrize("fmt", list(URL_LIST_FORMATS))
def test_written_url_list_matches_the_served_one(server, tmp_path, fmt: str) -> None:
    path = write_url_list(tmp_path / f"urls.{fmt}", server.url, N_SERVED, include_broken=True)
    assert path.read_bytes() == _get(f"{server.url}/urls.{fmt}?broken=1")[2]


class _HeldUntilReleased(threading.Event):
    """Stands in for the server's ``stopping`` event, which a slow request waits on: here it waits until the test
    releases it, whatever the timeout, and ``reached`` tells the test that a request is being held."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.reached.set()
        return super().wait()


@pytest.mark.parametrize("name", list(BROKEN_CASES))
def test_broken_case_has_its_stated_outcome(server, name: str, monkeypatch) -> None:
    path, expected = BROKEN_CASES[name]
    if name != "slow":
        assert _outcome(server.url + path, timeout=60) == expected
        return
    held = _HeldUntilReleased()  # the answer never comes before the client gives up, however busy the machine
    monkeypatch.setattr(server, "stopping", held)
    try:
        assert _outcome(server.url + path, timeout=1.0) == expected
        assert held.reached.is_set()
    finally:
        held.set()


def _inflated_size(png: bytes) -> int:
    """Bytes in the PNG's IDAT stream once inflated, streamed so memory stays small."""
    length = struct.unpack(">I", png[33:37])[0]
    assert png[37:41] == b"IDAT"
    inflater, pending, total = zlib.decompressobj(), png[41 : 41 + length], 0
    while pending or not inflater.eof:
        total += len(inflater.decompress(pending, 1 << 24))
        pending = inflater.unconsumed_tail
    return total


def test_broken_case_details(server, monkeypatch) -> None:
    url = server.url + "/broken/"
    status, headers, body, _ = _get(url + "truncated.jpg")
    assert status == 200 and 0 < len(body) < len(shapes.encode_jpeg(shapes.render(shapes.spec_for(1))))
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()

    status, headers, body, _ = _get(url + "html.jpg")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<html>" in body

    status, _, body, final_url = _get(url + "redirect.jpg")
    assert status == 200 and "/images/train/" in final_url and Image.open(io.BytesIO(body)).size == (256, 256)

    _, headers, body, _ = _get(url + "huge.png")
    assert headers["Content-Type"] == "image/png" and len(body) < 1_000_000
    assert struct.unpack(">II", body[16:24]) == (16000, 16000)
    assert _inflated_size(body) == 16000 * 16001  # the hand-built deflate stream is complete
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(io.BytesIO(body)) as huge:  # reads the header only
        assert min(huge.size) >= 16000 and huge.mode == "L"

    for name, mode in (("alpha.png", "RGBA"), ("grey.jpg", "L"), ("cmyk.jpg", "CMYK")):
        image = Image.open(io.BytesIO(_get(url + name)[2]))
        image.load()
        assert image.mode == mode and image.size == (256, 256), name
    alpha = np.asarray(Image.open(io.BytesIO(_get(url + "alpha.png")[2])))[..., 3]
    assert alpha.min() == 0 and alpha.max() == 255


def test_slow_request_does_not_block_others(server, monkeypatch) -> None:
    held = _HeldUntilReleased()
    monkeypatch.setattr(server, "stopping", held)
    outcome: list[str] = []
    slow = threading.Thread(target=lambda: outcome.append(_outcome(server.url + "/broken/slow.jpg", 1.0)))
    slow.start()
    try:
        assert held.reached.wait(60), "the slow request never reached the server"
        assert _get(f"{server.url}/images/train/2.jpg", timeout=60)[0] == 200  # served while the slow one is held
        slow.join()
        assert outcome == ["timeout"]  # the server holds the slow answer until released: the client gives up
    finally:
        held.set()


def _handler_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "process_request_thread" in t.name}


def test_client_hanging_up_early_prints_nothing(server, capfd) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    before = _handler_threads()
    for path in ("/broken/huge.png", "/images/train/1.jpg", "/urls.parquet") * 3:
        with socket.socket() as client:
            client.connect(("127.0.0.1", port))
            client.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset on close
    # Connections are accepted in order: once this one is answered, every reset one has its handler thread.
    assert _get(f"{server.url}/images/train/0.jpg")[0] == 200
    for thread in _handler_threads() - before:
        thread.join(60)
        assert not thread.is_alive()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err


def test_only_loopback_binding_is_allowed() -> None:
    for host in ("0.0.0.0", "192.168.1.10", "localhost", "::"):
        with pytest.raises(ValueError):
            DemoDataServer(n=5, host=host)
    with DemoDataServer(n=5) as local:
        assert local.url.startswith("http://127.0.0.1:")
