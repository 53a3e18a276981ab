"""Clave's CLI against Debian's runc 1.1.5, side by side on the same inputs: exit codes, and whether each writes
anything to stdout and one error line to stderr.

Each runtime gets its own --root under tmp_path and its own container ids (the cgroupfs driver names a
container's cgroup after its id, so the same id would make the two share cgroups). Where runc's behaviour is a
bug or a choice Clave does not copy, a comment says so and the test asserts Clave's behaviour.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import CLAVE, Bundle, leftovers, reap, reap_zombies

RUNC = shutil.which("runc")
pytestmark = pytest.mark.skipif(RUNC is None, reason="runc is not installed (Debian's runc package)")


class Side:
    """One runtime with a private root; ``id`` maps a test's name to this side's container id."""

    def __init__(self, name: str, argv0: str, root: Path, prefix: str) -> None:
        self.name, self.argv0, self.root, self.prefix = name, argv0, root, prefix
        self.pids: list[int] = []

    def id(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def __call__(self, *args: str, cwd: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
        # stdin/stdout are files, not pipes: a created container keeps them open.
        out, err = self.root.parent / f"{self.name}.out", self.root.parent / f"{self.name}.err"
        with open(out, "w") as o, open(err, "w") as e:
            done = subprocess.run([self.argv0, "--root", str(self.root), *args], stdin=subprocess.DEVNULL,
                                  stdout=o, stderr=e, cwd=cwd, timeout=30, check=False, **kwargs)  # type: ignore
        return subprocess.CompletedProcess(done.args, done.returncode, out.read_text(), err.read_text())

    def create(self, bundle: Bundle, name: str) -> None:
        pid_file = self.root.parent / f"{self.name}-{len(self.pids)}.pid"
        result = self("create", "--bundle", str(bundle.path), "--pid-file", str(pid_file), self.id(name))
        assert result.returncode == 0, (self.name, result.stderr)
        self.pids.append(int(pid_file.read_text()))


@pytest.fixture
def sides(tmp_path: Path, bundle: Bundle) -> Iterator[tuple[Side, Side]]:
    assert RUNC is not None
    runc = Side("runc", RUNC, tmp_path / "runc-root", f"r{os.getpid()}")
    clave = Side("clave", CLAVE, tmp_path / "clave-root", f"c{os.getpid()}")
    bundle.args("sleep", "60")
    bundle.write()
    yield runc, clave
    for side in (runc, clave):
        if side.root.exists():
            for cid in os.listdir(side.root):
                side("delete", "--force", cid)
        for pid in side.pids:
            reap(pid)
    reap_zombies()
    for side in (runc, clave):
        found = leftovers(side.root, side.prefix, [])
        assert not found, f"{side.name} left behind: {found}"


def shape(result: subprocess.CompletedProcess[str]) -> tuple[int, bool]:
    return result.returncode, bool(result.stdout.strip())


def assert_same(runc: Side, clave: Side, *args: str, ids: tuple[str, ...] = (), stdout: bool = True) -> None:
    """Run ``args`` on both sides (names in ``ids`` become each side's container id) and compare the exit code,
    whether stdout has output, and that a failure is one line on stderr (Clave) or one error record (runc)."""
    def argv(side: Side) -> list[str]:
        return [side.id(a.removeprefix("@")) if a.startswith("@") and a.removeprefix("@") in ids else a
                for a in args]

    r, c = runc(*argv(runc)), clave(*argv(clave))
    assert r.returncode == c.returncode, f"{args}: runc {r.returncode} {r.stderr!r}, clave {c.returncode} {c.stderr!r}"
    if stdout:
        assert bool(r.stdout.strip()) == bool(c.stdout.strip()), f"{args}: stdout runc {r.stdout!r} clave {c.stdout!r}"
    if "level=error" in r.stderr:  # runc failed (not a process's own non-zero status)
        assert r.stderr.count("level=error") == 1
        assert len(c.stderr.strip().splitlines()) == 1, c.stderr
        assert "Traceback" not in c.stderr
    else:
        assert not c.stderr.strip(), c.stderr


VERBS_WITH_ID = ("start", "state", "kill", "delete", "ps", "pause", "resume", "update", "events")


@pytest.mark.parametrize("verb", VERBS_WITH_ID + ("exec",))
def test_unknown_container(sides: tuple[Side, Side], verb: str) -> None:
    runc, clave = sides
    extra = ("true",) if verb == "exec" else ()
    assert_same(runc, clave, verb, "nosuch", *extra)  # exec: 255, the rest 1


@pytest.mark.parametrize("verb", VERBS_WITH_ID + ("create", "run", "exec"))
def test_missing_arguments(sides: tuple[Side, Side], verb: str) -> None:
    runc, clave = sides
    # runc also prints "Incorrect Usage." and the verb's help on stdout; Clave keeps stdout clean and says
    # what is missing in its one stderr line. Exit codes agree (1).
    assert_same(runc, clave, verb, stdout=False)


@pytest.mark.parametrize("verb", VERBS_WITH_ID + ("create", "run", "exec", "list", "spec", "features"))
def test_unknown_flag(sides: tuple[Side, Side], verb: str) -> None:
    runc, clave = sides
    assert_same(runc, clave, verb, "--bogus", "x", stdout=False)  # runc's usage on stdout: as above


@pytest.mark.parametrize("verb", ("create", "start", "run", "state", "delete", "pause", "resume", "update", "events"))
def test_extra_arguments(sides: tuple[Side, Side], verb: str) -> None:
    runc, clave = sides
    assert_same(runc, clave, verb, "one", "two", stdout=False)  # runc: "requires exactly 1 argument(s)"


def test_unknown_verb_and_global_flags(sides: tuple[Side, Side]) -> None:
    runc, clave = sides
    assert_same(runc, clave, "frobnicate")  # runc exits 3 (its help lookup), Clave too
    assert_same(runc, clave, "--bogus", "list", stdout=False)
    assert_same(runc, clave, "--log-format", "xml", "state", "x")


def test_bad_bundles(sides: tuple[Side, Side], tmp_path: Path) -> None:
    runc, clave = sides
    for verb in ("create", "run"):
        assert_same(runc, clave, verb, "--bundle", "/nonexistent", "@b", ids=("b",))
        (tmp_path / "broken").mkdir(exist_ok=True)
        (tmp_path / "broken" / "config.json").write_text("{")
        assert_same(runc, clave, verb, "--bundle", str(tmp_path / "broken"), "@b", ids=("b",))
        assert_same(runc, clave, verb, "--bundle", str(tmp_path), "@b", ids=("b",))  # no config.json
        assert_same(runc, clave, verb, "--bundle", str(tmp_path), "bad/id")
        assert_same(runc, clave, verb, "--bundle", str(tmp_path), "")


def test_wrong_states_and_signals(sides: tuple[Side, Side], bundle: Bundle) -> None:
    runc, clave = sides
    ids = ("c",)
    for side in sides:
        side.create(bundle, "c")
    # created
    assert_same(runc, clave, "create", "--bundle", str(bundle.path), "@c", ids=ids)  # already exists
    assert_same(runc, clave, "resume", "@c", ids=ids)
    assert_same(runc, clave, "exec", "@c", ids=ids)  # no command: 255
    assert_same(runc, clave, "exec", "@c", "/bin/nonexistent", ids=ids)
    assert_same(runc, clave, "exec", "--cwd", "rel", "@c", "true", ids=ids)
    assert_same(runc, clave, "exec", "--process", "/nonexistent", "@c", ids=ids)
    assert_same(runc, clave, "pause", "@c", ids=ids)  # runc freezes a created container
    assert_same(runc, clave, "start", "@c", ids=ids)  # ... and then refuses to start it
    assert_same(runc, clave, "resume", "@c", ids=ids)
    assert_same(runc, clave, "start", "@c", ids=ids)
    # running
    assert_same(runc, clave, "start", "@c", ids=ids)
    assert_same(runc, clave, "resume", "@c", ids=ids)
    assert_same(runc, clave, "delete", "@c", ids=ids)
    for sig in ("BOGUS", "99", "-9", "0", "SIGRTMAX+1"):
        assert_same(runc, clave, "kill", "@c", sig, ids=ids)
    assert_same(runc, clave, "exec", "@c", "sh", "-c", "exit 7", ids=ids)  # the process's own status
    assert_same(runc, clave, "update", "@c", ids=ids)  # nothing to change: 0 on a running container
    assert_same(runc, clave, "update", "--memory", "abc", "@c", ids=ids)
    assert_same(runc, clave, "ps", "--format", "bogus", "@c", ids=ids)
    assert_same(runc, clave, "list", "--format", "bogus")
    assert_same(runc, clave, "pause", "@c", ids=ids)
    assert_same(runc, clave, "pause", "@c", ids=ids)
    assert_same(runc, clave, "exec", "@c", "true", ids=ids)  # paused: 255
    assert_same(runc, clave, "start", "@c", ids=ids)
    assert_same(runc, clave, "resume", "@c", ids=ids)
    assert_same(runc, clave, "kill", "@c", "KILL", ids=ids)
    for side in sides:
        reap(side.pids[-1])
    # stopped
    for args in (("kill", "@c"), ("pause", "@c"), ("resume", "@c"), ("exec", "@c", "true"), ("start", "@c"),
                 ("update", "@c"), ("update", "--memory", "10M", "@c"), ("events", "--stats", "@c"),
                 ("events", "@c"), ("ps", "@c"), ("ps", "--format", "json", "@c"), ("state", "@c")):
        assert_same(runc, clave, *args, ids=ids)
    assert json.loads(clave("ps", "--format", "json", clave.id("c")).stdout) is None  # runc prints null
    assert_same(runc, clave, "delete", "@c", ids=ids)
    assert_same(runc, clave, "delete", "@c", ids=ids)
    assert_same(runc, clave, "delete", "--force", "@c", ids=ids)


def test_spec_verb(sides: tuple[Side, Side], tmp_path: Path) -> None:
    runc, clave = sides
    for side in sides:
        work = tmp_path / f"spec-{side.name}"
        work.mkdir()
        assert side("spec", cwd=work).returncode == 0
        again = side("spec", cwd=work)
        assert again.returncode == 1 and "exists" in again.stderr
        assert side("spec", "--bundle", "/nonexistent").returncode == 1


def test_long_ids_are_refused_in_one_line(sides: tuple[Side, Side], bundle: Bundle) -> None:
    runc, clave = sides
    long_id = "a" * 300
    for verb in ("create", "state", "delete", "kill"):
        args = ("--bundle", str(bundle.path), long_id) if verb == "create" else (long_id,)
        assert_same(runc, clave, verb, *args)
    assert "at most 255" in clave("state", long_id).stderr
    # 255 characters still fit a file name: accepted by both (the prefixes are the same length)
    name = "b" * (255 - len(clave.prefix) - 1)
    for side in sides:
        side.create(bundle, name)
    assert_same(runc, clave, "state", "@" + name, ids=(name,))


def test_json_log_format_without_log_file_writes_json_errors_on_stderr(sides: tuple[Side, Side]) -> None:
    runc, clave = sides
    r, c = runc("--log-format", "json", "state", "nosuch"), clave("--log-format", "json", "state", "nosuch")
    assert r.returncode == c.returncode == 1
    for result in (r, c):
        line = json.loads(result.stderr)
        assert line["level"] == "error" and line["msg"] and line["time"]
        assert set(line) == {"level", "msg", "time"}


def test_list_owner_is_the_user_name(sides: tuple[Side, Side], bundle: Bundle) -> None:
    runc, clave = sides
    for side in sides:
        side.create(bundle, "o")
    name = pwd.getpwuid(os.geteuid()).pw_name
    for side in sides:
        listed = json.loads(side("list", "--format", "json").stdout)
        assert [entry["owner"] for entry in listed] == [name], side.name
        table = side("list").stdout.splitlines()
        assert table[1].split()[-1] == name
        assert json.loads(side("state", side.id("o")).stdout)["owner"] == ""  # runc's state leaves it empty
    # the same tabwriter layout: each column starts 3 spaces after its longest cell, at least 12 wide. (The two
    # tables differ in the CREATED cells, RFC 3339 with trailing zeros dropped, so compare the rule, not the text.)
    for side in sides:
        table = side("list").stdout.splitlines()
        cells = [line.split() for line in table]
        widths = [max(12, max(len(row[i]) for row in cells) + 3) for i in range(5)]
        starts = [sum(widths[:i]) for i in range(6)]
        for line, row in zip(table, cells, strict=True):
            assert [line.index(cell, start) for cell, start in zip(row, starts, strict=True)] == starts, side.name


def test_unreadable_root_for_another_user(sides: tuple[Side, Side], bundle: Bundle) -> None:
    runc, clave = sides
    for side in sides:
        side.create(bundle, "p")
        side.root.chmod(0o700)
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    for args in (("list",), ("list", "--format", "json"), ("state", "@p"), ("start", "@p"), ("kill", "@p"),
                 ("delete", "@p"), ("pause", "@p"), ("events", "--stats", "@p"), ("exec", "@p", "true"),
                 ("create", "--bundle", str(bundle.path), "@q")):
        codes = []
        for side in sides:
            argv = [a if not a.startswith("@") else side.id(a[1:]) for a in args]
            done = subprocess.run([*nobody, side.argv0, "--root", str(side.root), *argv], capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL, timeout=30)
            codes.append(done.returncode)
            if side is clave:
                assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
                if args[0] != "create":  # runc's create fails earlier, on rootless set-up
                    assert "ermission denied" in done.stderr, done.stderr
        assert codes[0] == codes[1], (args, codes)
    for side in sides:
        side.root.chmod(0o711)


def test_help_tables_line_up() -> None:
    out = subprocess.run([CLAVE, "--help"], capture_output=True, text=True, check=True).stdout
    for section in ("commands:", "global options:"):
        block = out.split(section + "\n", 1)[1].split("\n\n", 1)[0].splitlines()
        starts = {len(line) - len(line.lstrip()) for line in block}
        assert starts == {2}, block
        # the second column starts at the same offset on every row
        columns = {len(line) - len(line[2:].split("  ", 1)[1].lstrip()) for line in block}
        assert len(columns) == 1, block
    from clave.cli.main import VERBS

    listed = [line.split()[0] for line in out.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()]
    assert listed == list(VERBS)
    for verb in VERBS:
        text = subprocess.run([CLAVE, verb, "--help"], capture_output=True, text=True, check=True).stdout
        usage = [line for line in text.splitlines() if line.startswith(("usage:", "       clave", " " * 6))]
        assert usage and usage[0].startswith(f"usage: clave {verb}"), (verb, text)
