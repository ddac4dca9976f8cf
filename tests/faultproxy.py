"""Network faults between a client and Redis, on 127.0.0.1.

- :class:`FaultProxy`: a threaded TCP proxy in front of a Redis that can throw away the reply
  to one request *after* Redis applied it and cut that connection (the client sees a dropped
  connection and, with retries on, sends the command again), stall all traffic
  (:meth:`~FaultProxy.pause`) or cut every connection.
- :class:`SilentServer`: accepts connections and never answers.

Both are context managers; :meth:`close` stops and joins every thread they started.
"""

from __future__ import annotations

import hashlib
import select
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

from kickq_celery.scripts import FUNCTIONS, SOURCES

HOST = "127.0.0.1"
POLL = 0.05  # how often the threads look at the stop flag
IO_TIMEOUT = 5.0  # bound on a blocking send to a peer that does not read
#: the errors of a script call that Redis lacks the functions or scripts for: nothing ran
LOST_SCRIPTS = (b"-NOSCRIPT", b"-ERR Function not found", b"-ERR unknown command")


def script_call(script: str | None = None) -> Callable[[bytes], bool]:
    """Matches a request that calls kickq's ``script`` (any of them: None), alone or in a
    pipeline: its FCALL (Redis 7 functions) or its EVALSHA, not the FUNCTION LOAD or SCRIPT
    EXISTS that names it too."""
    if script is None:
        return lambda data: b"$5\r\nFCALL\r\n" in data.upper() or b"$7\r\nEVALSHA\r\n" in data.upper()
    function = FUNCTIONS[script].encode()
    sha = hashlib.sha1(SOURCES[script].encode()).hexdigest().encode()
    return lambda data: ((b"$5\r\nFCALL\r\n" in data.upper() and function in data)
                         or (b"$7\r\nEVALSHA\r\n" in data.upper() and sha in data))


def _value_end(buf: bytes, pos: int) -> int | None:
    """End offset of the complete RESP2/RESP3 value at `pos`, or None if incomplete."""
    line_end = buf.find(b"\r\n", pos)
    if line_end < 0:
        return None
    kind, head, end = buf[pos:pos + 1], buf[pos + 1:line_end], line_end + 2
    if kind in (b"+", b"-", b":", b"_", b",", b"#", b"("):
        return end
    if kind in (b"$", b"!", b"="):
        size = int(head)
        if size < 0:
            return end
        return end + size + 2 if len(buf) >= end + size + 2 else None
    if kind in (b"*", b"~", b">", b"%", b"|"):
        count = int(head)
        for _ in range(max(count, 0) * (2 if kind in (b"%", b"|") else 1)):
            found = _value_end(buf, end)
            if found is None:
                return None
            end = found
        return _value_end(buf, end) if kind == b"|" else end  # an attribute precedes its value
    raise ValueError(f"not RESP: {buf[pos:pos + 20]!r}")


def _complete_values(buf: bytes, inline: bool = False) -> tuple[int, int]:
    """(how many complete values/commands `buf` starts with, where they end). With `inline`,
    a chunk not starting with ``*`` is taken as inline commands, one per line."""
    count = pos = 0
    while pos < len(buf):
        if inline and buf[pos:pos + 1] != b"*":
            found: int | None = buf.find(b"\n", pos) + 1 or None
        else:
            found = _value_end(buf, pos)
        if found is None:
            break
        count, pos = count + 1, found
    return count, pos


class _Listener:
    """A listening socket on a free port with a thread per accepted connection."""

    name = "listener"

    def __init__(self) -> None:
        self._server = socket.create_server((HOST, 0))
        self.port: int = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self.connections = 0  # accepted so far
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"{self.name}-{self.port}-accept",
                                          daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._server], [], [], POLL)[0]:
                continue
            try:
                conn, _ = self._server.accept()
            except OSError:
                continue
            conn.settimeout(IO_TIMEOUT)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True,
                                      name=f"{self.name}-{self.port}-conn")
            with self._lock:
                self.connections += 1
                self._threads.add(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        self._track(conn)
        try:
            self._handle(conn)
        except (OSError, ValueError):
            pass  # a peer went away or closed under us: the connection ends
        finally:
            self._untrack(conn)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        sock.close()

    def close_connections(self) -> None:
        """Cut every open connection (the listener keeps accepting new ones)."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def threads(self) -> list[threading.Thread]:
        """The threads still running (none after :meth:`close`)."""
        with self._lock:
            threads = [self._acceptor, *self._threads]
        return [t for t in threads if t.is_alive()]

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, cut all connections and join every thread (RuntimeError if one is
        still running after `timeout`)."""
        self._stop.set()
        self._acceptor.join(timeout)
        self._server.close()
        self.close_connections()
        deadline = time.monotonic() + timeout
        for thread in self.threads():
            thread.join(max(deadline - time.monotonic(), 0))
        if self.threads():
            raise RuntimeError(f"{self} threads still running: {self.threads()}")

    def __enter__(self) -> _Listener:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.port})"


class SilentServer(_Listener):
    """Accepts TCP connections, reads and discards everything, never answers."""

    name = "silent"

    def __enter__(self) -> SilentServer:
        return self

    def _handle(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            if select.select([conn], [], [], POLL)[0] and not conn.recv(65536):
                return


class FaultProxy(_Listener):
    """A TCP proxy on a free port of 127.0.0.1 in front of ``target_host:target_port``.

    Client bytes are forwarded once they form complete commands; a chunk of several
    commands (a pipeline, MULTI ... EXEC) counts as one request. Replies pass through
    unchanged. Assumes a request's replies are all in before the client's next request
    on that connection, as with redis-py.
    """

    name = "faultproxy"

    def __init__(self, target_host: str, target_port: int, reply_timeout: float = 2.0) -> None:
        self.target = (target_host, target_port)
        self.reply_timeout = reply_timeout
        self.dropped = 0  # replies thrown away
        self.errors: list[BaseException] = []  # exceptions raised by a drop predicate
        self._predicate: Callable[[bytes], bool] | None = None
        self._flowing = threading.Event()
        self._flowing.set()
        super().__init__()

    def __enter__(self) -> FaultProxy:
        return self

    # --- faults ---

    def drop_reply_once(self, predicate: Callable[[bytes], bool]) -> None:
        """Arm: the next request whose raw RESP bytes satisfy `predicate` goes to Redis; the
        proxy waits for Redis's complete reply (at most `reply_timeout`), throws it away and
        closes that connection. A reply that Redis lacks the script or function
        (:data:`LOST_SCRIPTS`) is passed on and the proxy stays armed, so the loading and the
        call sent again go through and that call is the one dropped. Example:
        ``script_call("create")``."""
        with self._lock:
            self._predicate = predicate

    @property
    def armed(self) -> bool:
        return self._predicate is not None

    def pause(self) -> None:
        """Stall: forward nothing in either direction (connections stay open) until resume()."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    # --- plumbing ---

    def _claim(self, request: bytes) -> Callable[[bytes], bool] | None:
        """The armed predicate if `request` matches it (it is disarmed then)."""
        with self._lock:
            predicate = self._predicate
            if predicate is None:
                return None
            try:
                matched = predicate(request)
            except Exception as exc:  # reported through .errors
                self.errors.append(exc)
                return None
            if matched:
                self._predicate = None
                return predicate
            return None

    def _handle(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target, timeout=IO_TIMEOUT)
        self._track(upstream)
        try:
            self._pump(client, upstream)
        finally:
            self._untrack(upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        pending = b""
        while not self._stop.is_set():
            if not self._flowing.wait(POLL):
                continue
            readable = select.select([client, upstream], [], [], POLL)[0]
            if not self._flowing.is_set():
                continue
            if upstream in readable:
                data = upstream.recv(65536)
                if not data:
                    return
                client.sendall(data)
            if client in readable:
                data = client.recv(65536)
                if not data:
                    return
                pending += data
                try:
                    commands, end = _complete_values(pending, inline=True)
                except ValueError:
                    commands, end = 1, len(pending)  # not RESP: pass it on as it is
                if not commands:
                    continue
                request, pending = pending[:end], pending[end:]
                upstream.sendall(request)
                predicate = self._claim(request)
                if predicate is None:
                    continue
                reply = self._read_replies(upstream, commands)
                if any(reply.startswith(lost) or b"\r\n" + lost in reply for lost in LOST_SCRIPTS):
                    client.sendall(reply)
                    self.drop_reply_once(predicate)
                    continue
                with self._lock:
                    self.dropped += 1
                return  # closes both sides of this connection

    def _read_replies(self, upstream: socket.socket, count: int) -> bytes:
        """Read `count` complete replies (or what came within `reply_timeout`)."""
        reply = b""
        deadline = time.monotonic() + self.reply_timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            if select.select([upstream], [], [], min(POLL, max(deadline - time.monotonic(), 0)))[0]:
                data = upstream.recv(65536)
                if not data:
                    break
                reply += data
                if _complete_values(reply)[0] >= count:
                    break
        return reply
