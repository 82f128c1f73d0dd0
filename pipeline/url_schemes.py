"""What ``cm3 ingest`` fetches: http and https URLs, nothing else.

A URL list is data from the internet, and img2dataset downloads it with ``urllib.request.urlopen``, whose default
opener also reads ``file:`` URLs (the machine's own files), ``ftp:`` and ``data:`` URLs, and follows a redirect from
http to ftp. img2dataset takes no opener, so ``install_http_only_opener`` replaces urllib's process-wide one in the
download worker: it has only the http and https handlers, and it refuses every request whose scheme is another,
before any I/O, redirects included. A refused row is a failed row like any other: its message starts with
``REFUSED`` and the summary counts it as ``unsupported_scheme``.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import urljoin

FETCHED_SCHEMES = ("http", "https")
REFUSED = "unsupported URL scheme"


def url_scheme(url: str) -> str:
    """The scheme urllib dispatches ``url`` on, lower-case, or '' when it has none. urllib's own ``Request`` parses
    it (no I/O), so this check and the fetch cannot read a URL differently."""
    try:
        return urllib.request.Request(url).type
    except ValueError:  # urllib's "unknown url type": no scheme at all
        return ""


def refusal(url: object, redirect: bool = False) -> str | None:
    """None when ``cm3 ingest`` fetches ``url``; otherwise why not, as a row's error message (without the URL, which
    the row has, so that the per-shard message counts stay few)."""
    scheme = url_scheme(url) if isinstance(url, str) else ""
    if scheme in FETCHED_SCHEMES:
        return None
    what = f"{REFUSED} {scheme!r}" if scheme else f"{REFUSED}: none given"
    return f"{what}{' in a redirect' if redirect else ''}; cm3 ingest fetches http and https URLs only"


class _SchemeGuard(urllib.request.BaseHandler):
    """Refuses a request before any handler opens it (``default_open`` runs first for every request)."""

    handler_order = 0

    def default_open(self, req: urllib.request.Request) -> None:
        why = refusal(req.full_url)
        if why is not None:
            raise urllib.error.URLError(why)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, refusing a target of another scheme with ``REFUSED`` (urllib itself follows http -> ftp
    and answers http -> file with an HTTP error that would be counted as a redirect status)."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers["location"] if "location" in headers else headers.get("uri")
        try:
            why = None if target is None else refusal(urljoin(req.full_url, target), redirect=True)
        except ValueError:  # an unparsable target: urllib's own handling says so
            why = None
        if why is not None:
            fp.close()
            raise urllib.error.URLError(why)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def http_only_opener() -> urllib.request.OpenerDirector:
    """An opener with only what http and https need: no file, ftp or data handler to fall back on."""
    opener = urllib.request.OpenerDirector()
    for handler in (_SchemeGuard(), urllib.request.ProxyHandler(), urllib.request.UnknownHandler(),
                    urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), _Redirects(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def install_http_only_opener() -> None:
    """Make ``urllib.request.urlopen`` fetch http and https only, in this process (a download worker)."""
    urllib.request.install_opener(http_only_opener())
