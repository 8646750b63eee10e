"""Fetch Debian kernels for the VM lab: resolve the newest version, download, unpack, cache.

Every kernel series of the test matrix maps to one Debian suite.  The exact package
(``linux-image-6.1.0-50-amd64`` ...) is resolved at run time from that suite's package index,
so Debian point releases never need a code change.  apt runs with a private configuration
(sources list, index and cache directories under the lab cache), so the host's apt state is
never touched; the host's apt.conf (proxies and the like) still applies.

Cache layout (default ``/var/cache/xfrmtrace-lab``, override with ``XFRMTRACE_LAB_CACHE``)::

    apt/<suite>/sources.list, lists/, cache/, updated   private apt state per suite
    kernels/<version>/                                   unpacked packages (boot/, lib/modules/ ...)
    kernels/<version>/kernel.json                        written last: marks a complete unpack

Other environment variables:

- ``XFRMTRACE_LAB_MIRROR``: Debian mirror (default ``http://deb.debian.org/debian``, the host
  used by this machine's own apt sources).
- ``XFRMTRACE_LAB_OFFLINE=1``: never touch the network, use cached kernels only.

CLI: ``python -m vmlab.host.kernels 6.1`` prints the vmlinuz path; ``--all`` fetches the matrix.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

DEFAULT_CACHE = Path("/var/cache/xfrmtrace-lab")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# The host's debian-archive-keyring; bookworm's copy carries the keys that sign bullseye,
# bookworm, trixie and sid Release files, so no "[trusted=yes]" is needed.
ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Refresh a suite's package index at most this often (seconds).
INDEX_TTL = 3600.0
# apt-get update / download are given this long before we consider the network down.
NETWORK_TIMEOUT = 600.0


class KernelFetchError(RuntimeError):
    """A kernel could not be resolved, downloaded or unpacked (and none is cached)."""


@dataclass(frozen=True)
class Series:
    """One row of the kernel matrix: a Debian suite and which image packages belong to it.

    ``pattern`` must fullmatch the image package name and capture the kernel release
    (``uname -r``) as group ``v``.  Flavours such as ``-rt-amd64``, ``-cloud-amd64`` and the
    ``-unsigned`` / ``-dbg`` packages never match.
    """

    name: str
    suite: str
    pattern: str
    arch: str = "amd64"  # Debian architecture

    def match(self, package: str) -> Optional[str]:
        """Return the kernel release if ``package`` is an image package of this series."""
        m = re.fullmatch(self.pattern, package)
        return m.group("v") if m else None


SERIES = {
    s.name: s
    for s in (
        Series("5.10", "bullseye", r"linux-image-(?P<v>5\.10\.0-\d+-amd64)"),
        Series("6.1", "bookworm", r"linux-image-(?P<v>6\.1\.0-\d+-amd64)"),
        Series("6.12", "trixie", r"linux-image-(?P<v>6\.12\.\d+\+deb13-amd64)"),
        # sid moves on: "sid" is whatever is newest there; "7" pins the 7.x line and fails
        # loudly once sid has moved past it.
        Series("sid", "sid", r"linux-image-(?P<v>\d+\.\d+(?:\.\d+)?(?:-\d+)?(?:\+deb\d+)?-amd64)"),
        Series("7", "sid", r"linux-image-(?P<v>7\.\d+(?:\.\d+)?(?:-\d+)?(?:\+deb\d+)?-amd64)"),
        # arm64: booted by vmlab/host/arm64vm.py (`make test-kernels KERNEL=arm64-6.12`), its
        # -dbg vmlinux read offline by the resolver's tests, and the kernel in MATRIX.
        Series("arm64-6.12", "trixie", r"linux-image-(?P<v>6\.12\.\d+\+deb13-arm64)",
               arch="arm64"),
    )
}

#: The kernel matrix: x86-64 oldest first, then arm64.
MATRIX: List[str] = ["5.10", "6.1", "6.12", "sid", "arm64-6.12"]


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel ready to boot.

    ``version`` is the kernel release (``uname -r`` in the guest), ``modules_dir`` the unpacked
    ``.../lib/modules/<version>`` (with ``modules.dep``), ``package_version`` the Debian version
    of the image package (e.g. ``6.1.176-1``).
    """

    series: str
    version: str
    vmlinuz: Path
    modules_dir: Path
    package_version: str = ""


def debian_arch(kernel: Kernel) -> str:
    """The Debian architecture ``kernel`` was built for (its series says; amd64 for a
    kernel of no known series)."""
    series = SERIES.get(kernel.series)
    return series.arch if series else "amd64"


def cache_dir() -> Path:
    """The lab cache directory (outside the repository, shared by all clones and runs)."""
    return Path(os.environ.get("XFRMTRACE_LAB_CACHE", str(DEFAULT_CACHE)))


def _offline() -> bool:
    return os.environ.get("XFRMTRACE_LAB_OFFLINE", "") not in ("", "0")


def _log(msg: str) -> None:
    print(f"vmlab.kernels: {msg}", file=sys.stderr, flush=True)


def _version_key(release: str) -> Tuple[int, ...]:
    """Sort key for kernel releases: their numbers in order (6.1.0-50 > 6.1.0-47 > 6.1.0-9)."""
    return tuple(int(n) for n in re.findall(r"\d+", release))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise fetches that share a cache (parallel test workers, two terminals)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


class _SuiteIndex:
    """A private apt configuration for one Debian suite (sources list, index, apt cache)."""

    def __init__(self, suite: str, root: Path, arch: str = "amd64") -> None:
        self.suite = suite
        self.arch = arch
        self.root = root / "apt" / (suite if arch == "amd64" else f"{suite}-{arch}")
        self.lists = self.root / "lists"
        self.stamp = self.root / "updated"
        self.sources = self.root / "sources.list"

    def _apt_options(self) -> List[str]:
        options = [
            "-o", f"Dir::Etc::SourceList={self.sources}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            # The host's pinning must not change which kernel is the candidate.
            "-o", "Dir::Etc::Preferences=/dev/null",
            "-o", "Dir::Etc::PreferencesParts=/dev/null",
            "-o", f"Dir::State::Lists={self.lists}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            # Another architecture's packages as if native: no ":arm64" suffixes.
            "-o", f"APT::Architecture={self.arch}", "-o", f"APT::Architectures={self.arch}",
        ]
        if os.geteuid() == 0:
            # As root apt drops to the _apt user, who cannot write into our cache or the
            # download directory; it falls back with a warning.  Say so up front instead.
            options += ["-o", "APT::Sandbox::User=root"]
        return options

    def _prepare(self) -> None:
        mirror = os.environ.get("XFRMTRACE_LAB_MIRROR", DEFAULT_MIRROR).rstrip("/")
        if ARCHIVE_KEYRING.is_file():
            options = f"arch={self.arch} signed-by={ARCHIVE_KEYRING}"
        else:  # pragma: no cover - debian-archive-keyring is Priority: important
            raise KernelFetchError(f"{ARCHIVE_KEYRING} missing: install debian-archive-keyring")
        (self.lists / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        line = f"deb [{options}] {mirror} {self.suite} main\n"
        if not self.sources.is_file() or self.sources.read_text() != line:
            self.sources.write_text(line)
            self.stamp.unlink(missing_ok=True)  # new mirror: the old index does not count

    def has_index(self) -> bool:
        """True if a package index was downloaded at some point (fresh or not)."""
        return any(self.lists.glob("*_Packages*"))

    def refresh(self) -> bool:
        """Update the index unless it is younger than INDEX_TTL.  False if the update failed."""
        self._prepare()
        if self.stamp.is_file() and time.time() - self.stamp.stat().st_mtime < INDEX_TTL:
            return True
        if _offline():
            return False
        _log(f"updating the {self.suite} package index")
        try:
            proc = subprocess.run(
                ["apt-get", "-q", *self._apt_options(), "update"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                timeout=NETWORK_TIMEOUT, check=False,
            )
        except subprocess.TimeoutExpired:
            _log(f"apt-get update for {self.suite} timed out")
            return False
        # apt-get update exits 0 even when a fetch failed ("W: Failed to fetch"); treat those
        # warnings as failure so a stale index is reported, not silently used as fresh.
        if proc.returncode != 0 or re.search(r"^(E:|W: (Failed|Some index))", proc.stdout, re.M):
            _log(f"apt-get update for {self.suite} failed:\n{proc.stdout.strip()}")
            return False
        self.stamp.touch()
        return True

    def package_names(self, prefix: str) -> List[str]:
        """Real (not virtual) package names starting with ``prefix``."""
        out = subprocess.run(
            ["apt-cache", *self._apt_options(), "pkgnames", prefix],
            stdout=subprocess.PIPE, text=True, check=True,
        ).stdout
        return out.split()

    def show(self, package: str) -> Dict[str, str]:
        """The candidate's control fields (only those we need: Version, Depends)."""
        out = subprocess.run(
            ["apt-cache", *self._apt_options(), "show", "--no-all-versions", package],
            stdout=subprocess.PIPE, text=True, check=True,
        ).stdout
        fields: Dict[str, str] = {}
        for line in out.splitlines():
            key, sep, value = line.partition(": ")
            if sep and key in ("Version", "Depends"):
                fields[key] = value.strip()
        return fields

    def download(self, packages: List[str], dest: Path) -> None:
        """``apt-get download`` the candidates of ``packages`` into ``dest``."""
        proc = subprocess.run(
            ["apt-get", "-q", *self._apt_options(), "download", *packages],
            cwd=dest, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=NETWORK_TIMEOUT, check=False,
        )
        if proc.returncode != 0:
            raise KernelFetchError(f"apt-get download {' '.join(packages)}:\n{proc.stdout}")


def _find_image(root: Path, version: str) -> Path:
    """The bzImage inside an unpacked package set (bookworm style or sid's split packages)."""
    for rel in (
        f"boot/vmlinuz-{version}",
        f"usr/lib/modules/{version}/vmlinuz",
        f"lib/modules/{version}/vmlinuz",
    ):
        if (root / rel).is_file():
            return root / rel
    raise KernelFetchError(f"no vmlinuz for {version} under {root}")


def _find_modules(root: Path, version: str) -> Path:
    for rel in (f"lib/modules/{version}", f"usr/lib/modules/{version}"):
        if (root / rel / "kernel").is_dir():
            return root / rel
    raise KernelFetchError(f"no modules for {version} under {root}")


def depmod(modules_dir: Path, version: str, again: bool = False) -> None:
    """Generate modules.dep: Debian packages leave that to postinst, and modprobe needs it.

    ``again``: regenerate it (a module was added, vmlab/host/extramodules.py).
    ``depmod -b BASE`` reads ``BASE/lib/modules/<version>``, so BASE is two levels up.
    """
    if (modules_dir / "modules.dep").is_file() and not again:
        return
    depmod = shutil.which("depmod") or "/usr/sbin/depmod"
    subprocess.run([depmod, "-a", "-b", str(modules_dir.parents[2]), version], check=True)
    if not (modules_dir / "modules.dep").is_file():
        raise KernelFetchError(f"depmod did not create {modules_dir}/modules.dep")


def _link_host_modules(kernel: Kernel) -> None:
    """Make ``/lib/modules/<version>`` point at the unpacked modules.

    virtme-ng >= 1.3x finds modules next to the image it boots, but older releases (and
    ``modprobe`` on the host, e.g. ``modinfo`` in tools) look in /lib/modules.  A real
    directory there (a host-installed kernel of the same release) is left alone.
    """
    link = Path("/lib/modules") / kernel.version
    try:
        if link.is_symlink():
            if Path(os.readlink(link)) == kernel.modules_dir:
                return
            link.unlink()
        elif link.exists():
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(kernel.modules_dir)
    except OSError as exc:
        _log(f"cannot link {link} -> {kernel.modules_dir} ({exc}); relying on virtme-ng")


def _load_cached(series: Series, version: str, root: Path) -> Optional[Kernel]:
    meta = root / "kernels" / version / "kernel.json"
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    kernel = Kernel(
        series=series.name,
        version=version,
        vmlinuz=Path(data["vmlinuz"]),
        modules_dir=Path(data["modules_dir"]),
        package_version=data.get("package_version", ""),
    )
    if not (kernel.vmlinuz.is_file() and (kernel.modules_dir / "modules.dep").is_file()):
        return None
    return kernel


def _newest_cached(series: Series, root: Path) -> Optional[Kernel]:
    """The newest complete kernel of ``series`` in the cache (the offline fallback)."""
    kdir = root / "kernels"
    if not kdir.is_dir():
        return None
    versions = [d.name for d in kdir.iterdir() if series.match(f"linux-image-{d.name}")]
    for version in sorted(versions, key=_version_key, reverse=True):
        kernel = _load_cached(series, version, root)
        if kernel:
            return kernel
    return None


def _resolve(series: Series, index: _SuiteIndex) -> Tuple[str, str]:
    """Newest image package of ``series`` in the index: (kernel release, image package name)."""
    found = {}
    for name in index.package_names("linux-image-"):
        version = series.match(name)
        if version:
            found[version] = name
    if not found:
        raise KernelFetchError(f"no package matching {series.pattern} in {series.suite}")
    version = max(found, key=_version_key)
    return version, found[version]


def _install(series: Series, index: _SuiteIndex, version: str, image_pkg: str,
             root: Path) -> Kernel:
    """Download and unpack one kernel into ``kernels/<version>`` (atomically: rename at the end)."""
    fields = index.show(image_pkg)
    packages = [image_pkg]
    # sid splits the kernel: linux-image-<v> is empty and depends on linux-binary-<v>
    # (vmlinuz) and linux-modules-<v>.  Older suites ship everything in linux-image-<v>.
    for dep in re.split(r"\s*,\s*", fields.get("Depends", "")):
        name = dep.split()[0] if dep else ""
        if name in (f"linux-binary-{version}", f"linux-modules-{version}"):
            packages.append(name)

    final = root / "kernels" / version
    with tempfile.TemporaryDirectory(prefix=f".{version}.", dir=root / "kernels") as tmp:
        debs, tree = Path(tmp) / "debs", Path(tmp) / "tree"
        debs.mkdir()
        _log(f"downloading {', '.join(packages)} ({fields.get('Version', '?')})")
        index.download(packages, debs)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        # Paths are recorded relative to the final location, so resolve after the rename.
        vmlinuz = _find_image(tree, version).relative_to(tree)
        modules = _find_modules(tree, version).relative_to(tree)
        depmod(tree / modules, version)
        if final.exists():  # an incomplete earlier attempt (no kernel.json)
            shutil.rmtree(final)
        tree.rename(final)
    meta = {
        "series": series.name,
        "version": version,
        "package_version": fields.get("Version", ""),
        "packages": packages,
        "vmlinuz": str(final / vmlinuz),
        "modules_dir": str(final / modules),
    }
    (final / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
    kernel = _load_cached(series, version, root)
    assert kernel is not None
    return kernel


def _series(name: str) -> Series:
    try:
        return SERIES[name]
    except KeyError:
        raise KernelFetchError(f"unknown kernel series {name!r} (known: {', '.join(SERIES)})") \
            from None


def fetch_kernel(series: str) -> Kernel:
    """Return the newest kernel of ``series`` (a key of :data:`SERIES`), fetching it if needed.

    Network use: the suite's index is refreshed at most once per :data:`INDEX_TTL`; the
    packages are downloaded only if that exact release is not cached yet.  If the network is
    down (or ``XFRMTRACE_LAB_OFFLINE=1``) the newest cached kernel of the series is used.
    """
    spec = _series(series)
    root = cache_dir()
    (root / "kernels").mkdir(parents=True, exist_ok=True)
    with locked(root / ".lock"):
        index = _SuiteIndex(spec.suite, root, spec.arch)
        fresh = index.refresh()
        kernel: Optional[Kernel] = None
        if index.has_index():
            try:
                version, image_pkg = _resolve(spec, index)
                kernel = _load_cached(spec, version, root)
                if kernel is None and not _offline():
                    kernel = _install(spec, index, version, image_pkg, root)
            except (KernelFetchError, subprocess.SubprocessError) as exc:
                _log(f"could not fetch the newest {series} kernel: {exc}")
        if kernel is None:
            kernel = _newest_cached(spec, root)
            if kernel is None:
                raise KernelFetchError(
                    f"no {series} kernel cached in {root} and none could be downloaded")
            if fresh:
                _log(f"using cached {kernel.version} instead")
            else:
                _log(f"package index unavailable, using cached {kernel.version}")
        _link_host_modules(kernel)
        return kernel


@dataclass(frozen=True)
class DebugKernel:
    """A kernel's uncompressed vmlinux (symbols, .BTF) and System.map, from its -dbg
    package: what ``xfrmtrace sites --vmlinux F --kallsyms F`` reads offline."""

    series: str
    version: str
    vmlinux: Path
    system_map: Path
    package_version: str = ""


def fetch_debug_vmlinux(series: str) -> DebugKernel:
    """The newest ``series`` kernel's vmlinux and System.map (``linux-image-<v>-dbg``, about
    1 GB; only those two files are kept, in ``debug/<v>`` of the lab cache)."""
    spec = _series(series)
    root = cache_dir()
    (root / "debug").mkdir(parents=True, exist_ok=True)
    with locked(root / ".lock"):
        index = _SuiteIndex(spec.suite, root, spec.arch)
        index.refresh()
        cached = sorted((p for p in (root / "debug").glob("*/debug.json")),
                        key=lambda p: _version_key(p.parent.name))
        if index.has_index():
            version, image_pkg = _resolve(spec, index)
            final = root / "debug" / version
            if not (final / "debug.json").is_file():
                if _offline():
                    raise KernelFetchError(f"{version} debug vmlinux not cached (offline)")
                _install_debug(index, version, f"{image_pkg}-dbg", final)
        else:
            matching = [p for p in cached if spec.match(f"linux-image-{p.parent.name}")]
            if not matching:
                raise KernelFetchError(f"no {series} debug vmlinux cached in {root} and no "
                                       "package index to fetch one")
            final = matching[-1].parent
        meta = json.loads((final / "debug.json").read_text())
        return DebugKernel(series, meta["version"], final / "vmlinux",
                           final / "System.map", meta.get("package_version", ""))


def _install_debug(index: _SuiteIndex, version: str, package: str, final: Path) -> None:
    fields = index.show(package)
    with tempfile.TemporaryDirectory(prefix=f".{version}.", dir=final.parent) as tmp:
        debs, tree = Path(tmp) / "debs", Path(tmp) / "tree"
        debs.mkdir()
        tree.mkdir()
        _log(f"downloading {package} ({fields.get('Version', '?')})")
        index.download([package], debs)
        (deb,) = debs.glob("*.deb")
        wanted = [f"./usr/lib/debug/boot/vmlinux-{version}",
                  f"./usr/lib/debug/boot/System.map-{version}"]
        # Only the two files: the package unpacks to several GB of module debug info.
        unpack = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                  stdout=subprocess.PIPE)
        # --occurrence: stop once both are out (they come first), not at the archive's end.
        subprocess.run(["tar", "-x", "--occurrence=1", "-C", str(tree), *wanted],
                       stdin=unpack.stdout, check=True)
        assert unpack.stdout is not None
        unpack.stdout.close()
        unpack.wait()
        boot = tree / "usr/lib/debug/boot"
        (boot / f"vmlinux-{version}").rename(tree / "vmlinux")
        (boot / f"System.map-{version}").rename(tree / "System.map")
        shutil.rmtree(tree / "usr")
        meta = {"version": version, "package": package,
                "package_version": fields.get("Version", "")}
        (tree / "debug.json").write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tree.rename(final)


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point: print the vmlinuz path of each requested series."""
    parser = argparse.ArgumentParser(prog="python -m vmlab.host.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("series", nargs="*", help=f"one of {', '.join(SERIES)}")
    parser.add_argument("--all", action="store_true", help="fetch the whole matrix")
    args = parser.parse_args(argv)
    wanted = list(MATRIX) if args.all else args.series
    if not wanted:
        parser.error("give a series or --all")
    status = 0
    for name in wanted:
        try:
            kernel = fetch_kernel(name)
        except KernelFetchError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(kernel.vmlinuz if len(wanted) == 1 else f"{name}\t{kernel.version}\t{kernel.vmlinuz}")
    return status


if __name__ == "__main__":
    sys.exit(main())
