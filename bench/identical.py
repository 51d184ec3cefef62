"""Is the traffic byte-identical through every proxy? An echo upstream shows what each one sent.

The echo upstream answers every request with the exact bytes it received (head and body) in
its response body, plus headers a proxy might touch (``Alt-Svc``, ``Set-Cookie``). A raw
client sends the same requests through each proxy; for each request, the status line,
response headers and de-chunked body must be the same bytes through all of them.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading

#: (name, raw request head without Host, body, chunked upload?)
CASES: tuple[tuple[str, str, bytes, bool], ...] = (
    (
        "chat",
        "POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
        'Authorization: Bearer sk-identical\r\nPulze-Labels: {"team":"x"}\r\n'
        "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
        "Accept-Encoding: gzip, deflate\r\nCookie: a=b\r\nX-Odd-Header:  spaced \r\n",
        b'{"model":"pulze","messages":[{"role":"user","content":"hi \\u00e9"}]}',
        False,
    ),
    (
        "sse",
        "POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n"
        "Authorization: Bearer sk-identical\r\n",
        b'{"model":"pulze","stream":true,"messages":[]}',
        False,
    ),
    (
        "gzip",
        "POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nAccept-Encoding: gzip\r\n",
        b'{"model":"pulze","prompt":"zip"}',
        False,
    ),
    (
        "chunked-upload",
        "POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
        b'{"model":"pulze","messages":[]}',
        True,
    ),
    ("models", "GET /v1/models?x=1 HTTP/1.1\r\nAccept: */*\r\n", b"", False),
    (
        "h2c-upgrade",
        "GET /v1/models HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        b"",
        False,
    ),
    (
        "error",
        "POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\nX-Echo-Status: 500\r\n",
        b"{}",
        False,
    ),
)


class EchoUpstream:
    """An HTTP/1.1 upstream on its own thread that echoes each request it receives."""

    def __init__(self) -> None:
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="echo", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> EchoUpstream:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                if b"transfer-encoding: chunked" in lower:
                    body = b""
                    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                        body += await reader.readexactly(size + 2)
                    await reader.readuntil(b"\r\n")
                else:
                    length = next(
                        (
                            int(line.split(b":")[1])
                            for line in lower.split(b"\r\n")
                            if line.startswith(b"content-length:")
                        ),
                        0,
                    )
                    body = await reader.readexactly(length)
                await self._answer(writer, head, head + body)
                if b"connection: close" in lower:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, head: bytes, seen: bytes) -> None:
        lower = head.lower()
        status = b"500 Internal Server Error" if b"x-echo-status: 500" in lower else b"200 OK"
        common = b'Alt-Svc: h3=":443"; ma=86400, h3-29="api.example:8443"\r\nSet-Cookie: s=1; Path=/\r\n'
        if b"text/event-stream" in lower:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                + common
                + b"\r\n"
            )
            for event in (b"data: " + seen.replace(b"\r\n", b"|") + b"\n\n", b'data: {"x":1}\n\n', b"data: [DONE]\n\n"):
                writer.write(b"%x\r\n%b\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(0.005)
            writer.write(b"0\r\n\r\n")
        else:
            body, extra = seen, b""
            if b"accept-encoding: gzip" in lower:
                body, extra = gzip.compress(seen, mtime=0), b"Content-Encoding: gzip\r\n"
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: application/octet-stream\r\n"
                + common
                + extra
                + b"Content-Length: %d\r\n\r\n" % len(body)
                + body
            )
        await writer.drain()


def exchange(port: int, head: str, body: bytes, chunked: bool) -> bytes:
    """Send one request on a new connection; return status line + headers + de-chunked body.

    The response is read by its framing, not until close: a proxy may keep the connection
    open (mitmproxy's h2c handling drops the request's ``Connection`` header).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if chunked:
            payload = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
        else:
            payload = body
            if body or head.startswith("POST"):
                head += f"Content-Length: {len(body)}\r\n"
        sock.sendall(f"{head}Host: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode() + payload)
        reader = sock.makefile("rb")
        response_head = b""
        while (line := reader.readline()) not in (b"\r\n", b""):
            response_head += line
        lower = response_head.lower()
        if b"transfer-encoding: chunked" in lower:
            rest = b""
            while size := int(reader.readline().split(b";")[0], 16):
                rest += reader.read(size + 2)[:-2]
            reader.readline()
        else:
            length = next(
                (int(ln.split(b":")[1]) for ln in lower.split(b"\r\n") if ln.startswith(b"content-length:")), None
            )
            rest = reader.read() if length is None else reader.read(length)
    # the proxy's own port (in Alt-Svc, rewritten for reverse mode) is the one expected difference
    return (response_head + b"\r\n" + rest).replace(str(port).encode(), b"<PORT>")


def compare(ports: dict[str, int]) -> list[str]:
    """Differences between the proxies' answers to ``CASES`` (empty: byte-identical)."""
    problems = []
    for name, head, body, chunked in CASES:
        answers = {proxy: exchange(port, head, body, chunked) for proxy, port in ports.items()}
        first_proxy, first = next(iter(answers.items()))
        for proxy, answer in answers.items():
            if answer != first:
                problems.append(f"{name}: {proxy} differs from {first_proxy}")
    return problems
