#!/usr/bin/env python3
"""Builds the djinn QEMU test image from Debian packages, offline but for apt.

The result is a qcow2 disk that boots on its own, as real Djinn images do: an
MBR (syslinux's mbr.bin) with one bootable FAT partition holding syslinux, the
kernel of `linux-image-amd64` and an initramfs that IS the whole system
(static busybox, OpenSSH's sshd with the shared libraries it needs, the virtio
modules). The root filesystem lives in RAM, so every boot starts clean.

Usage: build.py DISKS_DIR
  writes DISKS_DIR/_base/qemu/x86_64/djinn-test (the image),
         DISKS_DIR/djinn-test-key (+ .pub) (root's SSH key; kept across rebuilds),
         DISKS_DIR/_build/ (downloaded .deb files, host keys, the up-to-date stamp).

Only the standard library and Debian tools (apt-get, dpkg-deb, mtools, syslinux,
sfdisk, qemu-img) are used, so it runs with the system python before any venv.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOTFS = HERE / "rootfs"
IMAGE_NAME = "djinn-test"
# Modules the guest needs; their dependencies are added from each module's .modinfo.
WANTED_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "virtio-rng")
# Binaries taken from packages, with the path they have in the guest.
SSHD = "usr/sbin/sshd"
DISK_MIB = 64
PART_START = 2048  # sectors: the partition starts at 1 MiB
KERNEL_CMDLINE = "console=ttyS0 panic=10"
# Files in rootfs/ that need a mode other than 0644 (directories are 0755). root's empty
# password is in etc/shadow: busybox rejects an empty password field in etc/passwd.
MODES = {"init": 0o755, "etc/shadow": 0o600, "etc/ssh/sshd_config": 0o644}
LIB_DIR = "lib/x86_64-linux-gnu"


def log(message: str) -> None:
    print(f"qemu-test-image: {message}", flush=True)


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, **kwargs)


def output(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


# --- packages ---------------------------------------------------------------


def apt_depends(packages: list[str]) -> dict[str, list[str]]:
    """Direct Depends/Pre-Depends of each package (first choice of each alternative).

    One apt-cache call for many packages: each call costs about a second.
    """
    text = output(
        "apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
        "--no-breaks", "--no-replaces", "--no-enhances", *packages,
    )
    result: dict[str, list[str]] = {}
    names: list[str] = []
    previous_was_alternative = False
    for line in text.splitlines():
        if line and not line[0].isspace():
            names = result.setdefault(line.strip(), [])
            previous_was_alternative = False
            continue
        match = re.match(r"\s*(\|?)(?:Pre)?Depends: (\S+)", line)
        if not match:
            continue
        skip = previous_was_alternative
        previous_was_alternative = bool(match.group(1))
        if not skip and not match.group(2).startswith("<"):
            names.append(match.group(2))
    return result


def library_closure(roots: list[str]) -> list[str]:
    """The roots plus every library package they need, recursively (no perl, no tools)."""
    seen: set[str] = set()
    todo = set(roots)
    while todo:
        seen |= todo
        found = apt_depends(sorted(todo))
        todo = {
            dep
            for deps in found.values()
            for dep in deps
            if re.match(r"(lib|zlib1g)", dep) and not dep.endswith("-perl") and not dep.startswith("libperl")
        } - seen
    return sorted(seen)


def kernel_package() -> str:
    """The versioned kernel package linux-image-amd64 points at, e.g. linux-image-6.1.0-56-amd64."""
    for dep in apt_depends(["linux-image-amd64"]).get("linux-image-amd64", []):
        if dep.startswith("linux-image-"):
            return dep
    raise SystemExit("qemu-test-image: linux-image-amd64 depends on no linux-image-* package")


def ensure_apt_lists() -> None:
    """apt-cache knows nothing on a fresh machine until apt-get update ran once."""
    policy = output("apt-cache", "policy", "linux-image-amd64")
    if not policy.strip() or "Candidate: (none)" in policy:
        log("refreshing the package lists (apt-get update)")
        run("apt-get", "update", "-qq")


def download(packages: list[str], debs: Path) -> dict[str, Path]:
    """A .deb for every package, downloading only those not in the cache yet."""
    debs.mkdir(parents=True, exist_ok=True)

    def cached(package: str) -> Path | None:
        found = sorted(debs.glob(f"{package}_*.deb"))
        return found[-1] if found else None

    missing = [p for p in packages if cached(p) is None]
    if missing:
        log(f"downloading {len(missing)} packages: {' '.join(missing)}")
        # -o APT::Sandbox::User=root: the cache dir need not be readable by _apt.
        run("apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", *missing, cwd=debs)
    result = {}
    for package in packages:
        path = cached(package)
        if path is None:
            raise SystemExit(f"qemu-test-image: apt-get download gave no .deb for {package}")
        result[package] = path
    return result


def extract(deb: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    run("dpkg-deb", "-x", str(deb), str(into))


# --- kernel and modules -----------------------------------------------------


def modinfo_depends(data: bytes) -> list[str]:
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    if not match or not match.group(1):
        return []
    return match.group(1).decode().split(",")


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def decompress_module(path: str, data: bytes) -> bytes:
    """busybox insmod loads plain ELF only: undo the compression newer Debian kernels use."""
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    return data


def kernel_files(deb: Path, cache: Path) -> tuple[Path, list[Path]]:
    """vmlinuz and the wanted modules (dependencies first), cached per kernel package.

    One streaming pass over the package: a module's dependencies are only known by
    reading it, so every module's bytes are held until the closure is known.
    """
    done = cache / "done"
    if done.exists():
        order = done.read_text().split()
        return cache / "vmlinuz", [cache / "modules" / f"{name}.ko" for name in order]
    log(f"extracting the kernel and modules from {deb.name}")
    if cache.exists():
        shutil.rmtree(cache)
    (cache / "modules").mkdir(parents=True)
    modules: dict[str, tuple[str, bytes]] = {}
    vmlinuz = None
    tar_stream = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    with tarfile.open(fileobj=tar_stream.stdout, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            if re.search(r"/boot/vmlinuz-", name):
                vmlinuz = tar.extractfile(member).read()
            elif re.search(r"\.ko(\.xz|\.zst|\.gz)?$", name):
                modules[module_name(name)] = (name, tar.extractfile(member).read())
    if tar_stream.wait() != 0 or vmlinuz is None:
        raise SystemExit(f"qemu-test-image: no kernel found in {deb}")

    # Kernel module names treat '-' and '_' alike.
    def key(name: str) -> str:
        return name.replace("-", "_")

    by_key = {key(n): n for n in modules}
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        real = by_key.get(key(name))
        if real is None:
            raise SystemExit(f"qemu-test-image: module {name} (needed by {' > '.join(chain) or 'the image'}) not found")
        if real in order:
            return
        path, data = modules[real]
        data = decompress_module(path, data)
        modules[real] = (path, data)
        for dep in modinfo_depends(data):
            visit(dep, chain + (real,))
        order.append(real)

    for wanted in WANTED_MODULES:
        visit(wanted, ())
    for name in order:
        (cache / "modules" / f"{name}.ko").write_bytes(modules[name][1])
    (cache / "vmlinuz").write_bytes(vmlinuz)
    done.write_text("\n".join(order) + "\n")
    return cache / "vmlinuz", [cache / "modules" / f"{name}.ko" for name in order]


# --- shared libraries -------------------------------------------------------


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF file (what ldd would resolve)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SystemExit(f"qemu-test-image: {path} is not a 64-bit little-endian ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads = []
    dynamic = None
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize
        )
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []  # static

    def offset(vaddr: int) -> int:
        for start, off, size in loads:
            if start <= vaddr < start + size:
                return off + vaddr - start
        raise SystemExit(f"qemu-test-image: {path}: address {vaddr:#x} outside its segments")

    entries = []
    strtab = None
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == 0:
            break
        if tag == 1:
            entries.append(value)
        elif tag == 5:
            strtab = offset(value)
    if strtab is None:
        return []
    return [data[strtab + v : data.index(b"\0", strtab + v)].decode() for v in entries]


def inside(root: Path, path: str) -> Path:
    """`path` (absolute or relative to root) inside the extracted tree, symlinks followed inside it."""
    current = root / path.lstrip("/")
    for _ in range(40):
        if not current.is_symlink():
            return current
        target = os.readlink(current)
        current = root / target.lstrip("/") if target.startswith("/") else current.parent / target
    raise SystemExit(f"qemu-test-image: symlink loop at {path}")


def resolve_libraries(tree: Path, binaries: list[str], extra: tuple[str, ...] = ()) -> dict[str, Path]:
    """soname -> file in `tree` for every library the binaries (and `extra` sonames) need, recursively."""
    dirs = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
    found: dict[str, Path] = {}
    todo: list[Path | None] = [inside(tree, b) for b in binaries] + [None]
    while todo:
        item = todo.pop()
        for soname in elf_needed(item) if item is not None else extra:
            if soname in found:
                continue
            for d in dirs:
                candidate = inside(tree, f"{d}/{soname}")
                if candidate.is_file():
                    found[soname] = candidate
                    todo.append(candidate)
                    break
            else:
                raise SystemExit(f"qemu-test-image: library {soname} not found in the downloaded packages")
    return found


# --- initramfs --------------------------------------------------------------


class Cpio:
    """A newc cpio archive written in memory: owners are root whoever builds it."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        header = "070701" + "".join(
            f"{v:08x}"
            for v in (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        )
        self.out.write(header.encode() + name.encode() + b"\0")
        self._pad()
        self.out.write(data)
        self._pad()

    def _pad(self) -> None:
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path not in self.seen:
                self.seen.add(path)
                self._entry(path, stat.S_IFDIR | (mode if i == len(parts) else 0o755))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self.seen.add(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if name in self.seen:
            return
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self.seen.add(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.seen.add(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.out.write(b"\0" * (-self.out.tell() % 512))
        return self.out.getvalue()


def build_initramfs(tree: Path, modules: list[Path], host_keys: Path, authorized_key: bytes) -> bytes:
    cpio = Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "etc/ssh", "lib64", LIB_DIR, "var/log"):
        cpio.dir(d)
    cpio.dir("tmp", 0o1777)
    cpio.dir("root", 0o700)
    cpio.dir("root/.ssh", 0o700)
    # The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    cpio.chardev("dev/console", 5, 1)

    busybox = inside(tree, "bin/busybox")
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in output(str(busybox), "--list-full").split():
        if applet != "bin/busybox" and applet != "linuxrc":
            cpio.symlink(applet, "/bin/busybox")

    cpio.file(SSHD, inside(tree, SSHD).read_bytes(), 0o755)
    for soname, path in sorted(resolve_libraries(tree, [SSHD]).items()):
        cpio.file(f"{LIB_DIR}/{soname}", path.read_bytes(), 0o755)
    cpio.symlink("lib64/ld-linux-x86-64.so.2", f"/{LIB_DIR}/ld-linux-x86-64.so.2")

    for path in sorted(ROOTFS.rglob("*")):
        rel = path.relative_to(ROOTFS).as_posix()
        if path.is_dir():
            cpio.dir(rel)
        else:
            cpio.file(rel, path.read_bytes(), MODES.get(rel, 0o644))
    for key in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"):
        cpio.file(f"etc/ssh/{key}", (host_keys / key).read_bytes(), 0o600 if not key.endswith(".pub") else 0o644)
    cpio.file("root/.ssh/authorized_keys", authorized_key, 0o600)

    for module in modules:
        cpio.file(f"lib/modules/{module.name}", module.read_bytes())
    cpio.file("lib/modules/load-order", "".join(f"{m.name}\n" for m in modules).encode())
    return cpio.finish()


# --- keys -------------------------------------------------------------------


def ssh_keygen(tree: Path, *args: str) -> None:
    """Debian's ssh-keygen from the downloaded packages, run with their own loader and libraries."""
    libs = resolve_libraries(tree, ["usr/bin/ssh-keygen"])
    loader = libs.get("ld-linux-x86-64.so.2") or inside(tree, "lib64/ld-linux-x86-64.so.2")
    lib_dirs = sorted({str(p.parent) for p in libs.values()})
    run(str(loader), "--library-path", ":".join(lib_dirs), str(inside(tree, "usr/bin/ssh-keygen")), *args,
        stdout=subprocess.DEVNULL)


def ensure_key(tree: Path, path: Path, comment: str) -> None:
    if path.exists() and path.with_name(path.name + ".pub").exists():
        return
    path.unlink(missing_ok=True)
    ssh_keygen(tree, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    path.chmod(0o600)


# --- disk -------------------------------------------------------------------


def build_disk(raw: Path, vmlinuz: Path, initrd: Path) -> None:
    """An MBR disk with one bootable FAT partition holding syslinux, the kernel and initrd."""
    with open(raw, "wb") as f:
        f.truncate(DISK_MIB << 20)
    run("sfdisk", "--quiet", str(raw), input=f"label: dos\nstart={PART_START}, type=c, bootable\n".encode())
    part_sectors = (DISK_MIB << 20) // 512 - PART_START
    run("mkfs.fat", "-F", "16", "-n", "DJINNBOOT", "--offset", str(PART_START), str(raw), str(part_sectors // 2),
        stdout=subprocess.DEVNULL)
    image = f"{raw}@@{PART_START * 512}"
    config = (
        "DEFAULT djinn\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL djinn\n"
        "  KERNEL /vmlinuz\n"
        f"  APPEND initrd=/initrd.img {KERNEL_CMDLINE}\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "syslinux.cfg"
        cfg.write_text(config)
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        run("mcopy", "-i", image, str(vmlinuz), "::/vmlinuz", env=env)
        run("mcopy", "-i", image, str(initrd), "::/initrd.img", env=env)
        run("mcopy", "-i", image, str(cfg), "::/syslinux.cfg", env=env)
    run("syslinux", "--install", "--offset", str(PART_START * 512), str(raw))
    mbr = Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()
    with open(raw, "r+b") as f:
        f.write(mbr[:440])  # boot code only: the partition table stays


# --- main -------------------------------------------------------------------


def source_digest() -> str:
    """What the image is made from: this script and the rootfs files (the stamp)."""
    digest = hashlib.sha256()
    for path in sorted([Path(__file__).resolve(), *ROOTFS.rglob("*")]):
        if path.is_file():
            digest.update(path.relative_to(HERE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    disks = Path(argv[1]).resolve()
    image = disks / "_base" / "qemu" / "x86_64" / IMAGE_NAME
    key = disks / f"{IMAGE_NAME}-key"
    work = disks / "_build"
    stamp = work / f"{IMAGE_NAME}.stamp"
    digest = source_digest()
    if image.exists() and key.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        log(f"up to date: {image}")
        print(f"key: {key}")
        return 0

    started = time.monotonic()
    ensure_apt_lists()
    kernel = kernel_package()
    packages = library_closure(["openssh-server", "openssh-client"]) + ["busybox-static", kernel]
    debs = download(packages, work / "debs")

    tree = work / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    for package in packages:
        if package != kernel:
            extract(debs[package], tree)
    vmlinuz, modules = kernel_files(debs[kernel], work / "kernel" / debs[kernel].stem)

    host_keys = work / "host-keys"
    host_keys.mkdir(parents=True, exist_ok=True)
    ensure_key(tree, host_keys / "ssh_host_ed25519_key", "root@djinn-test")
    ensure_key(tree, key, "djinn-test-image")

    initramfs = build_initramfs(tree, modules, host_keys, key.with_name(key.name + ".pub").read_bytes())
    initrd = work / "initrd.img"
    initrd.write_bytes(gzip.compress(initramfs, compresslevel=6, mtime=0))

    raw = work / f"{IMAGE_NAME}.raw"
    build_disk(raw, vmlinuz, initrd)
    image.parent.mkdir(parents=True, exist_ok=True)
    partial = image.with_name(image.name + ".partial")
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(partial))
    os.replace(partial, image)
    raw.unlink()
    shutil.rmtree(tree)
    stamp.write_text(digest + "\n")
    log(f"built {image} ({image.stat().st_size >> 10} KiB, initrd {initrd.stat().st_size >> 10} KiB) "
        f"in {time.monotonic() - started:.1f}s")
    print(f"key: {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
