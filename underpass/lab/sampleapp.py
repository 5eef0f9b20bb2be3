"""The lab's sample application: echo servers that show what the network did.

Owns two servers and their clients, run inside pods (``lab up`` starts the
servers in every pod; tests and the demo run the clients with ``lab exec``):

- HTTP/1.1 echo (default port 8080): answers every request with JSON naming
  the client address it saw (``client_ip``: proof that the source address was
  preserved), the pod that answered, and the size and SHA-256 of the body.
- raw-TCP echo (default port 9000): greets with
  ``HELLO pod=<ns/name> peer=<ip>:<port> local=<ip>:<port>``, then takes one
  command line: ``ECHO`` (echo until EOF), ``SINK`` (read until EOF, answer
  ``SINK bytes=<n> sha256=<hex>``), ``SOURCE <n>`` (send n random bytes, then
  ``SOURCE bytes=<n> sha256=<hex>``), ``QUIT``.

Clients print one JSON document and exit 0 only when the server's checksum
matches theirs. Everything here is standard library only (blocking sockets,
a thread per connection) so that it starts fast and stays small in every pod.
Run ``python -m underpass.lab.sampleapp --help``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

HTTP_PORT = 8080
TCP_PORT = 9000
CHUNK = 256 * 1024
MAX_HEAD = 64 * 1024


def _addr(sockname: Any) -> tuple[str, int]:
    return str(sockname[0]), int(sockname[1])


# --------------------------------------------------------------------------- servers
#
# The servers are the *application* in a pod, not mesh code: they use the
# standard library (a thread per connection) so that a pod's app starts in a
# few tens of milliseconds and stays small, which matters when `lab up` starts
# one per pod.


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, port: int, handler: type[socketserver.BaseRequestHandler], pod: str):
        self.pod = pod
        super().__init__(("0.0.0.0", port), handler)  # noqa: S104 - the pod's own app


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client says close
    server_version = "underpass-lab-echo"
    server: _Server

    def _answer(self) -> None:
        if "transfer-encoding" in self.headers:
            self._reply(501, {"error": "chunked bodies are not supported"}, close=True)
            return
        try:
            remaining = int(self.headers.get("content-length", "0"))
        except ValueError:
            self._reply(400, {"error": "bad content-length"}, close=True)
            return
        digest = hashlib.sha256()
        size = 0
        while remaining > 0:
            piece = self.rfile.read(min(CHUNK, remaining))
            if not piece:
                return
            digest.update(piece)
            size += len(piece)
            remaining -= len(piece)
        peer = _addr(self.client_address)
        local = _addr(self.connection.getsockname())
        self._reply(
            200,
            {
                "pod": self.server.pod,
                "client": f"{peer[0]}:{peer[1]}",
                "client_ip": peer[0],
                "client_port": peer[1],
                "server": f"{local[0]}:{local[1]}",
                "method": self.command,
                "path": self.path,
                "host": self.headers.get("host", ""),
                "body_bytes": size,
                "body_sha256": digest.hexdigest(),
            },
        )

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer

    def _reply(self, status: int, body: dict[str, Any], *, close: bool = False) -> None:
        payload = (json.dumps(body, sort_keys=True) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the pod's log in load tests


class _TcpHandler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        peer = _addr(sock.getpeername())
        local = _addr(sock.getsockname())
        try:
            hello = f"HELLO pod={self.server.pod} peer={peer[0]}:{peer[1]}"
            sock.sendall(f"{hello} local={local[0]}:{local[1]}\n".encode())
            buf = bytearray()
            while b"\n" not in buf:
                data = sock.recv(1024)
                if not data or len(buf) > 1024:
                    return
                buf += data
            line, _, rest = bytes(buf).partition(b"\n")
            command, _, arg = line.decode(errors="replace").strip().partition(" ")
            if command == "ECHO":
                data = rest
                while data:
                    sock.sendall(data)
                    data = sock.recv(CHUNK)
            elif command == "SINK":
                digest = hashlib.sha256(rest)
                size = len(rest)
                view = bytearray(CHUNK)
                while n := sock.recv_into(view):
                    digest.update(view[:n])
                    size += n
                sock.sendall(f"SINK bytes={size} sha256={digest.hexdigest()}\n".encode())
            elif command == "SOURCE" and arg.isdigit():
                total, sent = int(arg), 0
                digest = hashlib.sha256()
                while sent < total:
                    piece = os.urandom(min(CHUNK, total - sent))
                    digest.update(piece)
                    sock.sendall(piece)
                    sent += len(piece)
                sock.sendall(f"SOURCE bytes={sent} sha256={digest.hexdigest()}\n".encode())
            elif command != "QUIT":
                sock.sendall(b"ERR unknown command; use ECHO, SINK, SOURCE <n> or QUIT\n")
        except (ConnectionError, TimeoutError):
            return


def serve(http_port: int, tcp_port: int, pod: str, ready_fd: int | None) -> None:
    """Serve both protocols on all addresses until killed."""
    servers = [_Server(http_port, _HttpHandler, pod), _Server(tcp_port, _TcpHandler, pod)]
    if ready_fd is not None:  # bound and listening: connections queue from here on
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    print(
        json.dumps({"event": "serving", "pod": pod, "http_port": http_port, "tcp_port": tcp_port}),
        flush=True,
    )
    threading.Thread(target=servers[1].serve_forever, name="tcp", daemon=True).start()
    servers[0].serve_forever()


# --------------------------------------------------------------------------- clients


def http_request(url: str, *, data_size: int = 0, timeout: float = 10.0) -> dict[str, Any]:
    """GET (or POST ``data_size`` random bytes to) ``url``; the server's JSON plus checks."""
    import http.client  # the client alone needs it; servers start faster without

    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// URL: {url}")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    body = os.urandom(data_size) if data_size else None
    started = time.perf_counter()
    try:
        conn.request("POST" if body else "GET", parts.path or "/", body=body)
        response = conn.getresponse()
        raw = response.read()
        local = conn.sock.getsockname() if conn.sock else ("", 0)
    finally:
        conn.close()
    doc: dict[str, Any] = json.loads(raw)
    doc["status"] = response.status
    doc["local"] = f"{local[0]}:{local[1]}"
    doc["seconds"] = round(time.perf_counter() - started, 6)
    if body is not None:
        doc["match"] = doc.get("body_sha256") == hashlib.sha256(body).hexdigest()
    return doc


def _parse_kv(line: bytes) -> dict[str, str]:
    words = line.decode(errors="replace").split()
    return dict(w.split("=", 1) for w in words[1:] if "=" in w)


def _recv_line(sock: socket.socket, buf: bytearray) -> bytes:
    while b"\n" not in buf:
        data = sock.recv(CHUNK)
        if not data:
            raise ConnectionError("connection closed before a full line")
        buf += data
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


def tcp_session(
    host: str,
    port: int,
    *,
    mode: str = "hello",
    size: int = 0,
    text: str = "",
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Run one raw-TCP session: hello, echo, sink or source; returns a JSON-able report."""
    started = time.perf_counter()
    sock = socket.create_connection((host, port), timeout=timeout)
    buf = bytearray()
    try:
        local = _addr(sock.getsockname())
        hello = _recv_line(sock, buf)
        report: dict[str, Any] = {
            "mode": mode,
            "server": f"{host}:{port}",
            "local": f"{local[0]}:{local[1]}",
            "hello": _parse_kv(hello),
        }
        if mode == "hello":
            sock.sendall(b"QUIT\n")
            report["match"] = True
        elif mode == "echo":
            payload = text.encode()
            sock.sendall(b"ECHO\n" + payload)
            sock.shutdown(socket.SHUT_WR)
            got = bytes(buf)
            while data := sock.recv(CHUNK):
                got += data
            report["echo"] = got.decode(errors="replace")
            report["match"] = got == payload
        elif mode == "sink":
            digest = hashlib.sha256()
            sock.sendall(b"SINK\n")
            sent = 0
            while sent < size:
                piece = os.urandom(min(CHUNK, size - sent))
                digest.update(piece)
                sock.sendall(piece)
                sent += len(piece)
            sock.shutdown(socket.SHUT_WR)
            reply = _parse_kv(_recv_line(sock, buf))
            report.update(
                bytes=sent,
                sha256=digest.hexdigest(),
                server_bytes=int(reply.get("bytes", -1)),
                server_sha256=reply.get("sha256"),
            )
            report["match"] = reply.get("sha256") == report["sha256"] and sent == int(
                reply.get("bytes", -1)
            )
        elif mode == "source":
            sock.sendall(f"SOURCE {size}\n".encode())
            digest = hashlib.sha256()
            got = bytes(buf[:size])
            del buf[: len(got)]
            digest.update(got)
            received = len(got)
            view = bytearray(CHUNK)
            while received < size:
                n = sock.recv_into(view, min(CHUNK, size - received))
                if not n:
                    raise ConnectionError(f"connection closed after {received} of {size} bytes")
                digest.update(view[:n])
                received += n
            reply = _parse_kv(_recv_line(sock, buf))
            report.update(
                bytes=received,
                sha256=digest.hexdigest(),
                server_bytes=int(reply.get("bytes", -1)),
                server_sha256=reply.get("sha256"),
            )
            report["match"] = reply.get("sha256") == report["sha256"]
        else:
            raise ValueError(f"unknown mode {mode!r}")
    finally:
        sock.close()
    seconds = time.perf_counter() - started
    report["seconds"] = round(seconds, 6)
    if report.get("bytes"):
        report["mbit_per_s"] = round(report["bytes"] * 8 / seconds / 1e6, 1)
    return report


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands ``serve``, ``http``, ``tcp`` (shared with ``underpass lab app``)."""
    sub = parser.add_subparsers(dest="app_command", metavar="MODE", required=True)
    s = sub.add_parser("serve", help="run the HTTP and TCP echo servers (in a pod)")
    s.add_argument("--http-port", type=int, default=HTTP_PORT)
    s.add_argument("--tcp-port", type=int, default=TCP_PORT)
    s.add_argument("--pod", default=os.environ.get("UNDERPASS_POD", ""), help="ns/name to report")
    s.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--tag", default="", help="free text to find the process by (ignored)")
    h = sub.add_parser("http", help="HTTP request to an echo server; prints its JSON")
    h.add_argument("url", help="e.g. http://10.244.2.2:8080/")
    h.add_argument("--data-size", type=_size, default=0, help="POST this many random bytes")
    h.add_argument("--timeout", type=float, default=10.0)
    t = sub.add_parser("tcp", help="raw-TCP session with an echo server; prints JSON")
    t.add_argument("host")
    t.add_argument("port", nargs="?", type=int, default=TCP_PORT)
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--echo", metavar="TEXT", help="send TEXT, expect it back")
    mode.add_argument("--sink", metavar="BYTES", type=_size, help="send BYTES, compare SHA-256")
    mode.add_argument("--source", metavar="BYTES", type=_size, help="receive BYTES, compare")
    t.add_argument("--timeout", type=float, default=30.0)


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def run(args: argparse.Namespace) -> int:
    """Execute parsed ``add_arguments`` options; returns the exit status."""
    if args.app_command == "serve":
        try:
            serve(args.http_port, args.tcp_port, args.pod, args.ready_fd)
        except KeyboardInterrupt:
            return 0
        return 0
    try:
        if args.app_command == "http":
            doc = http_request(args.url, data_size=args.data_size, timeout=args.timeout)
            ok = doc["status"] == 200 and doc.get("match", True)
        else:
            if args.echo is not None:
                doc = tcp_session(args.host, args.port, mode="echo", text=args.echo)
            elif args.sink is not None:
                doc = tcp_session(args.host, args.port, mode="sink", size=args.sink)
            elif args.source is not None:
                doc = tcp_session(args.host, args.port, mode="source", size=args.source)
            else:
                doc = tcp_session(args.host, args.port, mode="hello", timeout=args.timeout)
            ok = bool(doc["match"])
    except (OSError, ValueError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(doc, sort_keys=True))
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m underpass.lab.sampleapp",
        description="Echo servers (HTTP, raw TCP) and clients for the Underpass lab.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
