"""A hostile upstream for tests, the soak and the bench: what a broken or malicious API sends.

An OpenAI-compatible endpoint on loopback (any ``POST .../chat/completions``) whose behaviour
the request chooses with the ``x-hostile`` header:

- ``ok`` (default): a small, ordinary completion (usage, no Pulze metadata);
- ``stream``: SSE, ``x-hostile-events`` events ``x-hostile-delay`` seconds apart, usage last;
- ``bomb``: a body that inflates far beyond its wire size, ``x-hostile-encoding`` gzip, br or
  zstd, ``x-hostile-stream: 1`` for SSE (its last line never ends), ``x-hostile-size`` decoded
  bytes (default 256 MB); built once per size and encoding, at fast compression levels;
- ``big``: an embeddings-style body of ``x-hostile-size`` bytes (default 8 MB) whose
  ``usage`` comes after its ``data``, optionally content-encoded;
- ``usage``: an ordinary completion whose ``usage``/``metadata`` are replaced by the JSON in
  ``x-hostile-usage`` (absurd, negative, non-finite numbers);
- ``echo-key``: 401 with ``Incorrect API key provided: <the credential>`` for whichever auth
  style the request used (Bearer, api-key, x-api-key, x-goog-api-key, ``?key=``).

Nothing here imports llmtap's capture side: it stands in for the world outside.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import zlib
from typing import Any
from urllib.parse import parse_qsl

_CHUNK = 1 << 20


@functools.lru_cache(maxsize=8)
def bomb(encoding: str, size: int, stream: bool) -> bytes:
    """A body of ``size`` decoded bytes, encoded with ``encoding``: a JSON completion whose content
    is one long run of ``a``, or an SSE stream whose last ``data:`` line never ends."""
    if stream:
        head = b'data: {"id":"b","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: {"x":"'
        tail = b""
    else:
        head = b'{"id":"b","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"'
        tail = b'"}}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'
    remaining = max(0, size - len(head) - len(tail))
    if encoding not in ("gzip", "br", "zstd"):  # sent as it is
        return head + b"a" * remaining + tail
    compress, finish = _compressor(encoding)
    filler = b"a" * _CHUNK
    out = [compress(head)]
    while remaining > 0:  # the bomb is built a megabyte at a time, never held decoded
        n = min(remaining, _CHUNK)
        out.append(compress(filler[:n]))
        remaining -= n
    out.append(compress(tail) + finish())
    return b"".join(out)


def _compressor(encoding: str) -> tuple[Any, Any]:
    """``(compress, finish)`` of a fast streaming compressor for ``encoding``."""
    if encoding == "gzip":
        enc = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        return enc.compress, enc.flush
    if encoding == "br":
        import brotli

        enc = brotli.Compressor(quality=1)
        return enc.process, enc.finish
    import zstandard

    enc = zstandard.ZstdCompressor(level=1).compressobj()
    return enc.compress, enc.flush


@functools.lru_cache(maxsize=4)
def big_body(size: int) -> bytes:
    """An embeddings-style body of about ``size`` bytes: ``data`` first, ``usage`` last."""
    vector = "[" + ",".join(["0.0123456789"] * 256) + "]"
    item = f'{{"object":"embedding","index":0,"embedding":{vector}}}'
    count = max(1, size // (len(item) + 1))
    data = ",".join([item] * count)
    return (
        f'{{"object":"list","id":"emb-1","model":"text-embedding-3-small","data":[{data}],'
        f'"usage":{{"prompt_tokens":{count},"completion_tokens":0,"total_tokens":{count}}}}}'
    ).encode()


def encode(encoding: str | None, data: bytes) -> bytes:
    if not encoding or encoding == "identity":
        return data
    if encoding == "gzip":
        enc = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        return enc.compress(data) + enc.flush()
    if encoding == "br":
        import brotli

        return brotli.compress(data, quality=1)
    if encoding == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=1).compress(data)
    raise ValueError(encoding)


def credential(headers: dict[str, str], target: str) -> str:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for name in ("api-key", "x-api-key", "x-goog-api-key"):
        if headers.get(name):
            return headers[name]
    return dict(parse_qsl(target.partition("?")[2])).get("key", "")


def completion(usage: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": usage if usage is not None else {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
    if metadata is not None:
        body["metadata"] = metadata
    return body


class HostileUpstream:
    """The server, on its own event loop in a daemon thread (``start``/``stop``, or ``with``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HostileUpstream:
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, self.host, self.port))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, name="hostile-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> HostileUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                await self._respond(method, target, headers, writer)
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def _respond(self, method: str, target: str, headers: dict[str, str], writer: asyncio.StreamWriter) -> None:
        case = headers.get("x-hostile", "ok")
        encoding = headers.get("x-hostile-encoding") or None
        if case == "stream":
            await self._stream(headers, writer)
            return
        if case == "bomb":
            size = int(headers.get("x-hostile-size") or 256 << 20)
            streamed = headers.get("x-hostile-stream") == "1"
            data = bomb(encoding or "gzip", size, streamed)
            kind = "text/event-stream" if streamed else "application/json"
            await self._send(writer, 200, data, kind, encoding or "gzip", chunked=streamed)
            return
        if case == "big":
            data = big_body(int(headers.get("x-hostile-size") or 8 << 20))
            await self._send(writer, 200, encode(encoding, data), "application/json", encoding)
            return
        if case == "usage":
            spec = json.loads(headers.get("x-hostile-usage") or "{}")
            body = completion(spec.get("usage"), spec.get("metadata"))
            await self._send(writer, 200, json.dumps(body).encode(), "application/json", None)
            return
        if case == "echo-key":
            key = credential(headers, target)
            body = {"error": {"message": f"Incorrect API key provided: {key}.", "type": "invalid_request_error"}}
            await self._send(writer, 401, json.dumps(body).encode(), "application/json", None)
            return
        await self._send(writer, 200, json.dumps(completion()).encode(), "application/json", encoding)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        data: bytes,
        kind: str,
        encoding: str | None,
        *,
        chunked: bool = False,
    ) -> None:
        head = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}", f"content-type: {kind}"]
        if encoding:
            head.append(f"content-encoding: {encoding}")
        head.append("transfer-encoding: chunked" if chunked else f"content-length: {len(data)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        if not chunked:
            for start in range(0, len(data), _CHUNK):
                writer.write(data[start : start + _CHUNK])
                await writer.drain()
            return
        for start in range(0, len(data), 16384):
            piece = data[start : start + 16384]
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _stream(self, headers: dict[str, str], writer: asyncio.StreamWriter) -> None:
        events = int(headers.get("x-hostile-events") or 20)
        delay = float(headers.get("x-hostile-delay") or 0.0)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        frames = []
        for i in range(events):
            event = {
                "id": "chatcmpl-s",
                "object": "chat.completion.chunk",
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}],
            }
            frames.append(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
            if delay:
                await _write_chunk(writer, b"".join(frames))
                frames = []
                await asyncio.sleep(delay)
            elif len(frames) >= 256:
                await _write_chunk(writer, b"".join(frames))
                frames = []
        last = {
            "id": "chatcmpl-s",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": events, "total_tokens": 5 + events},
        }
        frames.append(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
        await _write_chunk(writer, b"".join(frames))
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


def main(argv: list[str] | None = None) -> None:
    """``python -m llmtap.devtools.hostile --port N``: serve until killed (bench and soak)."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    with HostileUpstream(args.host, args.port):
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
