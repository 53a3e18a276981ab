"""ttrpc server: unix-socket listener, one reader thread per connection, handlers run on a growing thread pool.

A malformed frame or request fails only its own stream (with an error status); a connection is dropped only
when its byte stream can no longer be trusted (a frame header announcing more than 16 MiB), and the server
keeps accepting other clients in every case.
"""

from __future__ import annotations

import _queue
import _socket
import os
import struct
import sys
import threading
import time

from clave.proto import DecodeError
from clave.proto.generated.google_rpc import Status
from clave.proto.generated.ttrpc import Request, Response
from clave.ttrpc._frame import (
    FLAG_NO_DATA,
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    HEADER,
    HEADER_SIZE,
    MAX_MESSAGE,
    MAX_SANE_LENGTH,
    TYPE_DATA,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    ConnectionClosed,
    FdChannel,
    discard,
    pack_header,
    recv_exact,
    unix_address,
)
from clave.ttrpc.errors import Code, TtrpcError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, TypeVar

    from clave.proto import Message
    from clave.ttrpc._frame import Channel

    Handler = Callable[["Context", bytes], bytes]
    StreamHandler = Callable[["Context", "ServerStream"], bytes | None]
    Req = TypeVar("Req", bound=Message)


class Context:
    """What a handler knows about its call: names, metadata, deadline, stream id."""

    __slots__ = ("service", "method", "metadata", "deadline", "stream_id")

    def __init__(
        self, service: str, method: str, metadata: dict[str, list[str]], deadline: float | None, stream_id: int
    ) -> None:
        self.service = service
        self.method = method
        self.metadata = metadata
        self.deadline = deadline  # time.monotonic() value, or None for no deadline
        self.stream_id = stream_id

    def get(self, key: str) -> str | None:
        """The first metadata value for ``key`` (keys are case-insensitive)."""
        values = self.metadata.get(key.lower())
        return values[0] if values else None

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


def typed(request_type: type[Req]) -> Callable[[Callable[[Context, Req], Message]], Handler]:
    """Decorator turning ``fn(ctx, request_message) -> response_message`` into a bytes handler."""

    def wrap(fn: Callable[[Context, Req], Message]) -> Handler:
        def handler(ctx: Context, data: bytes) -> bytes:
            try:
                request = request_type.decode(data)
            except DecodeError as e:
                raise TtrpcError(Code.INVALID_ARGUMENT, f"{ctx.service}/{ctx.method}: {e}") from e
            return fn(ctx, request).encode()

        handler.__name__ = getattr(fn, "__name__", "handler")
        handler.__doc__ = fn.__doc__
        return handler

    return wrap


def snake_case(name: str) -> str:
    """``ResizePty`` -> ``resize_pty``, ``CloseIO`` -> ``close_io``."""
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and (not name[i - 1].isupper() or (i + 1 < len(name) and name[i + 1].islower())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


class ServerStream:
    """The server's side of a streaming call."""

    def __init__(self, conn: _Connection, stream_id: int, remote_open: bool) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._queue: _queue.SimpleQueue = _queue.SimpleQueue()
        self._remote_open = remote_open

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The client's next message, or None once it has closed its side."""
        if not self._remote_open and self._queue.empty():
            return None
        try:
            item: bytes | None = self._queue.get(timeout=timeout)
        except _queue.Empty:
            raise TtrpcError(Code.DEADLINE_EXCEEDED, "ttrpc: no stream message in time") from None
        if item is None:
            self._remote_open = False
        return item

    def send(self, payload: bytes) -> None:
        if len(payload) > MAX_MESSAGE:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED, f"message length {len(payload)} exceeds maximum message size of {MAX_MESSAGE}"
            )
        if not self._conn.send(self.stream_id, TYPE_DATA, 0, payload):
            raise TtrpcError(Code.UNAVAILABLE, "ttrpc: client connection closed")

    @property
    def peer_lost(self) -> bool:
        """Whether recv()'s end came from the connection dropping (the client died) rather than the client
        closing its side."""
        return self._conn.lost

    def _deliver(self, payload: bytes | None) -> None:
        self._queue.put(payload)


class _Workers:
    """Threads that run handlers; a new thread starts whenever every existing one is busy, because shim
    handlers such as Wait block for the lifetime of a process and must not starve the others."""

    def __init__(self) -> None:
        self._queue: _queue.SimpleQueue = _queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._queued = 0
        self.count = 0

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        with self._lock:
            self._queued += 1
            if self._queued > self._idle:
                self.count += 1
                threading.Thread(target=self._run, name=f"ttrpc-worker-{self.count}", daemon=True).start()
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            fn, args = self._queue.get()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            try:
                fn(*args)
            except Exception as e:  # handler errors become statuses earlier; this is a failed reply
                sys.stderr.write(f"ttrpc: worker: {type(e).__name__}: {e}\n")


class _NewPeer(Exception):
    """The first request of a new client arrived on a device channel still serving the previous one."""

    def __init__(self, flags: int, payload: bytes) -> None:
        super().__init__()
        self.flags = flags
        self.payload = payload


class _Connection:
    def __init__(self, server: Server, sock: Channel) -> None:
        self.server = server
        self.sock = sock
        self.send_lock = threading.Lock()
        self.streams: dict[int, ServerStream] = {}
        self.last_stream_id = 0
        self.closed = False
        self.lost = False  # the peer went away (set before its streams see their end)
        self.reusable = isinstance(sock, FdChannel)  # a device that later peers reuse (see _NewPeer)

    def send(self, stream_id: int, msg_type: int, flags: int, payload: bytes) -> bool:
        with self.send_lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(pack_header(len(payload), stream_id, msg_type, flags) + payload)
            except OSError:
                return False
        return True

    def respond(self, stream_id: int, payload: bytes = b"", status: Status | None = None) -> None:
        if len(payload) > MAX_MESSAGE - 64:
            message = f"response length {len(payload)} exceeds maximum message size of {MAX_MESSAGE}"
            status, payload = Status(code=Code.RESOURCE_EXHAUSTED, message=message), b""
        response = Response(status=status or Status(), payload=payload)
        self.send(stream_id, TYPE_RESPONSE, 0, response.encode())

    def fail(self, stream_id: int, code: int, message: str) -> None:
        self.respond(stream_id, status=Status(code=code, message=message))

    def close(self) -> None:
        with self.send_lock:
            self.closed = True
        try:
            self.sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def serve(self) -> None:
        try:
            self._read_loop()
        except (ConnectionClosed, OSError):
            pass
        finally:
            self.lost = True
            for stream in list(self.streams.values()):
                stream._deliver(None)
            self.streams.clear()
            self.close()
            self.server._forget(self)

    def _read_loop(self) -> None:
        sock = self.sock
        while True:
            length, stream_id, msg_type, flags = HEADER.unpack(recv_exact(sock, HEADER_SIZE))
            if length > MAX_SANE_LENGTH:
                return  # not a ttrpc peer, or it lost framing: nothing after this can be parsed
            if length > MAX_MESSAGE:
                discard(sock, length)
                if msg_type == TYPE_REQUEST:
                    message = f"message length {length} exceeds maximum message size of {MAX_MESSAGE}"
                    self.fail(stream_id, Code.RESOURCE_EXHAUSTED, message)
                continue
            payload = recv_exact(sock, length)
            if msg_type == TYPE_REQUEST:
                self._on_request(stream_id, flags, payload)
            elif msg_type == TYPE_DATA:
                stream = self.streams.get(stream_id)
                if stream is None:
                    continue  # data for a finished or unknown stream
                if not flags & FLAG_NO_DATA:
                    stream._deliver(payload)
                if flags & FLAG_REMOTE_CLOSED:
                    stream._deliver(None)
            # other message types are not sent by clients: ignore them

    def _on_request(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id % 2 == 0:
            self.fail(stream_id, Code.INVALID_ARGUMENT, f"stream id {stream_id} must be odd for client streams")
            return
        if stream_id <= self.last_stream_id:
            if stream_id == 1 and self.reusable:
                # A device channel cannot see its peer leave and come back quickly; a client's first stream
                # id again means a new client: this connection ends and the next one takes the request.
                raise _NewPeer(flags, payload)
            self.fail(stream_id, Code.INVALID_ARGUMENT, f"stream id {stream_id} was already used")
            return
        self.last_stream_id = stream_id
        try:
            request = Request.decode(payload)
        except DecodeError as e:
            self.fail(stream_id, Code.INVALID_ARGUMENT, f"malformed request: {e}")
            return
        metadata: dict[str, list[str]] = {}
        for pair in request.metadata:
            metadata.setdefault(pair.key.lower(), []).append(pair.value)
        deadline = time.monotonic() + request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        ctx = Context(request.service, request.method, metadata, deadline, stream_id)
        server = self.server
        stream_handler = server._stream_handlers.get((request.service, request.method))
        if stream_handler is not None:
            stream = ServerStream(self, stream_id, remote_open=bool(flags & FLAG_REMOTE_OPEN))
            if request.payload or not flags & FLAG_REMOTE_OPEN:
                stream._deliver(request.payload)
            self.streams[stream_id] = stream
            server._workers.submit(self._run_stream, stream_handler, ctx, stream)
            return
        methods = server._services.get(request.service)
        if methods is None:
            self.fail(stream_id, Code.UNIMPLEMENTED, f"service {request.service}")
            return
        handler = methods.get(request.method)
        if handler is None:
            self.fail(stream_id, Code.UNIMPLEMENTED, f"method {request.method}")
            return
        server._workers.submit(self._run_unary, handler, ctx, request.payload)

    def _run_unary(self, handler: Handler, ctx: Context, payload: bytes) -> None:
        if ctx.expired():
            self.fail(ctx.stream_id, Code.DEADLINE_EXCEEDED, "deadline exceeded before the call started")
            return
        try:
            result = handler(ctx, payload)
        except Exception as e:
            self.respond(ctx.stream_id, status=_status_of(e, ctx))
            return
        if ctx.expired():
            self.fail(ctx.stream_id, Code.DEADLINE_EXCEEDED, "deadline exceeded")
            return
        self.respond(ctx.stream_id, result)

    def _run_stream(self, handler: StreamHandler, ctx: Context, stream: ServerStream) -> None:
        try:
            result = handler(ctx, stream)
        except Exception as e:
            self.respond(ctx.stream_id, status=_status_of(e, ctx))
        else:
            self.respond(ctx.stream_id, result or b"")
        finally:
            self.streams.pop(ctx.stream_id, None)


def _status_of(error: Exception, ctx: Context) -> Status:
    if isinstance(error, TtrpcError):
        return error.to_status()
    if isinstance(error, DecodeError):
        return Status(code=Code.INVALID_ARGUMENT, message=f"{ctx.service}/{ctx.method}: {error}")
    if isinstance(error, NotImplementedError):
        return Status(code=Code.UNIMPLEMENTED, message=f"{ctx.method}: {error or 'not implemented'}")
    return Status(code=Code.INTERNAL, message=f"{ctx.method}: {type(error).__name__}: {error}")


def peer_uid(sock: _socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED: pid, uid, gid)."""
    return _PEERCRED.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _PEERCRED.size))[1]


_PEERCRED = struct.Struct("3i")


class Server:
    """Serve registered ttrpc services on unix sockets.

    ``require_same_user`` refuses connections from processes of other users (root excepted), as containerd's
    shims do: abstract sockets have no file permissions to keep other users out."""

    def __init__(self, require_same_user: bool = False) -> None:
        self._require_same_user = require_same_user
        self._services: dict[str, dict[str, Handler]] = {}
        self._stream_handlers: dict[tuple[str, str], StreamHandler] = {}
        self._workers = _Workers()
        self._lock = threading.Lock()
        self._listeners: list[_socket.socket] = []
        self._connections: set[_Connection] = set()
        self._closed = False

    # registration -------------------------------------------------------------------------------------------

    def register(self, service: str, methods: Mapping[str, Handler]) -> None:
        """Add unary methods: ``{method name: handler(ctx, request_bytes) -> response_bytes}``."""
        self._services.setdefault(service, {}).update(methods)

    def register_stream(self, service: str, method: str, handler: StreamHandler) -> None:
        """Add a streaming method: ``handler(ctx, stream)`` reads with stream.recv(), writes with stream.send(),
        and may return a final response payload."""
        self._stream_handlers[(service, method)] = handler

    def register_service(self, descriptor: Any, implementation: object) -> None:
        """Bind a generated ``<Name>Service`` descriptor to an object with one snake_case method per rpc
        (``impl.resize_pty(ctx, ResizePtyRequest) -> Empty``). Missing methods answer Unimplemented."""
        methods: dict[str, Handler] = {}
        for name, (request_type, _response_type) in descriptor.METHODS.items():
            fn = getattr(implementation, snake_case(name), None)
            if fn is not None:
                methods[name] = typed(request_type)(fn)
        self.register(descriptor.NAME, methods)

    # serving ------------------------------------------------------------------------------------------------

    def listen(self, address: str, mode: int | None = 0o600) -> _socket.socket:
        """Bind and listen on a unix address (``unix://`` prefix and abstract ``@``/``\\0`` names accepted).
        A path that already exists is an error: another server may own it."""
        path = unix_address(address)
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.bind(path)
            if mode is not None and not path.startswith("\0"):
                os.chmod(path, mode)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        return sock

    def serve(self, listener: _socket.socket) -> None:
        """Accept connections on ``listener`` until close(); each connection gets its own reader thread."""
        with self._lock:
            if self._closed:
                raise TtrpcError(Code.UNAVAILABLE, "ttrpc: server closed")
            self._listeners.append(listener)
        while True:
            try:
                fd, _ = listener._accept()  # type: ignore[attr-defined]  # _socket has no accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.01)  # e.g. EMFILE: keep serving those already connected
                continue
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)
            if self._require_same_user and peer_uid(sock) not in (0, os.geteuid()):
                sock.close()
                continue
            conn = _Connection(self, sock)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._connections.add(conn)
            threading.Thread(target=conn.serve, name="ttrpc-conn", daemon=True).start()

    def serve_fd(self, fd: int) -> None:
        """Serve one connection on an already-open fd that is not a socket (a virtio-serial port, a pipe),
        in this thread, until the peer closes its side (end of file). The fd stays open: the caller may serve
        the next connection on it (a virtio-serial port outlives the host's connections)."""
        self.serve_channel(FdChannel(fd))

    def serve_channel(self, channel: FdChannel) -> None:
        """serve_fd() on a channel the caller keeps (to shut it down from a signal handler, say). A request
        with stream id 1 after others is a new client: the old connection ends (its handlers can no longer
        send) and a new one, on the same channel, serves the new client from that request on."""
        first: _NewPeer | None = None
        while True:
            conn = _Connection(self, channel)
            with self._lock:
                if self._closed:
                    raise TtrpcError(Code.UNAVAILABLE, "ttrpc: server closed")
                self._connections.add(conn)
            try:
                if first is not None:
                    conn._on_request(1, first.flags, first.payload)
                conn.serve()
                return
            except _NewPeer as peer:
                first = peer
                channel = FdChannel(channel.fd)  # the old connection's channel is shut by its close()

    def start(self, listener: _socket.socket) -> threading.Thread:
        """serve() in a background thread."""
        thread = threading.Thread(target=self.serve, args=(listener,), name="ttrpc-accept", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop accepting and drop every connection (handlers still running finish into closed sockets)."""
        with self._lock:
            self._closed = True
            listeners, self._listeners = self._listeners, []
            connections, self._connections = self._connections, set()
        for listener in listeners:
            try:
                listener.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for conn in connections:
            conn.close()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
