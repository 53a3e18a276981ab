"""Protocol buffers for Clave: a small wire runtime and message classes generated from protos/.

The message classes live in ``clave.proto.generated.<package>`` (one module per protobuf package, e.g.
``containerd_task_v2``, ``containerd_events``, ``google_protobuf``); import only the ones you use. Every class has
keyword-only typed fields, ``encode() -> bytes``, ``decode(bytes)``, equality and repr. Regenerate with
``scripts/gen_proto.py`` after editing protos/.
"""

from __future__ import annotations

from clave.proto._message import Message
from clave.proto._wire import DecodeError
from clave.proto._wkt import message_class

__all__ = ["DecodeError", "Message", "message_class"]
