"""Response heads and chunked bodies: pure parsing of HTTP/1.1 framing, no I/O."""

from __future__ import annotations

from typing import NamedTuple

from multidict import CIMultiDict, CIMultiDictProxy


class Head(NamedTuple):
    """A parsed response head and how its body is framed."""

    status: int
    headers: CIMultiDictProxy[str]
    keep_alive: bool
    length: int | None  # None: chunked, or until the connection closes
    chunked: bool


def parse_head(raw: bytes) -> Head:
    """Parse a status line and header lines (CRLF-separated, without the blank line)."""
    text = raw.decode("latin-1")
    lines = text.split("\r\n")
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise ValueError("a bare CR or LF in the head")
    line = lines[0]
    code = line[9:12]
    if (
        not line.startswith("HTTP/1.")
        or len(line) < 12
        or line[8] != " "
        or (len(line) > 12 and line[12] != " ")
        or not (code.isascii() and code.isdigit())
    ):
        raise ValueError("not an HTTP/1.x status line")
    status = int(code)
    if status == 101:
        raise ValueError("an unasked-for protocol switch")
    items = []
    for h in lines[1:]:
        name, sep, value = h.partition(":")
        if not sep or not name or name[0] in " \t" or name[-1] in " \t":
            raise ValueError("a malformed header line")
        items.append((name, value.strip(" \t")))
    headers = CIMultiDictProxy(CIMultiDict(items))
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if line[7] == "1" else "keep-alive" in connection
    if status < 200 or status in (204, 304):
        return Head(status, headers, keep_alive, 0, False)
    te = headers.get("transfer-encoding")
    if te is not None:
        if te.lower().rsplit(",", 1)[-1].strip(" \t") != "chunked":
            raise ValueError("a transfer-encoding other than chunked")
        # Both framings at once is how responses get smuggled: use chunked, never reuse.
        return Head(status, headers, keep_alive and "content-length" not in headers, None, True)
    lengths = headers.getall("content-length", None)
    if lengths is None:
        return Head(status, headers, False, None, False)
    values = {v.strip(" \t") for v in lengths}
    value = values.pop()
    if values or not (value.isascii() and value.isdigit()):
        raise ValueError("a bad content-length")
    return Head(status, headers, keep_alive, int(value), False)


class ChunkedDecoder:
    """Incremental decoder of a chunked body; `extra` is set when bytes follow its end."""

    __slots__ = ("_buf", "_left", "extra")

    _SIZE, _CRLF, _TRAILER = 0, -1, -2

    def __init__(self) -> None:
        self._buf = b""
        self._left = self._SIZE  # > 0: bytes left in the current chunk
        self.extra = False

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        """The body pieces in `data`, and whether the body ended."""
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        out: list[bytes] = []
        left = self._left
        ended = False
        while pos < n:
            if left > 0:
                take = min(left, n - pos)
                out.append(buf[pos : pos + take] if take < n or pos else buf)
                pos += take
                left -= take
                if left == 0:
                    left = self._CRLF
            elif left == self._CRLF:
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ValueError("no CRLF after a chunk")
                pos += 2
                left = self._SIZE
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 4096:
                        raise ValueError("an oversized chunk-size or trailer line")
                    break
                line = buf[pos:eol]
                pos = eol + 2
                if left == self._TRAILER:
                    if not line:
                        ended = True
                        break
                    continue
                size = line.split(b";", 1)[0].strip(b" \t")
                if not size or len(size) > 15 or size.lstrip(b"0123456789abcdefABCDEF"):
                    raise ValueError("a bad chunk size")
                left = int(size, 16) or self._TRAILER
        self._left = left
        self._buf = buf[pos:] if pos < n and not ended else b""
        self.extra = ended and pos < n
        return out, ended
