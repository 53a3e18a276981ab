"""config.md process: args, env, cwd, user (uid, gid, additionalGids, umask), rlimits, capabilities."""

from __future__ import annotations

from .conftest import Bundle, Clave


def status_fields(text: str, *names: str) -> list[str]:
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return [" ".join(fields[name].split()) for name in names]


def test_user_ids_groups_and_umask(clave: Clave, bundle: Bundle) -> None:
    bundle.process["user"] = {"uid": 1000, "gid": 1001, "additionalGids": [10, 20], "umask": 0o027}
    bundle.sh("cat /proc/self/status; umask; cd /tmp && mkdir d && stat -c %a d && rm -r d")
    out = clave.output()
    uid, gid, groups = status_fields(out, "Uid", "Gid", "Groups")
    assert uid == "1000 1000 1000 1000"
    assert gid == "1001 1001 1001 1001"
    assert groups == "10 20"
    assert out.splitlines()[-2:] == ["0027", "750"]


def test_non_root_user_cannot_write_root_files(clave: Clave, bundle: Bundle) -> None:
    bundle.process["user"] = {"uid": 65534, "gid": 65534}
    bundle.sh("(echo x > /out/denied) 2>&1; id -u")
    out = clave.output().splitlines()
    assert "Permission denied" in out[0] and out[1] == "65534"
    assert not (bundle.out / "denied").exists()


def test_args_env_and_path_lookup(clave: Clave, bundle: Bundle) -> None:
    bundle.process["env"] = ["PATH=/usr/bin:/bin", "GREETING=hello world", "EMPTY="]
    bundle.args("printf", "[%s]\\n", "a b", "$GREETING", "*", "")
    assert clave.output() == "[a b]\n[$GREETING]\n[*]\n[]\n"
    bundle.args("sh", "-c", 'echo "$GREETING|${EMPTY-unset}|$PATH"; env | grep -c =')
    lines = clave.output().splitlines()
    assert lines[0] == "hello world||/usr/bin:/bin"


def test_cwd_created_and_entered(clave: Clave, bundle: Bundle) -> None:
    bundle.private_rootfs()
    bundle.process["cwd"] = "/srv/app/work"
    bundle.args("pwd")
    assert clave.output() == "/srv/app/work\n"


def test_rlimits(clave: Clave, bundle: Bundle) -> None:
    bundle.process["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 256, "hard": 512},
                                 {"type": "RLIMIT_NPROC", "soft": 100, "hard": 100}]
    bundle.sh("ulimit -n; ulimit -Hn; ulimit -u")
    assert clave.output().split() == ["256", "512", "100"]


def test_default_capabilities_and_no_new_privs(clave: Clave, bundle: Bundle) -> None:
    bundle.args("cat", "/proc/self/status")
    eff, bnd, nnp = status_fields(clave.output(), "CapEff", "CapBnd", "NoNewPrivs")
    expected = (1 << 29) | (1 << 5) | (1 << 10)  # CAP_AUDIT_WRITE, CAP_KILL, CAP_NET_BIND_SERVICE
    assert int(eff, 16) == expected and int(bnd, 16) == expected
    assert nnp == "1"


def test_oom_score_adj(clave: Clave, bundle: Bundle) -> None:
    bundle.process["oomScoreAdj"] = 321
    bundle.args("cat", "/proc/self/oom_score_adj")
    assert clave.output() == "321\n"


def test_signal_dispositions_reset(clave: Clave, bundle: Bundle) -> None:
    """The runtime is Python, which ignores SIGPIPE and SIGXFSZ: the container process must not inherit that."""
    bundle.args("cat", "/proc/self/status")
    ignored, blocked = status_fields(clave.output(), "SigIgn", "SigBlk")
    sigpipe, sigxfsz = 1 << (13 - 1), 1 << (25 - 1)
    # What the caller itself ignores is inherited across exec (as with runc); Python's own ignores must not be.
    assert int(ignored, 16) & (sigpipe | sigxfsz) == 0
    assert int(blocked, 16) == 0
