"""The one URL policy for every request sonoseg sends: what a URL's origin is, and which URLs are refused.

Why this module exists: the origin check that decides whether the Label Studio API key may go
with a request, and the image-host allow-list, must read a URL exactly as the HTTP client that
sends it does. ``urllib.parse.urlsplit`` and urllib3's ``parse_url`` (which ``requests`` uses)
disagree on some URLs: ``http://127.0.0.1:9\\@label-studio/x`` is host ``label-studio`` to the
first (user info before the last ``@``) but host ``127.0.0.1`` to the second (the authority ends
at the backslash), so a check with one and a request with the other sent the key to an attacker.

The rules (:func:`check_url`):

1. only ``http`` and ``https`` (any case; normalised to lower case), with a ``//`` authority;
2. no backslash, control character, whitespace or other non-printable character anywhere, since
   parsers strip, keep or end components at them differently; the one exception is a plain space
   in the path or query (file names have them), which is sent percent-encoded as ``%20``;
3. no user info (no ``@`` in the authority) and no ``%`` (percent-encoded hosts are decoded by
   urllib3 but not by urllib), non-ASCII (IDNA) hosts refused;
4. the host is a plain DNS name / IPv4 address (``[a-z0-9_-]`` labels separated by single dots)
   or a bracketed IPv6 literal without a zone; the port, when written, is canonical decimal
   1..65535;
5. urllib3 (the client's parser), urllib, and ``requests``' own preparation of the URL (re-read
   as its adapter does to pick the connection) must then agree on scheme, host and port, and see
   no user info; otherwise the URL is refused;
6. what is sent is :attr:`CheckedUrl.url`, rebuilt from the checked parts, never the raw string.

Origins compare exactly (scheme, lower-case host, port with the scheme's default filled in).
Redirects go through :func:`check_redirect`, which applies the same rules to every hop. Error
messages name the problem and show the URL only through :func:`redact_url` (no user info, no
query string, nothing ambiguous).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from backend.errors import InvalidInput

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_LENGTH = 8192

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_REG_NAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_PORT_RE = re.compile(r"^[1-9][0-9]{0,4}$")


@dataclass(frozen=True)
class Origin:
    """Scheme, host and port: the unit that credentials are bound to.

    ``host`` is lower case, an IPv6 literal without its brackets; ``port`` always set (the
    scheme's default when the URL names none), so ``http://h`` and ``http://h:80`` are one origin.
    """

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        """The origin of ``url`` under the policy (raises :class:`InvalidInput` if it is refused)."""
        return check_url(url).origin

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def netloc(self) -> str:
        """``host[:port]`` as written in a URL (the port only when it is not the default)."""
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}"


@dataclass(frozen=True)
class CheckedUrl:
    """An http(s) URL that passed :func:`check_url`: its origin, path and query, unambiguous.

    Send :attr:`url` (rebuilt from these parts), not the string it came from.
    """

    origin: Origin
    path: str  # "/" at least; never holds a backslash, whitespace or control character
    query: str  # without the "?"; "" when none

    @property
    def url(self) -> str:
        """What is sent: the checked parts, a space in path or query percent-encoded (as requests would)."""
        path, query = self.path.replace(" ", "%20"), self.query.replace(" ", "%20")
        return f"{self.origin}{path}" + (f"?{query}" if query else "")

    @property
    def redacted(self) -> str:
        """For logs and error messages: no query string (it may hold a presigned signature)."""
        return f"{self.origin}{self.path}"

    def __str__(self) -> str:
        return self.redacted


def check_url(url: object) -> CheckedUrl:
    """``url`` parsed under the policy's rules (module docstring), or :class:`InvalidInput` saying why not."""
    checked, problem = _check(url)
    if checked is None:
        raise InvalidInput(f"refused URL {redact_url(url)}: {problem}")
    return checked


def check_redirect(current: CheckedUrl, location: object) -> CheckedUrl:
    """The next hop of a redirect from ``current`` to a ``Location`` header, checked like any URL.

    The raw header is checked for forbidden characters *before* it is joined, because
    ``urljoin`` silently drops tabs and newlines and would hide them from the check.
    """
    if not isinstance(location, str) or not location:
        raise InvalidInput(f"{current.redacted} answered a redirect without a Location")
    problem = _bad_characters(location)
    if problem:
        raise InvalidInput(f"{current.redacted} redirected to a refused URL: {problem}")
    return check_url(urljoin(current.url, location))


def redact_url(url: object) -> str:
    """A URL for logs and error messages: no user info, no query string, no fragment, never misleading.

    A URL the policy accepts shows as scheme, host, port and path. Anything else is shown only as
    far as no parser could read it differently: the text up to the first character that makes it
    ambiguous (``\\``, ``%``, whitespace, control or non-ASCII characters in the authority),
    followed by ``…``; no authority at all when it holds an ``@`` (what precedes it may be a password). So ``http://127.0.0.1:9\\@label-studio/x`` shows as ``http://127.0.0.1:9…``,
    never as a URL on ``label-studio``.
    """
    if not isinstance(url, str):
        return f"<{type(url).__name__}, not a URL>"
    checked, _ = _check(url)
    if checked is not None:
        return checked.redacted
    text = url.strip()
    for cut in ("?", "#"):
        text = text.split(cut, 1)[0]
    match = _SCHEME_RE.match(text)
    if match and text[match.end() : match.end() + 2] == "//":
        start = match.end() + 2
        region = re.split(r"[/?#]", text[start:], maxsplit=1)[0]
        if "@" in region:  # whatever precedes an '@' may be a password: show no authority at all
            return f"{_printable(match.group(0))}//…"
        end = start
        while end < len(text) and text[end] != "/":
            ch = text[end]
            if ch in "\\@%" or not (ch.isascii() and ch.isprintable()) or ch.isspace():
                return _printable(text[:end]) + "…"
            end += 1
    return _printable(text[:300]) + ("…" if len(text) > 300 else "")


def has_bad_characters(text: str, *, allow_space: bool = False) -> str | None:
    """Why ``text`` (a URL or path) is unsafe to hand to URL parsers, or None."""
    return _bad_characters(text, allow_space=allow_space)


# -- the checks ------------------------------------------------------------------------------------
def _bad_characters(text: str, *, allow_space: bool = False) -> str | None:
    if len(text) > MAX_URL_LENGTH:
        return f"it is longer than {MAX_URL_LENGTH} characters"
    for ch in text:
        if ch == "\\":
            return "it contains a backslash, which URL parsers read differently"
        if ch == " " and allow_space:
            continue
        if ch.isspace():
            return f"it contains whitespace ({ch!a}), which URL parsers strip or keep differently"
        if not ch.isprintable():
            return f"it contains a control or non-printable character ({ch!a})"
    return None


def _check(url: object) -> tuple[CheckedUrl | None, str]:
    """(checked URL, "") or (None, the reason it is refused). Never raises."""
    if not isinstance(url, str):
        return None, "not a string"
    problem = _bad_characters(url, allow_space=True)
    if problem:
        return None, problem
    match = _SCHEME_RE.match(url)
    if not match:
        return None, "not an absolute URL (no scheme)"
    scheme = match.group(1).lower()
    if scheme not in DEFAULT_PORTS:
        return None, f"scheme {scheme!r} is not http or https"
    rest = url[match.end() :]
    if not rest.startswith("//"):
        return None, "no '//' authority after the scheme"
    rest = rest[2:]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if " " in authority:
        return None, "it contains whitespace in the authority"
    if "@" in authority:
        return None, "user info ('@') in the authority is not allowed"
    if "%" in authority:
        return None, "percent-encoding in the host is not allowed"
    if not authority.isascii():
        return None, "non-ASCII host names are not allowed (write the punycode form)"
    host, port, problem = _split_host_port(authority)
    if problem:
        return None, problem
    path, _, query = tail.split("#", 1)[0].partition("?")
    if not path:
        path = "/"
    origin = Origin(scheme, host, port if port is not None else DEFAULT_PORTS[scheme])
    checked = CheckedUrl(origin, path, query)
    # Rule 5: the client's parser and urllib must read the original and the rebuilt URL as we do.
    for candidate in (url, checked.url):
        disagreement = _parsers_disagree(candidate, origin)
        if disagreement:
            return None, disagreement
    return checked, ""


def _split_host_port(authority: str) -> tuple[str, int | None, str]:
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            return "", None, "unclosed '[' in an IPv6 host"
        literal, after = authority[1:close], authority[close + 1 :]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return "", None, "not a valid IPv6 literal (zones are not allowed)"
        host = literal.lower()
        if after and not after.startswith(":"):
            return "", None, "unexpected characters after the IPv6 host"
        port_text = after[1:] if after else None
    else:
        host, sep, port_text_or_empty = authority.partition(":")
        port_text = port_text_or_empty if sep else None
        host = host.lower()
        if not host:
            return "", None, "no host"
        if len(host) > 253 or not _REG_NAME_RE.match(host):
            return "", None, "the host is not a plain host name or IPv4 address"
    if port_text is None:
        return host, None, ""
    if not _PORT_RE.match(port_text) or int(port_text) > 65535:
        return "", None, "the port is not a number from 1 to 65535 (written without leading zeros)"
    return host, int(port_text), ""


def _parsers_disagree(url: str, origin: Origin) -> str | None:
    try:
        ours = parse_url(url)
    except LocationParseError:
        return "the HTTP client cannot parse it"
    try:
        theirs = urlsplit(url)
        their_port = theirs.port
    except ValueError:
        return "urllib cannot parse it"
    try:
        prepared = requests.PreparedRequest()
        prepared.prepare_url(url, None)
        sent = urlsplit(prepared.url or "")
        sent_port = sent.port
    except (requests.RequestException, ValueError):
        return "requests cannot prepare it"
    default = DEFAULT_PORTS[origin.scheme]
    readings = {
        "urllib3": (
            (ours.scheme or "").lower(),
            (ours.host or "").lower().strip("[]"),
            ours.port or default,
            ours.auth,
        ),
        "urllib": (theirs.scheme.lower(), (theirs.hostname or "").lower(), their_port or default, theirs.username),
        "requests": (sent.scheme.lower(), (sent.hostname or "").lower(), sent_port or default, sent.username),
    }
    expected = (origin.scheme, origin.host, origin.port, None)
    for parser, reading in readings.items():
        if reading != expected:
            return f"{parser} reads its origin differently"
    return None


def _printable(text: str) -> str:
    return "".join(ch if (ch.isprintable() and not ch.isspace()) or ch == " " else "?" for ch in text)


__all__ = ["DEFAULT_PORTS", "CheckedUrl", "Origin", "check_redirect", "check_url", "has_bad_characters", "redact_url"]
