"""One HTTP/1.1 connection on a raw socket, for keep-alive tests of the hub and the gateway.

Nothing in an HTTP client library hides what the server does with the bytes
of a request body it did not read; every caller runs its exchanges under a
deadline, so a hang fails a test instead of stalling the suite.
"""

from __future__ import annotations

import trio


class Conn:
    """One HTTP/1.1 connection, written byte by byte as the test says."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> bytes:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return data

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            if not await self._more():
                raise EOFError("closed before a response")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not await self._more():
                raise EOFError("closed inside a response body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    async def closed(self) -> bool:
        """True once the server closed the connection (EOF or reset), having sent nothing more."""
        try:
            return not await self._more()
        except trio.BrokenResourceError:
            return True


async def open_conn(url: str) -> Conn:
    """A connection to ``http://host:port`` (any path after it is ignored)."""
    netloc = url.removeprefix("http://").split("/", 1)[0]
    host, port = netloc.rsplit(":", 1)
    return Conn(await trio.open_tcp_stream(host, int(port)))


def request_head(method: str, path: str, *, length: int, key: str | None = None, host: str = "test") -> bytes:
    auth = f"authorization: Bearer {key}\r\n" if key else ""
    return (f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {length}\r\n{auth}\r\n").encode()
