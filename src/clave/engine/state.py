"""Container state on disk: ``<root>/<id>/state.json`` plus the exec fifo, and the live status.

The status is not kept here: the container's handler derives it each time from the live container.
"""

from __future__ import annotations

import fcntl
import os
import time

from clave import fastjson
from clave.errors import AlreadyExists, ClaveError, InvalidArgument, NotFound

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_ROOT = "/run/clave"
OCI_VERSION = "1.2.0"
STATE_FILE = "state.json"
EXEC_FIFO = "exec.fifo"

_ID_PUNCTUATION = frozenset("+-._")
# The id names the state directory and the cgroup directory: it must fit one file name (NAME_MAX).
MAX_ID_LENGTH = 255


def validate_id(container_id: str) -> None:
    """runc's rule: letters, digits and + - . _ only; not . or ..; and at most one file name long."""
    if not container_id:
        raise InvalidArgument("container id cannot be empty")
    if len(container_id) > MAX_ID_LENGTH:
        raise InvalidArgument(f"invalid container id: {len(container_id)} characters long, at most "
                              f"{MAX_ID_LENGTH} allowed")
    valid = all(c.isalnum() or c in _ID_PUNCTUATION for c in container_id) and container_id.isascii()
    if container_id in (".", "..") or not valid:
        raise InvalidArgument(f"invalid container id {container_id!r}: use letters, digits and + - . _")


def access_error(exc: OSError, path: str) -> ClaveError:
    """A state directory the caller cannot reach (not root, a file in the way...): one line, not absence."""
    return ClaveError(f"cannot access {path}: {exc.strerror or type(exc).__name__}")


def rfc3339_ns(t_ns: int) -> str:
    """Go's RFC3339Nano, as runc prints `created`: nanoseconds with trailing zeros (and a bare ".") dropped."""
    seconds, nanos = divmod(t_ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


class State:
    """What the runtime records about a container (its own file format, not the OCI state). ``handler_state``
    belongs to the container's handler: only it reads and writes it."""

    def __init__(
        self, id: str, bundle: str, rootfs: str, pid: int = 0, created_ns: int = 0, owner: str = "",
        annotations: dict[str, str] | None = None, handler: str = "", config: dict[str, Any] | None = None,
        handler_state: dict[str, Any] | None = None,
    ) -> None:
        self.id = id
        self.bundle = bundle
        self.rootfs = rootfs
        self.pid = pid  # 0 until create has one: "creating"
        self.created_ns = created_ns or time.time_ns()
        self.owner = owner
        self.annotations = annotations or {}
        self.handler = handler
        self.config = config or {}
        self.handler_state = handler_state or {}

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> State:
        return cls(**doc)


class StateDir:
    """One container's directory under the runtime root, with an exclusive lock for mutations."""

    def __init__(self, root: str, container_id: str) -> None:
        validate_id(container_id)
        self.root = root
        self.id = container_id
        self.path = os.path.join(root, container_id)
        self.fifo = os.path.join(self.path, EXEC_FIFO)
        self._lock_fd: int | None = None

    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.path, STATE_FILE))

    def present(self) -> bool:
        """Whether the container's directory exists (even half-created). A root the caller may not search
        is an error, not an absent container."""
        try:
            os.stat(self.path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise access_error(exc, self.path) from None
        return True

    def make(self) -> None:
        """Create the directory; fails if a container with this id exists (even half-created)."""
        try:
            os.makedirs(self.root, mode=0o711, exist_ok=True)
            os.mkdir(self.path, 0o711)
        except FileExistsError:
            raise AlreadyExists(f"container {self.id} already exists") from None
        except OSError as exc:
            raise access_error(exc, self.path) from None

    def lock(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"container {self.id} does not exist") from None
        except OSError as exc:
            raise access_error(exc, self.path) from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> State:
        try:
            with open(os.path.join(self.path, STATE_FILE), "rb") as f:
                return State.from_json(fastjson.loads(f.read()))
        except FileNotFoundError:
            raise NotFound(f"container {self.id} does not exist") from None
        except OSError as exc:
            raise access_error(exc, self.path) from None
        except (ValueError, TypeError) as exc:
            raise ClaveError(f"container {self.id}: corrupt state file ({exc}); use delete --force") from None

    def save(self, state: State) -> None:
        tmp = os.path.join(self.path, f".{STATE_FILE}.tmp")
        with open(tmp, "w") as f:
            f.write(fastjson.dumps(state.to_json(), compact=True))
        os.rename(tmp, os.path.join(self.path, STATE_FILE))

    def remove(self) -> None:
        if not os.path.isdir(self.path):
            return
        for name in os.listdir(self.path):
            try:
                os.unlink(os.path.join(self.path, name))
            except IsADirectoryError:
                pass
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass


def oci_state(state: State, status: str, described: dict[str, Any], runc_fields: bool = True) -> dict[str, Any]:
    """The runtime-spec state (plus runc's rootfs/created/owner, and what the handler describes) for
    ``clave state`` and hooks; ``status`` is the handler's live verdict."""
    doc: dict[str, Any] = {
        "ociVersion": OCI_VERSION,  # the spec version the state complies with (runc: its own), not the config's
        "id": state.id,
        "pid": state.pid if status != "stopped" else 0,
        "status": status,
        "bundle": state.bundle,
    }
    if runc_fields:
        doc["rootfs"] = state.rootfs
        doc["created"] = rfc3339_ns(state.created_ns)
        doc["owner"] = state.owner
    if state.annotations:
        doc["annotations"] = state.annotations
    doc.update(described)
    return doc


def list_ids(root: str) -> list[str]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise access_error(exc, root) from None
    return sorted(n for n in names if os.path.isfile(os.path.join(root, n, STATE_FILE)))


def owner_name(path: str) -> str:
    """The user owning a container's state directory, by name from the passwd database (runc's ``list``
    OWNER); ``#UID`` when the database has no name for it."""
    import pwd  # only `list` needs it

    uid = os.stat(path).st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"
