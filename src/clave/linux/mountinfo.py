"""The one reader of /proc/self/mountinfo (proc(5)), for the rootfs layer and the cgroup layer."""

from __future__ import annotations


class MountEntry:
    """One line: mount id, parent id, the root of the mount within its file system, the mount point, the
    optional fields (shared:N, master:N...), the file system type, its source and its super options."""

    __slots__ = ("id", "parent", "root", "point", "optional", "fstype", "source", "super_options")

    def __init__(self, line: str) -> None:
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        self.id, self.parent = fields[0], fields[1]
        self.root, self.point = unescape(fields[3]), unescape(fields[4])
        self.optional = fields[6:]
        self.fstype = rest[0] if rest else ""
        self.source = unescape(rest[1]) if len(rest) > 1 else ""
        self.super_options = rest[2] if len(rest) > 2 else ""


def entries(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return [MountEntry(line) for line in f if " - " in line]


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as three-digit octal escapes."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
