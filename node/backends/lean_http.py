"""A minimal HTTP/1.1 client for one job: a streaming POST to a local upstream.

Why not httpx here: the host reads one server-sent event per token from its
upstream, and every network read through httpx/httpcore passes about ten
async layers (response iterators, the pool's byte stream, h11's event
machine, a ``fail_after`` and an exception map per read). On the relay
benchmark (bench/relay.py) that was the largest single share of the host's
CPU per token. This client does the same work in one loop: keep-alive
connections in a small pool, ``Content-Length``, chunked and read-to-close
bodies, one cancel scope per request whose deadline moves with each read.

It is deliberately narrow: plain ``http://`` and no proxy; anything else
(``https://``, a ``*_proxy`` variable in the environment) makes
:func:`usable` say no, and the backend keeps using httpx.
"""

from __future__ import annotations

import os
import urllib.parse

import trio

MAX_HEAD_BYTES = 64 * 1024
READ_SIZE = 65536


class UpstreamHTTPError(Exception):
    """The connection failed, timed out or the upstream spoke something that is not HTTP/1.1."""


def usable(base_url: str) -> bool:
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    return not any(os.environ.get(name) for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"))


class LeanClient:
    def __init__(self, base_url: str, headers: dict[str, str], *, connect_timeout: float, read_timeout: float, max_idle: int = 64) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head_tail = f"Host: {parts.netloc}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n{extra}".encode("latin-1")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: list[trio.SocketStream] = []

    async def post(self, path: str, body: bytes) -> Response:
        """Send the request and read the response head; the body is read through the :class:`Response`."""
        request = b"POST " + (self.prefix + path).encode() + b" HTTP/1.1\r\n" + self._head_tail + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        for attempt in range(2):
            reused = bool(self._idle)
            stream = self._idle.pop() if reused else await self._connect()
            response = Response(self, stream)
            answered = False
            timed_out = False
            try:
                with trio.move_on_after(self.read_timeout) as waited:
                    await stream.send_all(request)
                    answered = await response._read_head()
                timed_out = waited.cancelled_caught
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, UpstreamHTTPError) as exc:
                await response.aclose()
                if reused and attempt == 0 and not response._head_seen and not response._buf:
                    continue  # a kept-alive connection the upstream had closed: once more on a fresh one
                raise exc if isinstance(exc, UpstreamHTTPError) else UpstreamHTTPError(f"{type(exc).__name__}: {exc}") from None
            except BaseException:
                await response.aclose()
                raise
            if timed_out:
                await response.aclose()
                raise UpstreamHTTPError("timed out waiting for the response head")
            if not answered:
                await response.aclose()
                if reused and attempt == 0:
                    continue
                raise UpstreamHTTPError("the upstream closed the connection without an answer")
            return response
        raise UpstreamHTTPError("the upstream closed the connection without an answer")

    async def _connect(self) -> trio.SocketStream:
        try:
            with trio.fail_after(self.connect_timeout):
                return await trio.open_tcp_stream(self.host, self.port)
        except trio.TooSlowError:
            raise UpstreamHTTPError(f"connect to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise UpstreamHTTPError(f"cannot connect to {self.host}:{self.port}: {exc}") from None

    def _release(self, stream: trio.SocketStream) -> None:
        if len(self._idle) < self.max_idle:
            self._idle.append(stream)
        else:
            stream.socket.close()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for stream in idle:
            with trio.CancelScope(shield=True):
                await stream.aclose()


class Response:
    """One response: status, headers, then the body through :meth:`read`."""

    def __init__(self, client: LeanClient, stream: trio.SocketStream) -> None:
        self._client = client
        self._stream: trio.SocketStream | None = stream
        self._buf = bytearray()
        self._head_seen = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunked = False
        self._remaining: int | None = None  # Content-Length bodies
        self._chunk_left = 0
        self._state = "size"  # chunked: size | data | crlf | trailer
        self._keep = True
        self.done = False

    async def _recv(self) -> bytes:
        assert self._stream is not None
        try:
            return await self._stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamHTTPError(f"connection broke: {type(exc).__name__}") from None

    async def _read_head(self) -> bool:
        """False when the connection closed before a single byte came back."""
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self._buf) > MAX_HEAD_BYTES:
                raise UpstreamHTTPError("response head too large")
            data = await self._recv()
            if not data:
                if not self._buf:
                    return False
                raise UpstreamHTTPError("connection closed inside the response head")
            self._buf += data
        self._head_seen = True
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        status = lines[0].split(" ", 2)
        if len(status) < 2 or not status[0].startswith("HTTP/1.") or not status[1].isdigit():
            raise UpstreamHTTPError(f"not an HTTP/1.1 response: {lines[0][:60]!r}")
        self.status = int(status[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._keep = self.headers.get("connection", "").lower() != "close" and status[0] == "HTTP/1.1"
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        if not self._chunked and "content-length" in self.headers:
            try:
                self._remaining = int(self.headers["content-length"])
            except ValueError:
                raise UpstreamHTTPError("bad Content-Length") from None
        elif not self._chunked:
            self._keep = False  # read to close
        if self._remaining == 0:
            self._finish()
        return True

    async def read(self) -> bytes:
        """The next piece of body (b"" at its end); raises UpstreamHTTPError if it breaks."""
        while not self.done:
            if self._chunked:
                out = self._parse_chunked()
                if out:
                    return out
                if self.done:
                    break
            elif self._buf:
                data = bytes(self._buf) if self._remaining is None else bytes(self._buf[: self._remaining])
                self._buf.clear()
                if self._remaining is not None:
                    self._remaining -= len(data)
                    if self._remaining == 0:
                        self._finish()
                return data
            more = await self._recv()
            if not more:
                if self._remaining is None and not self._chunked:
                    self._keep = False
                    self._finish()
                    break
                raise UpstreamHTTPError("connection closed before the end of the body")
            self._buf += more
        return b""

    def _parse_chunked(self) -> bytes:
        buf = self._buf
        out = bytearray()
        while buf:
            if self._state == "data":
                take = min(self._chunk_left, len(buf))
                out += buf[:take]
                del buf[:take]
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(buf) < 2:
                    break
                del buf[:2]
                self._state = "size"
            else:
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                line = bytes(buf[:end])
                del buf[: end + 2]
                if self._state == "trailer":
                    if not line:
                        self._finish()
                        break
                    continue
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise UpstreamHTTPError("bad chunk size") from None
                if size == 0:
                    self._state = "trailer"
                else:
                    self._chunk_left = size
                    self._state = "data"
        return bytes(out)

    async def read_all(self, limit: int) -> bytes:
        out = bytearray()
        while len(out) < limit:
            data = await self.read()
            if not data:
                break
            out += data
        return bytes(out)

    def _finish(self) -> None:
        self.done = True
        stream, self._stream = self._stream, None
        if stream is not None:
            if self._keep and not self._buf:
                self._client._release(stream)
            else:
                stream.socket.close()

    async def aclose(self) -> None:
        """Give the connection back if the body was read to its end, else close it."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.socket.close()
