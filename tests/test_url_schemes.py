"""What `cm3 ingest` fetches: http and https only, refused before any I/O, redirects included. Real HTTP over
loopback (the demo server), a real FTP-speaking listener, real files, img2dataset's own download function."""

from __future__ import annotations

import base64
import re
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cm3.pipeline.image_checks import failure_reason
from cm3.pipeline.url_schemes import REFUSED, http_only_opener, install_http_only_opener, refusal
from cm3.synthetic.server import image_jpeg

ACCEPTED = ["http://127.0.0.1/a.jpg", "https://example.com/a.jpg", "HTTP://EXAMPLE.COM/A.JPG", "HttpS://x/y",
            "  http://x/y\n"]
REFUSED_URLS = {  # url -> the scheme its refusal names ('' for none)
    "file:///etc/hostname": "file",
    "FILE:///etc/hostname": "file",
    "<URL:file:///etc/hostname>": "file",  # urllib unwraps this form
    "ftp://127.0.0.1/a.jpg": "ftp",
    "data:image/png;base64,iVBORw0KGgo=": "data",
    "gopher://127.0.0.1:70/1": "gopher",
    "javascript:alert(1)": "javascript",
    "/etc/hostname": "",
    "etc/hostname": "",
    "://127.0.0.1/a.jpg": "",
    "": "",
}


@pytest.mark.parametrize("url", ACCEPTED)
def test_http_and_https_are_fetched_in_any_case(url):
    assert refusal(url) is None


@pytest.mark.parametrize("url, scheme", REFUSED_URLS.items())
def test_every_other_scheme_or_none_is_refused_and_counted(url, scheme):
    why = refusal(url)
    assert why is not None and why.startswith(REFUSED), why
    assert why.startswith(f"{REFUSED} {scheme!r}" if scheme else f"{REFUSED}: none given"), why
    assert failure_reason(why) == "unsupported_scheme"


def test_a_missing_url_is_refused():
    assert refusal(None).startswith(f"{REFUSED}: none given")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_random_text_never_raises_and_is_fetched_only_as_http(text):
    why = refusal(text)
    if why is None:  # then it starts with http: or https: (after urllib's whitespace and <URL:...> unwrapping)
        assert re.match(r"\s*(<\s*)?(URL:\s*)?https?:", text, re.IGNORECASE), text
    else:
        assert why.startswith(REFUSED) and failure_reason(why) == "unsupported_scheme"


@settings(max_examples=200, deadline=None)
@given(scheme=st.from_regex(r"[A-Za-z][A-Za-z0-9+.\-]{0,7}", fullmatch=True), rest=st.text())
def test_a_url_is_fetched_exactly_when_its_scheme_is_http_or_https(scheme, rest):
    assert (refusal(f"{scheme}://{rest}") is None) == (scheme.lower() in ("http", "https"))


# --- the opener over real connections ------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path) -> Path:
    """A real PNG on this machine's disk: what a hostile URL list would like to read."""
    path = tmp_path / "secret.png"
    Image.new("RGB", (32, 32), (13, 200, 77)).save(path)
    return path


class FtpListener:
    """A loopback TCP listener that answers like an FTP server refusing service, and counts connections."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"ftp://127.0.0.1:{self.sock.getsockname()[1]}/a.jpg"
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # shut down
                return
            self.connections += 1
            with conn:
                conn.sendall(b"421 Service not available\r\n")

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not)
        self.sock.close()
        self.thread.join()


@pytest.fixture
def ftp_listener():
    listener = FtpListener()
    yield listener
    listener.close()


def redirect(server, target: str) -> str:
    return f"{server.url}/redirect?{urlencode({'to': target})}"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_the_opener_fetches_http_and_refuses_local_files_that_urllib_would_read(demo_server, secret, ftp_listener):
    opener = http_only_opener()
    with opener.open(f"{demo_server.url}/images/train/0.jpg", timeout=30) as response:
        assert response.read() == image_jpeg(0, "train", 0)
    for url in (secret.as_uri(), data_url(secret)):  # urllib's own opener reads both
        with urllib.request.build_opener().open(url) as response:
            assert response.read() == secret.read_bytes()
    for url in (secret.as_uri(), secret.as_uri().upper(), data_url(secret), ftp_listener.url):
        with pytest.raises(urllib.error.URLError, match=REFUSED):
            opener.open(url, timeout=30)
    assert ftp_listener.connections == 0


def test_redirects_to_another_scheme_are_refused(demo_server, secret, ftp_listener):
    opener = http_only_opener()
    with opener.open(redirect(demo_server, f"{demo_server.url}/images/train/1.jpg"), timeout=30) as response:
        assert response.read() == image_jpeg(0, "train", 1)  # http -> http is followed
    with pytest.raises(urllib.error.URLError, match="421 Service not available"):  # urllib's opener goes to ftp
        urllib.request.build_opener().open(redirect(demo_server, ftp_listener.url), timeout=30)
    assert ftp_listener.connections == 1
    for target in (ftp_listener.url, secret.as_uri(), data_url(secret)):
        with pytest.raises(urllib.error.URLError, match=f"{REFUSED} .* in a redirect") as refused:
            opener.open(redirect(demo_server, target), timeout=30)
        assert failure_reason(str(refused.value)) == "unsupported_scheme"
    assert ftp_listener.connections == 1


@pytest.fixture
def http_only_urllib():
    install_http_only_opener()
    yield
    urllib.request.install_opener(None)  # urllib's default again


def test_img2dataset_downloads_through_the_http_only_opener(demo_server, secret, http_only_urllib):
    from img2dataset.downloader import download_image

    _, stream, error = download_image((0, f"{demo_server.url}/images/train/2.jpg"), 30, None, None)
    assert error is None and stream.read() == image_jpeg(0, "train", 2)
    for url in (secret.as_uri(), str(secret), data_url(secret), redirect(demo_server, secret.as_uri())):
        _, stream, error = download_image((1, url), 30, None, None)
        assert stream is None and failure_reason(error) == "unsupported_scheme", (url, error)
