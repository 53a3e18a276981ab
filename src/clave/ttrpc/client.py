"""ttrpc client: many concurrent calls over one unix socket, a reader thread routing frames by stream id."""

from __future__ import annotations

import _queue
import _socket
import threading

from clave.proto import DecodeError
from clave.proto.generated.ttrpc import KeyValue, Request, Response
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
    discard,
    pack_header,
    recv_exact,
    unix_address,
)
from clave.ttrpc.errors import Code, TtrpcError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import TypeVar

    from clave.proto import Message

    M = TypeVar("M", bound=Message)
    Metadata = Mapping[str, str | Iterable[str]]

_CLOSED = object()  # queued to pending calls when the connection goes away
_OVERSIZE = object()  # queued when the server's reply exceeded the message size limit


def metadata_pairs(metadata: Metadata | None) -> list[KeyValue]:
    """ttrpc metadata as KeyValue pairs; keys are lower-cased as Go's ttrpc does."""
    if not metadata:
        return []
    pairs = []
    for key, values in metadata.items():
        key = key.lower()
        if isinstance(values, str):
            pairs.append(KeyValue(key=key, value=values))
        else:
            pairs.extend(KeyValue(key=key, value=v) for v in values)
    return pairs


class Client:
    """A ttrpc connection. Thread-safe: calls from several threads share the socket."""

    def __init__(self, sock: _socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()  # stream ids are allocated and frames written under it
        self._next_id = 1
        self._pending: dict[int, _queue.SimpleQueue] = {}
        self._closed: TtrpcError | None = None
        self._reader = threading.Thread(target=self._read_loop, name="ttrpc-client", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, address: str, timeout: float | None = 5.0) -> Client:
        """Connect to ``unix:///path``, a plain path, or an abstract ``@name`` / ``\\0name`` address."""
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(unix_address(address))
            sock.settimeout(None)
        except OSError as e:
            sock.close()
            raise TtrpcError(Code.UNAVAILABLE, f"cannot connect to {address!r}: {e.strerror or e}") from e
        return cls(sock)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = TtrpcError(Code.UNAVAILABLE, "ttrpc: client closed")
        try:
            self._sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # unary --------------------------------------------------------------------------------------------------

    def call(
        self,
        service: str,
        method: str,
        payload: bytes = b"",
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> bytes:
        """Invoke a unary method and return the response payload; raises TtrpcError on a non-OK status."""
        queue, stream_id = self._start(service, method, payload, timeout, metadata, 0)
        try:
            item = queue.get(timeout=timeout)
            while item[0] == TYPE_DATA:  # a unary call ignores stray stream data
                item = queue.get(timeout=timeout)
        except _queue.Empty:
            raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: no response within {timeout}s") from None
        finally:
            self._pending.pop(stream_id, None)
        return self._final_payload(item)

    def invoke(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> M:
        """Typed unary call: encode ``request``, decode the reply as ``response_type``."""
        data = self.call(service, method, request.encode(), timeout, metadata)
        try:
            return response_type.decode(data)
        except DecodeError as e:
            raise TtrpcError(Code.INTERNAL, f"{service}/{method}: malformed response: {e}") from e

    # streams ------------------------------------------------------------------------------------------------

    def stream(
        self,
        service: str,
        method: str,
        payload: bytes | None = None,
        *,
        client_streams: bool,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ClientStream:
        """Open a streaming call. With ``client_streams`` the request stays open for send(); otherwise
        ``payload`` is the single request message and the server streams its replies."""
        flags = FLAG_REMOTE_OPEN if client_streams else FLAG_REMOTE_CLOSED
        queue, stream_id = self._start(service, method, payload or b"", timeout, metadata, flags)
        return ClientStream(self, stream_id, queue, client_streams, timeout)

    # internals ----------------------------------------------------------------------------------------------

    def _start(
        self, service: str, method: str, payload: bytes, timeout: float | None, metadata: Metadata | None, flags: int
    ) -> tuple[_queue.SimpleQueue, int]:
        request = Request(
            service=service,
            method=method,
            payload=payload,
            timeout_nano=int(timeout * 1e9) if timeout else 0,
            metadata=metadata_pairs(metadata),
        )
        data = request.encode()
        if len(data) > MAX_MESSAGE:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED, f"message length {len(data)} exceeds maximum message size of {MAX_MESSAGE}"
            )
        queue: _queue.SimpleQueue = _queue.SimpleQueue()
        with self._lock:
            if self._closed is not None:
                raise self._closed
            stream_id = self._next_id
            self._next_id += 2
            self._pending[stream_id] = queue
            try:
                self._sock.sendall(pack_header(len(data), stream_id, TYPE_REQUEST, flags) + data)
            except OSError as e:
                self._pending.pop(stream_id, None)
                raise TtrpcError(Code.UNAVAILABLE, f"ttrpc: cannot send: {e.strerror or e}") from e
        return queue, stream_id

    def _send_data(self, stream_id: int, payload: bytes, flags: int) -> None:
        if len(payload) > MAX_MESSAGE:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED, f"message length {len(payload)} exceeds maximum message size of {MAX_MESSAGE}"
            )
        with self._lock:
            if self._closed is not None:
                raise self._closed
            try:
                self._sock.sendall(pack_header(len(payload), stream_id, TYPE_DATA, flags) + payload)
            except OSError as e:
                raise TtrpcError(Code.UNAVAILABLE, f"ttrpc: cannot send: {e.strerror or e}") from e

    def _final_payload(self, item: tuple) -> bytes:
        if item[0] is _CLOSED:
            raise item[1]
        if item[0] is _OVERSIZE:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, item[1])
        try:
            response = Response.decode(item[1])
        except DecodeError as e:
            raise TtrpcError(Code.INTERNAL, f"ttrpc: malformed response: {e}") from e
        status = response.status
        if status is not None and status.code != Code.OK:
            raise TtrpcError.from_status(status)
        return response.payload

    def _read_loop(self) -> None:
        sock = self._sock
        error = TtrpcError(Code.UNAVAILABLE, "ttrpc: connection closed")
        try:
            while True:
                length, stream_id, msg_type, flags = HEADER.unpack(recv_exact(sock, HEADER_SIZE))
                if length > MAX_SANE_LENGTH:
                    error = TtrpcError(Code.DATA_LOSS, f"ttrpc: malformed frame header (length {length})")
                    break
                queue = self._pending.get(stream_id)
                if length > MAX_MESSAGE:
                    discard(sock, length)
                    if queue is not None:
                        message = f"message length {length} exceeds maximum message size of {MAX_MESSAGE}"
                        queue.put((_OVERSIZE, message, 0))
                        self._pending.pop(stream_id, None)
                    continue
                payload = recv_exact(sock, length)
                if queue is None:
                    continue  # the call timed out or was abandoned: drop the late frame
                if msg_type == TYPE_RESPONSE:
                    self._pending.pop(stream_id, None)
                    queue.put((TYPE_RESPONSE, payload, flags))
                elif msg_type == TYPE_DATA:
                    queue.put((TYPE_DATA, payload, flags))
                    if flags & FLAG_REMOTE_CLOSED:
                        self._pending.pop(stream_id, None)
        except (ConnectionClosed, OSError):
            pass
        with self._lock:
            if self._closed is None:
                self._closed = error
            pending, self._pending = self._pending, {}
        for queue in pending.values():
            queue.put((_CLOSED, self._closed, 0))


class ClientStream:
    """One streaming call: send()/close_send() for the client's messages, recv() for the server's."""

    def __init__(
        self, client: Client, stream_id: int, queue: _queue.SimpleQueue, open_for_send: bool, timeout: float | None
    ) -> None:
        self._client = client
        self.stream_id = stream_id
        self._queue = queue
        self._send_open = open_for_send
        self._done = False
        self._timeout = timeout
        self.response: bytes | None = None  # the final Response payload, once the server has finished

    def send(self, payload: bytes) -> None:
        if not self._send_open:
            raise TtrpcError(Code.FAILED_PRECONDITION, "ttrpc: stream is closed for sending")
        self._client._send_data(self.stream_id, payload, 0)

    def close_send(self) -> None:
        """Tell the server the client has no more messages (Data frame with remote-closed, no data)."""
        if self._send_open:
            self._send_open = False
            self._client._send_data(self.stream_id, b"", FLAG_REMOTE_CLOSED | FLAG_NO_DATA)

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next message from the server, or None once it has finished the stream successfully."""
        if self._done:
            return None
        try:
            item = self._queue.get(timeout=timeout if timeout is not None else self._timeout)
        except _queue.Empty:
            raise TtrpcError(Code.DEADLINE_EXCEEDED, "ttrpc: no stream message in time") from None
        kind, payload, flags = item
        if kind == TYPE_DATA:
            if flags & FLAG_REMOTE_CLOSED:
                self._finish()
                if flags & FLAG_NO_DATA:
                    return None
            return payload
        self._finish()
        self.response = self._client._final_payload(item)
        return None

    def finish(self, timeout: float | None = None) -> bytes:
        """Close the sending side and wait for the end of the stream; returns the final response payload."""
        self.close_send()
        while self.recv(timeout) is not None:
            pass
        return self.response or b""

    def __iter__(self) -> ClientStream:
        return self

    def __next__(self) -> bytes:
        message = self.recv()
        if message is None:
            raise StopIteration
        return message

    def _finish(self) -> None:
        self._done = True
        self._send_open = False
        self._client._pending.pop(self.stream_id, None)
