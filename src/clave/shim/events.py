"""Publishing task events to containerd: ttrpc ``containerd.services.events.ttrpc.v1.Events/Forward`` on the
address containerd gives its shims in ``TTRPC_ADDRESS``, in order, from one queue."""

from __future__ import annotations

import queue
import threading

from clave.proto.generated.containerd_services_events_ttrpc_v1 import Envelope, ForwardRequest
from clave.proto.generated.google_protobuf import Any as AnyMessage
from clave.proto.generated.google_protobuf import Timestamp

TYPE_CHECKING = False
if TYPE_CHECKING:
    from clave.proto import Message
    from clave.ttrpc import Client

SERVICE = "containerd.services.events.ttrpc.v1.Events"
TOPICS = {
    "TaskCreate": "/tasks/create", "TaskStart": "/tasks/start", "TaskDelete": "/tasks/delete",
    "TaskExit": "/tasks/exit", "TaskOOM": "/tasks/oom", "TaskExecAdded": "/tasks/exec-added",
    "TaskExecStarted": "/tasks/exec-started", "TaskPaused": "/tasks/paused", "TaskResumed": "/tasks/resumed",
    "TaskCheckpointed": "/tasks/checkpointed",
}


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._queue: queue.Queue[Message | None] = queue.Queue()
        self._client: Client | None = None
        threading.Thread(target=self._loop, name="events", daemon=True).start()

    def publish(self, event: Message) -> None:
        self._queue.put(event)

    def close(self, timeout: float = 2.0) -> None:
        self._queue.put(None)
        self._queue.join()

    def _loop(self) -> None:
        from clave.ttrpc import Client, TtrpcError

        while True:
            event = self._queue.get()
            try:
                if event is None:
                    return
                name = type(event).__name__
                request = ForwardRequest(envelope=Envelope(
                    timestamp=Timestamp.now(), namespace=self.namespace, topic=TOPICS[name],
                    event=AnyMessage.pack(event)))
                for attempt in range(3):  # containerd may be restarting: reconnect and retry
                    try:
                        if self._client is None or self._client.closed:
                            self._client = Client.connect(self.address)
                        self._client.call(SERVICE, "Forward", request.encode(), timeout=5)
                        break
                    except TtrpcError:
                        self._client = None
                        if attempt == 2:
                            break
                        import time

                        time.sleep(0.2 * (attempt + 1))
            finally:
                self._queue.task_done()
