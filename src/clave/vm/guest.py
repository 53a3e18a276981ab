"""The guest: Debian's cloud kernel, a small initramfs and a read-only ext4 image carrying the agent.

Layout (chosen by measurement, see DESIGN.md "VM templates and guests under TCG"): Python must start fast in
the guest, and a virtio-blk ext4 root beats virtio-fs by ~5x. Measured here (TCG, -m 256, 4 boots each):
the agent was ready 2.63 s after QEMU started with this layout and 2.75 s with everything in one 39 MiB
initramfs (the kernel unpacks all of it into guest RAM, and Python started no faster: 0.69 s both). An ext4
root is also what ``pivot_root`` inside the guest needs (the initramfs rootfs cannot be pivoted away from) and
what a VM template can share. So:

- ``vmlinux``: the bzImage's LZ4 payload, booted by QEMU's PVH entry;
- ``initramfs.cpio``: busybox, the virtio/virtiofs/net modules and a stage-1 ``/init`` that loads them, finds
  the guest image by its virtio-blk serial (``clave-guest``), mounts it read-only and switches root to it;
- ``guest.img``: ext4 with busybox, Debian's minimal Python 3.11 runtime (bytecode precompiled) and Clave's
  package, whose stage-2 ``/sbin/clave-init`` mounts /run, /tmp, cgroup2 and starts the agent as its child.

Everything is built from ``apt-get download``-ed packages, keyed by the digests of every input (each .deb's
SHA256, Clave's sources, RECIPE_VERSION) and cached in /var/lib/clave/vm/guest/KEY. The outputs are
reproducible: sorted cpio entries with fixed metadata, and ``mkfs.ext4 -d`` with a fixed UUID, hash seed and
time. ``manifest.json`` records the digests that a measured boot pins.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

from clave.vm import measure, paths
from clave.vm.cpio import CpioWriter
from clave.vm.errors import BuildError
from clave.vm.kernel import extract_vmlinux, module_load_order

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

RECIPE_VERSION = "3"  # 2: cryptography + cbor2 for the TPM quote, /etc/machine-id -> /run/machine-id; 3: bzImage
KERNEL_META = "linux-image-cloud-amd64"
USERLAND = (
    "busybox-static", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "libffi8", "zlib1g", "libexpat1",
    # the TPM quote (clave.attestation's TPM attester and evidence format), imported only when quoting
    "python3-cryptography", "python3-cffi-backend", "python3-cbor2", "libssl3", "libgcc-s1",
)
DIST_PACKAGES = "/usr/lib/python3/dist-packages"  # Debian's python3-* modules (the agent runs with -S)
MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "virtiofs", "virtio_rng")
GUEST_SERIAL = "clave-guest"  # the virtio-blk serial the stage-1 init looks for
EPOCH = 1700000000  # every timestamp in the outputs (mtime, mkfs time)
AGENT_DIR = "usr/lib/clave"  # Clave's package in the image: /usr/lib/clave/clave/...
MARK_INIT = "clave-guest: init"  # the first userspace line (kernel up)
MARK_AGENT = "clave-guest: agent"  # stage 2 is starting the agent
MARK_FAIL = "clave-guest: error:"

# Parts of the Python runtime the agent never imports (and the static library, ~60% of the stdlib's size).
PYTHON_PRUNE = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "distutils",
                "config-3.11-x86_64-linux-gnu", "venv", "unittest/test", "sqlite3/test", "ctypes/test")

STAGE1_INIT = f"""#!/bin/busybox sh
# Stage 1 (initramfs): load the modules, find the guest image by its virtio-blk serial, switch root to it.
B=/bin/busybox
$B mount -t devtmpfs dev /dev
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
echo "{MARK_INIT} (uptime $($B cut -d' ' -f1 /proc/uptime))" >/dev/console
fail() {{ echo "{MARK_FAIL} $*" >/dev/console; $B reboot -f; }}
for m in $($B cat /modules/order); do $B insmod /modules/$m.ko || fail "insmod $m"; done
serial={GUEST_SERIAL}
for arg in $($B cat /proc/cmdline); do
  case "$arg" in clave.serial=*) serial="${{arg#clave.serial=}}";; clave.fail=*) fail "${{arg#clave.fail=}}";; esac
done
dev=
for i in $($B seq 1 300); do
  for s in /sys/block/vd*/serial; do
    [ -e "$s" ] && [ "$($B cat $s)" = "$serial" ] && dev=/dev/${{s#/sys/block/}} && dev=${{dev%/serial}}
  done
  [ -n "$dev" ] && break
  $B usleep 10000
done
[ -n "$dev" ] || fail "no virtio-blk disk with serial $serial"
$B mount -t ext4 -o ro,noatime "$dev" /newroot || fail "cannot mount the guest image $dev"
[ -x /newroot/sbin/clave-init ] || fail "the guest image has no /sbin/clave-init"
echo "clave-guest: modules loaded, image $dev mounted (uptime $($B cut -d' ' -f1 /proc/uptime))" >/dev/console
for d in dev proc sys; do $B mount --move /$d /newroot/$d; done
exec $B switch_root /newroot /sbin/clave-init
"""

STAGE2_INIT = f"""#!/bin/sh
# Stage 2 (guest image, pid 1): writable /run, /tmp and /var, cgroup2, then the agent as this shell's child.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /var
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ln -sf /proc/self/fd /dev/fd
hostname clave
ip link set lo up
echo "{MARK_AGENT} (uptime $(cut -d' ' -f1 /proc/uptime))" >/dev/console
cd /{AGENT_DIR}
/usr/bin/python3.11 -S -E -m clave.vm.agent </dev/null >/dev/console 2>&1
echo "{MARK_FAIL} agent exited with status $?" >/dev/console
reboot -f
"""


class Guest:
    """A built guest: its files and manifest."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        try:
            with open(os.path.join(directory, "manifest.json")) as f:
                self.manifest: dict[str, Any] = json.load(f)
        except (OSError, ValueError) as exc:
            raise BuildError(f"no built guest in {directory}: run 'clave vm build-guest'") from exc

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, self.manifest["outputs"][key]["file"])

    @property
    def kernel(self) -> str:
        return self._path("kernel")

    @property
    def bzimage(self) -> str:
        """The same kernel as its EFI-stub bzImage, for a boot through firmware (OVMF)."""
        return self._path("bzimage")

    @property
    def initramfs(self) -> str:
        return self._path("initramfs")

    @property
    def image(self) -> str:
        return self._path("image")

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    @property
    def kernel_release(self) -> str:
        return str(self.manifest["kernel_release"])

    def digests(self) -> dict[str, str]:
        """sha256 of kernel, initramfs, image and agent: what measured boot pins."""
        out = {k: v["sha256"] for k, v in self.manifest["outputs"].items()}
        out["agent"] = self.manifest["agent"]["sha256"]
        return out


def current_guest() -> Guest:
    """The guest the last ``clave vm build-guest`` made (or found cached)."""
    return Guest(os.path.join(paths.GUEST_CACHE, "current"))


# --- inputs ----------------------------------------------------------------------------------------------------


class Package:
    def __init__(self, name: str, version: str, arch: str, sha256: str) -> None:
        self.name = name
        self.version = version
        self.arch = arch
        self.sha256 = sha256

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _apt_show(name: str) -> Package:
    done = subprocess.run(["apt-cache", "show", "--no-all-versions", name], capture_output=True, text=True)
    fields: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep and not line.startswith(" "):
            fields.setdefault(key, value.strip())
    if done.returncode != 0 or "Version" not in fields or "SHA256" not in fields:
        raise BuildError(f"package {name}: not known to apt (run apt-get update): {done.stderr.strip()}")
    return Package(fields["Package"], fields["Version"], fields["Architecture"], fields["SHA256"])


def _kernel_package() -> Package:
    """The versioned package behind the cloud kernel metapackage (linux-image-6.1.0-N-cloud-amd64)."""
    done = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        dep = line.strip().removeprefix("Depends: ")
        if dep.startswith("linux-image-") and dep != KERNEL_META:
            return _apt_show(dep)
    raise BuildError(f"{KERNEL_META}: no versioned kernel package found (run apt-get update)")


def agent_sources() -> list[tuple[str, str]]:
    """``(path inside the package dir, absolute path)`` of every Clave source file the guest carries."""
    import clave

    return measure.package_files(os.path.dirname(os.path.abspath(clave.__file__)))


# Pure-Python packages from PyPI that the agent needs and Debian does not ship (the KBS client's JWE), copied
# from this interpreter's site-packages beside Clave's package: part of the build key, not of the agent digest.
GUEST_LIBRARIES = ("joserfc",)


def library_sources() -> list[tuple[str, str]]:
    """``(path inside the package dir, absolute path)`` of the GUEST_LIBRARIES' files."""
    import importlib.util

    out = []
    for name in GUEST_LIBRARIES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise BuildError(f"Python package {name} is not installed here: the guest carries a copy (pip install)")
        root = os.path.dirname(spec.origin)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for fname in sorted(filenames):
                if fname.endswith((".py", ".typed")):
                    full = os.path.join(dirpath, fname)
                    out.append((os.path.join(name, os.path.relpath(full, root)), full))
    return out


def agent_digest(sources: list[tuple[str, str]]) -> str:
    """The same digest the guest agent computes over the package it runs from (clave.vm.measure)."""
    return measure.agent_digest_of([(rel, _file_sha256(full)) for rel, full in sources])


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- the build -------------------------------------------------------------------------------------------------


def build_guest(out: str | None = None, force: bool = False, progress: Callable[[str], None] | None = None) -> Guest:
    """Build the guest (or find it already built) and return it. ``out`` defaults to the cache directory
    /var/lib/clave/vm/guest/KEY, which then becomes ``current``."""
    say = progress or (lambda _msg: None)
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "lz4", "mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found: install Debian's {_TOOL_PACKAGES.get(tool, tool)}")
    say("resolving packages")
    packages = [_kernel_package()] + [_apt_show(name) for name in USERLAND]
    sources = agent_sources()
    agent = agent_digest(sources)
    libraries = library_sources()
    key_text = json.dumps({"recipe": RECIPE_VERSION, "packages": {p.name: p.sha256 for p in packages},
                           "agent": agent, "libraries": {rel: _file_sha256(full) for rel, full in libraries}},
                          sort_keys=True)
    sources = sources + libraries  # both go to the image's /usr/lib/clave
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    default_out = out is None
    target = os.path.abspath(out) if out else os.path.join(paths.GUEST_CACHE, key)
    if not force:
        try:
            guest = Guest(target)
            if guest.key == key and all(os.path.exists(guest._path(k)) for k in ("kernel", "initramfs", "image")):
                say(f"up to date: {target}")
                if default_out:
                    _point_current(target)
                return guest
        except BuildError:
            pass
    if os.path.lexists(target) and not _replaceable(target):
        raise BuildError(f"{target} exists and is not a guest build: refusing to replace it")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    os.makedirs(paths.VM_ROOT, exist_ok=True)
    lock = os.open(os.path.join(paths.VM_ROOT, "build.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent builds: one builds, the next finds it built
        if not force:
            try:
                guest = Guest(target)
                if guest.key == key:
                    say(f"up to date: {target}")
                    if default_out:
                        _point_current(target)
                    return guest
            except BuildError:
                pass
        return _build_locked(target, key, packages, sources, agent, default_out, say)
    finally:
        os.close(lock)


def _replaceable(target: str) -> bool:
    """An earlier guest build (its manifest is there) or an empty directory: never anything else."""
    if os.path.islink(target) or not os.path.isdir(target):
        return False
    return os.path.exists(os.path.join(target, "manifest.json")) or not os.listdir(target)


def _build_locked(target: str, key: str, packages: list[Package], sources: list[tuple[str, str]], agent: str,
                  default_out: bool, say: Callable[[str], None]) -> Guest:
    debs = _download(packages, say)
    work = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(target))
    try:
        manifest = _build(work, key, packages, debs, sources, agent, say)
        result = os.path.join(work, "out")
        with open(os.path.join(result, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.lexists(target):
            shutil.rmtree(target)
        os.rename(result, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if default_out:
        _point_current(target)
        _prune(target, say)
    say(f"built: {target}")
    return Guest(target)


_TOOL_PACKAGES = {"lz4": "lz4", "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs", "dpkg-deb": "dpkg",
                  "apt-get": "apt", "apt-cache": "apt"}


def _point_current(target: str) -> None:
    link = os.path.join(paths.GUEST_CACHE, "current")
    tmp = link + ".new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.relpath(target, paths.GUEST_CACHE) if target.startswith(paths.GUEST_CACHE) else target, tmp)
    os.replace(tmp, link)


def _prune(keep: str, say: Callable[[str], None]) -> None:
    """Remove the cache's other builds (superseded inputs: ~100 MiB each). A VM still running one keeps its
    files open; new VMs take ``current``."""
    for name in os.listdir(paths.GUEST_CACHE):
        path = os.path.join(paths.GUEST_CACHE, name)
        if path != keep and os.path.isdir(path) and not os.path.islink(path) and _replaceable(path):
            shutil.rmtree(path, ignore_errors=True)
            say(f"removed the superseded build {name}")


def _download(packages: list[Package], say: Callable[[str], None]) -> dict[str, str]:
    """Each package's .deb in the cache, fetched with ``apt-get download`` when missing, checked by SHA256."""
    os.makedirs(paths.DEB_CACHE, exist_ok=True)
    files = {}
    for pkg in packages:
        path = os.path.join(paths.DEB_CACHE, pkg.filename)
        if not (os.path.exists(path) and _file_sha256(path) == pkg.sha256):
            say(f"downloading {pkg.name} {pkg.version}")
            done = subprocess.run(["apt-get", "download", "-q", f"{pkg.name}={pkg.version}"], cwd=paths.DEB_CACHE,
                                  capture_output=True, text=True)
            if done.returncode != 0 or not os.path.exists(path):
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise BuildError(f"apt-get download {pkg.name}: {tail}")
            if _file_sha256(path) != pkg.sha256:
                os.unlink(path)
                raise BuildError(f"{pkg.filename}: SHA256 does not match the archive's index")
        files[pkg.name] = path
    return files


def _extract(deb: str, dest: str) -> None:
    done = subprocess.run(["dpkg-deb", "-x", deb, dest], capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"dpkg-deb -x {os.path.basename(deb)}: {done.stderr.strip()}")


def _build(work: str, key: str, packages: list[Package], debs: dict[str, str], sources: list[tuple[str, str]],
           agent: str, say: Callable[[str], None]) -> dict[str, Any]:
    out = os.path.join(work, "out")
    os.makedirs(out)
    kernel_pkg = packages[0]
    say(f"extracting {kernel_pkg.name}")
    kroot = os.path.join(work, "kernel")
    _extract(debs[kernel_pkg.name], kroot)
    releases = os.listdir(os.path.join(kroot, "lib/modules"))
    if len(releases) != 1:
        raise BuildError(f"{kernel_pkg.name}: expected one kernel release, found {releases}")
    release = releases[0]
    with open(os.path.join(kroot, "boot", f"vmlinuz-{release}"), "rb") as f:
        bzimage = f.read()
    with open(os.path.join(out, "bzImage"), "wb") as f:  # the EFI-stub kernel, for a firmware boot (a vTPM)
        f.write(bzimage)
    say("extracting vmlinux (LZ4 payload)")
    with open(os.path.join(out, "vmlinux"), "wb") as f:
        f.write(extract_vmlinux(bzimage))
    del bzimage
    modules = module_load_order(os.path.join(kroot, "lib/modules", release), list(MODULES))

    say("extracting the guest userland: " + ", ".join(USERLAND))
    tree = os.path.join(work, "image")
    for name in USERLAND:
        _extract(debs[name], tree)
    _shape_image(tree, sources)
    say("precompiling Python bytecode")
    _compile_bytecode(tree)
    _normalize(tree)

    say("packing initramfs.cpio")
    busybox = os.path.join(tree, "bin/busybox")
    with open(os.path.join(out, "initramfs.cpio"), "wb") as f:
        writer = CpioWriter(f, EPOCH)
        for d in ("bin", "dev", "modules", "newroot", "proc", "sys"):
            writer.directory(d)
        with open(busybox, "rb") as bf:
            writer.file("bin/busybox", bf.read(), 0o755)
        writer.char_device("dev/console", 5, 1)
        writer.file("init", STAGE1_INIT.encode(), 0o755)
        for name, rel in sorted(modules):
            with open(os.path.join(kroot, "lib/modules", release, rel), "rb") as mf:
                writer.file(f"modules/{name}.ko", mf.read())
        writer.file("modules/order", "".join(f"{name}\n" for name, _ in modules).encode())
        writer.close()

    say("packing guest.img (ext4, read-only)")
    _mkfs(tree, os.path.join(out, "guest.img"), key)
    outputs = {}
    for role, fname in (("kernel", "vmlinux"), ("initramfs", "initramfs.cpio"), ("image", "guest.img"),
                        ("bzimage", "bzImage")):
        p = os.path.join(out, fname)
        outputs[role] = {"file": fname, "sha256": _file_sha256(p), "size": os.path.getsize(p)}
    return {
        "recipe": RECIPE_VERSION,
        "key": key,
        "kernel_release": release,
        "packages": {p.name: {"version": p.version, "sha256": p.sha256} for p in packages},
        "modules": [name for name, _ in modules],
        "agent": {"sha256": agent, "files": len(sources)},
        "image_serial": GUEST_SERIAL,
        "outputs": outputs,
    }


def _shape_image(tree: str, sources: list[tuple[str, str]]) -> None:
    """Drop what the guest never uses; add busybox applets, mount points, init, passwd and Clave."""
    for rel in ("usr/share", "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/x86_64-linux-gnu/audit", "etc/ld.so.conf.d",
                "usr/bin/python3.11-config"):
        p = os.path.join(tree, rel)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)
    pylib = os.path.join(tree, "usr/lib/python3.11")
    for rel in PYTHON_PRUNE:
        shutil.rmtree(os.path.join(pylib, rel), ignore_errors=True)
    keep_bin = {"busybox", "python3.11"}
    for d in ("bin", "sbin", "usr/bin", "usr/sbin"):
        p = os.path.join(tree, d)
        if os.path.isdir(p) and not os.path.islink(p):
            for fname in os.listdir(p):
                if fname not in keep_bin:
                    os.unlink(os.path.join(p, fname))
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "var", "mnt", "root", "etc"):
        os.makedirs(os.path.join(tree, d), exist_ok=True)
    os.chmod(os.path.join(tree, "tmp"), 0o1777)
    busybox = os.path.join(tree, "bin/busybox")
    applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for applet in sorted(applets):
        link = os.path.join(tree, applet)
        if not os.path.lexists(link):
            os.symlink("/bin/busybox", link)
    os.symlink("python3.11", os.path.join(tree, "usr/bin/python3"))
    files = {
        "sbin/clave-init": (STAGE2_INIT, 0o755),
        "etc/passwd": ("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644),
        "etc/group": ("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n", 0o644),
        "etc/hostname": ("clave\n", 0o644),
    }
    # the pod's machine id, written by the agent at CreateSandbox (the image is read-only)
    os.symlink("/run/machine-id", os.path.join(tree, "etc/machine-id"))
    for rel, (text, mode) in files.items():
        p = os.path.join(tree, rel)
        if os.path.lexists(p):
            os.unlink(p)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, mode)
    for rel, full in sources:
        dest = os.path.join(tree, AGENT_DIR, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(full, dest)


def _compile_bytecode(tree: str) -> None:
    """Bytecode for the stdlib and Clave, made by the guest's own interpreter (same magic number) with a fixed
    hash seed (set and frozenset constants are ordered by hash) and unchecked-hash pycs (no mtime in them, and
    no stat of the source on import)."""
    python = os.path.join(tree, "usr/bin/python3.11")
    libs = ":".join(os.path.join(tree, d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"))
    env = {"PYTHONHASHSEED": "0", "PYTHONHOME": os.path.join(tree, "usr"), "PATH": "/usr/bin:/bin",
           "LD_LIBRARY_PATH": libs}
    for sub in ("usr/lib/python3.11", DIST_PACKAGES.lstrip("/"), AGENT_DIR):
        done = subprocess.run(
            # -B: the compiler's own imports must not leave pycs naming the build directory
            [python, "-B", "-I", "-S", "-m", "compileall", "-f", "-q", "-j", "1",
             "--invalidation-mode", "unchecked-hash", "-s", tree, "-p", "/", os.path.join(tree, sub)],
            env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"compileall {sub}: {(done.stdout + done.stderr).strip()[-300:]}")
    # marshal marks an object as shared (FLAG_REF) when its refcount is above one, which depends on what else
    # the compiling process holds: the same source gave different pycs. Re-marshal each file alone in one
    # fresh process, so only the file's own structure decides.
    done = subprocess.run([python, "-B", "-I", "-S", "-c", _REMARSHAL, tree], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"normalizing bytecode: {done.stderr.strip()[-300:]}")


_REMARSHAL = """
import marshal, os, sys
paths = []
for d, dirs, files in os.walk(sys.argv[1]):
    dirs.sort()
    paths += [os.path.join(d, f) for f in sorted(files) if f.endswith(".pyc")]
for p in paths:
    with open(p, "rb") as f:
        data = f.read()
    body = marshal.dumps(marshal.loads(data[16:]))
    with open(p, "wb") as f:
        f.write(data[:16] + body)
    del data, body
"""


def _normalize(tree: str) -> None:
    """Fixed owner and timestamps on every entry, so mkfs copies identical metadata every build."""
    for dirpath, dirnames, filenames in os.walk(tree, topdown=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            os.lchown(p, 0, 0)
            os.utime(p, (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(tree, (EPOCH, EPOCH))


def _mkfs(tree: str, image: str, key: str) -> None:
    used = 0
    count = 0
    names = []
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            count += 1
            names.append(os.path.relpath(os.path.join(dirpath, name), tree))
            st = os.lstat(os.path.join(dirpath, name))
            used += (st.st_size + 4095) // 4096 * 4096 + 4096
    size_mb = used * 5 // 4 // (1 << 20) + 16  # room for metadata; the image is mounted read-only
    uuid = f"{key[:8]}-{key[8:12]}-{key[12:16]}-{key[16:20]}-{key[20:32]}"
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(EPOCH), MKE2FS_DEVICE_SECTSIZE="512")
    cmd = ["mkfs.ext4", "-q", "-F", "-d", tree, "-L", GUEST_SERIAL, "-U", uuid, "-N", str(count + 256), "-m", "0",
           "-O", "^has_journal,^resize_inode", "-E", f"hash_seed={uuid},lazy_itable_init=0,nodiscard,root_owner=0:0",
           "-T", "default", image, f"{size_mb}M"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"mkfs.ext4: {done.stderr.strip()}")
    # mkfs -d copies each source's ctime (which no one can set) and atime (which reading the tree moved):
    # pin both with debugfs, which also recomputes the inode checksums.
    script = [f'sif "/{rel}" {field} @{EPOCH}' for rel in ["", *names] for field in ("ctime", "atime")]
    done = subprocess.run(["debugfs", "-w", "-f", "-", image], input="\n".join(script) + "\n", env=env,
                          capture_output=True, text=True)
    if done.returncode != 0 or "sif:" in done.stderr:
        raise BuildError(f"debugfs: {done.stderr.strip()[-300:]}")


def print_progress(message: str) -> None:
    sys.stderr.write(f">> {message}\n")
    sys.stderr.flush()
