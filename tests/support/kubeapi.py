"""A real Kubernetes API server for the chart tests: kube-apiserver from Debian's source, etcd.

No package registry ships kube-apiserver, and nothing but Debian's archive and PyPI is
reachable, so it is built here, offline, from bookworm's ``kubernetes`` source package
(upstream 1.20.2 with its full ``vendor/`` tree; the trixie and sid packages are ``+ds``
repacks without ``vendor/`` that only build kubectl) with ``golang-1.19-go``, in GOPATH mode
(``GO111MODULE=off``).  Its vendored ``github.com/modern-go/reflect2`` v1.0.1 predates Go 1.18
(it calls ``reflect.mapiterinit`` with the old signature: memory corruption, a SIGSEGV on the
first custom resource), so the build brings it to v1.0.2 first, as Kubernetes itself later did
(tests/fixtures/kubeapi/reflect2-1.0.2-go1.18.patch).  The only generated file missing from
the source, ``pkg/generated/openapi/zz_generated.openapi.go``, is made with the vendored
``openapi-gen``, on the package list upstream's Makefile.generated_files computes.  The build
takes about 6-8 minutes on two cores (niced) and 2 GB of disk at its peak; only the binary is
kept, under ``${XFRMTRACE_LAB_CACHE:-/var/cache/xfrmtrace-lab}/kube-apiserver-<version>/``,
and a lock file there keeps two runs from building at once.  etcd is Debian's ``etcd-server``.

:func:`api_server` starts etcd and kube-apiserver on free loopback ports with throw-away
certificates, a static bearer token (``system:masters``) and ``--authorization-mode=AlwaysAllow``,
writes a kubeconfig for helm, waits for ``/readyz`` and stops the API server before etcd.
There is no kubelet, controller manager or scheduler: objects are admitted, validated, defaulted
and stored, and read back, but no pod ever runs and nothing is garbage-collected.

Missing Debian packages (``golang-1.19-go``, ``dpkg-dev``, ``etcd-server``; listed in the
Makefile's DEB_PACKAGES) are installed with apt-get when running as root.  Any failure raises
:class:`KubeAPIUnavailable`; the tests let it fail rather than skip, so CI notices.

CLI: ``python -m tests.support.kubeapi`` builds (when not cached) and prints the binary's path;
``python -m tests.support.kubeapi --serve`` also runs a server until interrupted and prints its
kubeconfig's path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

KUBE_VERSION = "1.20.2"
SOURCE_SUITE = "bookworm"
SOURCE_PACKAGE = "kubernetes"
GO = Path("/usr/lib/go-1.19/bin/go")
ETCD = Path("/usr/bin/etcd")
DEFAULT_MIRROR = "http://deb.debian.org/debian"  # as vmlab/host/kernels.py
ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Debian packages this module needs, by the file it uses from each.
NEEDED_PACKAGES = {GO: "golang-1.19-go", Path("/usr/bin/dpkg-source"): "dpkg-dev",
                   Path("/usr/bin/patch"): "patch", ETCD: "etcd-server",
                   Path("/usr/bin/openssl"): "openssl"}
BUILD_TIMEOUT = 45 * 60
NETWORK_TIMEOUT = 600
READY_TIMEOUT = 90.0
TOKEN = "xfrmtrace-chart-test-token"  # a throw-away server on loopback; not a secret
KPKG = "k8s.io/kubernetes"
REFLECT2_DIR = "vendor/github.com/modern-go/reflect2"
REFLECT2_PATCH = (Path(__file__).resolve().parents[1] / "fixtures" / "kubeapi"
                  / "reflect2-1.0.2-go1.18.patch")


class KubeAPIUnavailable(RuntimeError):
    """kube-apiserver could not be built, or the server could not be started."""


class ApiError(RuntimeError):
    """The API server answered a request with an error status."""

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        try:
            self.message = str(json.loads(body).get("message", body))
        except ValueError:
            self.message = body
        super().__init__(f"HTTP {status}: {self.message}")


def _log(msg: str) -> None:
    print(f"kubeapi: {msg}", file=sys.stderr, flush=True)


def _cache_dir() -> Path:
    # Same default and variable as tests/support/k8stools.py and vmlab/host/kernels.py.
    return Path(os.environ.get("XFRMTRACE_LAB_CACHE", "/var/cache/xfrmtrace-lab"))


def _run(cmd: list[str], what: str, timeout: float = NETWORK_TIMEOUT, **kwargs: Any) -> str:
    """Run ``cmd``; a non-zero exit or a timeout raises with the end of its output."""
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, check=False, **kwargs)
    except subprocess.TimeoutExpired as e:
        raise KubeAPIUnavailable(f"{what}: timed out after {timeout:.0f}s") from e
    except OSError as e:
        raise KubeAPIUnavailable(f"{what}: {e}") from e
    if proc.returncode != 0:
        raise KubeAPIUnavailable(f"{what} ({' '.join(cmd[:6])} ...) exited {proc.returncode}:\n"
                                 f"{proc.stdout.strip()[-4000:]}")
    return proc.stdout


def ensure_packages(paths: list[Path]) -> None:
    """apt-get install the Debian packages behind the missing ``paths`` (root only)."""
    missing = sorted({NEEDED_PACKAGES[p] for p in paths if not p.exists()})
    if not missing:
        return
    if os.geteuid() != 0:
        raise KubeAPIUnavailable(f"missing Debian packages {missing}: run `make deps` as root")
    _log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], "apt-get update", env=env)
    _run(["apt-get", "install", "-y", "-qq", *missing], f"apt-get install {missing}", env=env)


# --- build -----------------------------------------------------------------------------------

class _SourceIndex:
    """A private apt configuration with bookworm's deb-src index (the host's is not touched)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "apt" / f"{SOURCE_SUITE}-src"
        self.sources = self.root / "sources.list"

    def options(self) -> list[str]:
        opts = ["-o", f"Dir::Etc::SourceList={self.sources}",
                "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", "Dir::Etc::Preferences=/dev/null",
                "-o", "Dir::Etc::PreferencesParts=/dev/null",
                "-o", f"Dir::State::Lists={self.root / 'lists'}",
                "-o", f"Dir::Cache={self.root / 'cache'}"]
        if os.geteuid() == 0:
            opts += ["-o", "APT::Sandbox::User=root"]  # _apt could not write our directories
        return opts

    def update(self) -> None:
        mirror = os.environ.get("XFRMTRACE_LAB_MIRROR", DEFAULT_MIRROR).rstrip("/")
        (self.root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        self.sources.write_text(
            f"deb-src [signed-by={ARCHIVE_KEYRING}] {mirror} {SOURCE_SUITE} main\n")
        out = _run(["apt-get", "-q", *self.options(), "update"], "apt-get update (deb-src)")
        if re.search(r"^(E:|W: (Failed|Some index))", out, re.M):
            raise KubeAPIUnavailable(f"apt-get update (deb-src {SOURCE_SUITE}) failed:\n{out}")

    def source_version(self) -> str:
        out = _run(["apt-cache", *self.options(), "showsrc", "--only-source", SOURCE_PACKAGE],
                   f"apt-cache showsrc {SOURCE_PACKAGE}")
        versions = re.findall(r"^Version: (\S+)", out, re.M)
        if not versions:
            raise KubeAPIUnavailable(f"{SOURCE_SUITE} has no {SOURCE_PACKAGE} source package")
        return versions[0]

    def download(self, dest: Path) -> Path:
        """Download the source package into ``dest``; returns its .dsc."""
        _run(["apt-get", "-q", *self.options(), "source", "--download-only", SOURCE_PACKAGE],
             f"apt-get source {SOURCE_PACKAGE}", cwd=dest)
        (dsc,) = dest.glob("*.dsc")
        return dsc


def upstream_version(debian_version: str) -> str:
    """``1.20.5+really1.20.2-1.1+deb12u1`` -> ``1.20.2``."""
    really = re.search(r"\+really([0-9][0-9.]*[0-9])", debian_version)
    if really:
        return really.group(1)
    return re.sub(r"^\d+:", "", debian_version).split("-")[0].split("+")[0]


def openapi_input_dirs(tree: Path) -> list[str]:
    """Directories that ask for OpenAPI definitions, as Makefile.generated_files finds them.

    Every Go file outside ``vendor/`` (``staging/src/X`` named ``vendor/X``) with a
    ``// +k8s:`` tag line and ``+k8s:openapi-gen=``, minus code-generator and sample-apiserver
    (KUBE_OPENAPI_TAG_FILES).
    """
    tag = re.compile(r"^// *\+k8s:", re.M)
    dirs: set[str] = set()
    for top in sorted(tree.iterdir()):
        if top.name.startswith(("_", ".")) or top.name == "vendor" or not top.is_dir():
            continue
        for dirpath, _, files in os.walk(top):
            for name in files:
                if not name.endswith(".go"):
                    continue
                text = Path(dirpath, name).read_text(encoding="utf-8", errors="replace")
                if "+k8s:openapi-gen=" in text and tag.search(text):
                    rel = os.path.relpath(dirpath, tree)
                    if rel.startswith("staging/src/"):
                        rel = "vendor/" + rel[len("staging/src/"):]
                    dirs.add(rel)
    return sorted(d for d in dirs if not d.startswith(
        ("vendor/k8s.io/code-generator/", "vendor/k8s.io/sample-apiserver/")))


def _version_ldflags(version: str) -> str:
    """What hack/lib/version.sh sets, so the server reports ``v<version>``."""
    major, minor = version.split(".")[:2]
    values = {"gitVersion": f"v{version}", "gitMajor": major, "gitMinor": minor,
              "gitTreeState": "clean", "gitCommit": f"debian-{SOURCE_SUITE}",
              "buildDate": "1970-01-01T00:00:00Z"}
    return " ".join(f"-X {KPKG}/vendor/k8s.io/{pkg}.{key}={value}"
                    for key, value in values.items()
                    for pkg in ("client-go/pkg/version", "component-base/version"))


def _build(build: Path, dest: Path) -> None:
    """Fetch, unpack, generate and compile into ``build``; install the binary at ``dest``."""
    index = _SourceIndex(_cache_dir())
    index.update()
    debian_version = index.source_version()
    if upstream_version(debian_version) != KUBE_VERSION:
        raise KubeAPIUnavailable(
            f"{SOURCE_SUITE}'s {SOURCE_PACKAGE} source is now {debian_version}, not "
            f"{KUBE_VERSION}: update KUBE_VERSION in {__file__}")
    download = build / "download"
    download.mkdir()
    _log(f"downloading {SOURCE_PACKAGE} {debian_version} source")
    dsc = index.download(download)
    gopath = build / "gopath"
    tree = gopath / "src" / KPKG
    tree.parent.mkdir(parents=True)
    # Applies Debian's patches too (kubectl printing fixes); apt already checked the hashes.
    _run(["dpkg-source", "--no-check", "-x", str(dsc), str(tree)], "dpkg-source -x")
    shutil.rmtree(download)
    # Kubernetes 1.20's reflect2 predates Go 1.18 and crashes the server: bring it to v1.0.2.
    _run(["patch", "-p1", "--forward", "-d", str(tree / REFLECT2_DIR), "-i", str(REFLECT2_PATCH)],
         f"patch {REFLECT2_DIR}")

    env = {"PATH": f"{GO.parent}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(build),
           "GOPATH": str(gopath), "GO111MODULE": "off", "GOFLAGS": "", "CGO_ENABLED": "0",
           "GOCACHE": str(build / "gocache"), "GOTMPDIR": str(build / "tmp"), "LC_ALL": "C"}
    (build / "tmp").mkdir()
    nice = ["nice", "-n", "19"]
    bin_dir = build / "bin"
    _log("building openapi-gen")
    _run([*nice, str(GO), "build", "-o", str(bin_dir / "openapi-gen"),
          f"{KPKG}/vendor/k8s.io/kube-openapi/cmd/openapi-gen"],
         "go build openapi-gen", timeout=BUILD_TIMEOUT, cwd=tree, env=env)
    inputs = ",".join(f"{KPKG}/{d}" for d in openapi_input_dirs(tree))
    _log("generating pkg/generated/openapi")
    _run([*nice, str(bin_dir / "openapi-gen"), "-i", inputs,
          "-p", f"{KPKG}/pkg/generated/openapi", "-O", "zz_generated.openapi",
          "-h", "vendor/k8s.io/code-generator/hack/boilerplate.go.txt",
          "-r", str(build / "openapi-violations.report")],
         "openapi-gen", timeout=BUILD_TIMEOUT, cwd=tree, env=env)
    if not (tree / "pkg/generated/openapi/zz_generated.openapi.go").is_file():
        raise KubeAPIUnavailable("openapi-gen wrote no pkg/generated/openapi/"
                                 "zz_generated.openapi.go")
    _log(f"building kube-apiserver {KUBE_VERSION} (several minutes)")
    started = time.monotonic()
    out = bin_dir / "kube-apiserver"
    _run([*nice, str(GO), "build", "-trimpath", "-tags", "selinux,notest",
          "-ldflags", f"-s -w {_version_ldflags(KUBE_VERSION)}", "-o", str(out),
          f"{KPKG}/cmd/kube-apiserver"],
         "go build kube-apiserver", timeout=BUILD_TIMEOUT, cwd=tree, env=env)
    _log(f"built kube-apiserver in {time.monotonic() - started:.0f}s")
    reported = _run([str(out), "--version"], "kube-apiserver --version").strip()
    if reported != f"Kubernetes v{KUBE_VERSION}":
        raise KubeAPIUnavailable(f"built kube-apiserver reports {reported!r}")
    tmp = dest.with_name(dest.name + ".part")
    shutil.copy2(out, tmp)
    tmp.replace(dest)  # atomic: a half-written binary is never taken for the cached one


def kube_apiserver_binary() -> Path:
    """The cached kube-apiserver, built first (minutes) when missing."""
    dest = _cache_dir() / f"kube-apiserver-{KUBE_VERSION}" / "kube-apiserver"
    if dest.is_file() and os.access(dest, os.X_OK):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KubeAPIUnavailable(
            f"cannot create {dest.parent}: {e} (set XFRMTRACE_LAB_CACHE)") from e
    with open(dest.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the second run then finds it
        if dest.is_file() and os.access(dest, os.X_OK):
            return dest
        ensure_packages([GO, Path("/usr/bin/dpkg-source"), Path("/usr/bin/patch")])
        for stale in dest.parent.glob("build-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        build = Path(tempfile.mkdtemp(prefix="build-", dir=dest.parent))
        try:
            _build(build, dest)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return dest


# --- running ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _make_certs(d: Path) -> None:
    """A CA, a serving certificate for 127.0.0.1 signed by it, a service-account key."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run(["openssl", "req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"),
          "-days", "2", "-subj", "/CN=xfrmtrace-test-ca"], "openssl (CA)")
    _run(["openssl", "req", "-new", *ec, "-keyout", str(d / "server.key"),
          "-out", str(d / "server.csr"), "-subj", "/CN=kube-apiserver"], "openssl (CSR)")
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _run(["openssl", "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"),
          "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
          "-extfile", str(d / "server.ext"), "-out", str(d / "server.crt")], "openssl (sign)")
    _run(["openssl", "genrsa", "-traditional", "-out", str(d / "sa.key"), "2048"],
         "openssl (service-account key)")


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _stop(proc: Optional[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class ApiServer:
    """A running API server: its URL, CA, token and a kubeconfig for helm/kubectl."""

    url: str
    ca: Path
    kubeconfig: Path
    version: str
    workdir: Path

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def request(self, method: str, path: str, body: Any = None,
                params: str = "") -> Any:
        """A JSON request; an error status raises :class:`ApiError`."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}{path}{'?' + params if params else ''}", data=data, method=method,
            headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/json",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self._context(), timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")) from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def exists(self, path: str) -> bool:
        try:
            self.get(path)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True


def _wait_ready(server: ApiServer, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise KubeAPIUnavailable(f"kube-apiserver exited {proc.returncode}:\n{_tail(log)}")
        req = urllib.request.Request(f"{server.url}/readyz",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, context=server._context(), timeout=5) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = e.read().decode(errors="replace")[-1000:]
        except (OSError, ssl.SSLError) as e:
            last = str(e)
        time.sleep(0.5)
    raise KubeAPIUnavailable(f"kube-apiserver not ready after {READY_TIMEOUT:.0f}s: {last}\n"
                             f"{_tail(log)}")


def _start_etcd(d: Path) -> tuple[subprocess.Popen[bytes], str]:
    client, peer = _free_port(), _free_port()
    log = d / "etcd.log"
    cmd = [str(ETCD), "--name", "xfrmtrace-test", "--data-dir", str(d / "etcd"),
           "--listen-client-urls", f"http://127.0.0.1:{client}",
           "--advertise-client-urls", f"http://127.0.0.1:{client}",
           "--listen-peer-urls", f"http://127.0.0.1:{peer}",
           "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
           "--initial-cluster", f"xfrmtrace-test=http://127.0.0.1:{peer}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{client}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise KubeAPIUnavailable(f"etcd exited {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if json.loads(resp.read()).get("health") == "true":
                    return proc, url
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    _stop(proc)
    raise KubeAPIUnavailable(f"etcd not healthy after 30s:\n{_tail(log)}")


def _kubeconfig(path: Path, url: str, ca: Path) -> None:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "xfrmtrace-test",
        "clusters": [{"name": "xfrmtrace-test",
                      "cluster": {"server": url, "certificate-authority": str(ca)}}],
        "users": [{"name": "admin", "user": {"token": TOKEN}}],
        "contexts": [{"name": "xfrmtrace-test",
                      "context": {"cluster": "xfrmtrace-test", "user": "admin"}}],
    }, indent=2))
    path.chmod(0o600)


@contextlib.contextmanager
def api_server() -> Iterator[ApiServer]:
    """etcd and kube-apiserver on loopback for the ``with`` block; stopped in that order."""
    binary = kube_apiserver_binary()
    ensure_packages([ETCD, Path("/usr/bin/openssl")])
    with tempfile.TemporaryDirectory(prefix="xfrmtrace-kubeapi-") as tmp:
        d = Path(tmp)
        _make_certs(d)
        (d / "tokens.csv").write_text(f'{TOKEN},admin,admin,"system:masters"\n')
        etcd: Optional[subprocess.Popen[bytes]] = None
        apiserver: Optional[subprocess.Popen[bytes]] = None
        try:
            etcd, etcd_url = _start_etcd(d)
            for attempt in range(3):  # a free port can be taken before the server binds it
                port = _free_port()
                log = d / "kube-apiserver.log"
                cmd = [str(binary), "--bind-address=127.0.0.1", f"--secure-port={port}",
                       "--insecure-port=0", f"--etcd-servers={etcd_url}",
                       f"--tls-cert-file={d / 'server.crt'}",
                       f"--tls-private-key-file={d / 'server.key'}",
                       f"--token-auth-file={d / 'tokens.csv'}",
                       "--authorization-mode=AlwaysAllow", "--allow-privileged=true",
                       "--service-cluster-ip-range=10.96.0.0/24",
                       f"--service-account-key-file={d / 'sa.key'}",
                       f"--service-account-signing-key-file={d / 'sa.key'}",
                       "--service-account-issuer=https://kubernetes.default.svc",
                       # Loopback is no valid endpoint for the `kubernetes` Service.
                       "--endpoint-reconciler-type=none", "--profiling=false"]
                with open(log, "wb") as out:
                    apiserver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True)
                server = ApiServer(url=f"https://127.0.0.1:{port}", ca=d / "ca.crt",
                                   kubeconfig=d / "kubeconfig", version=KUBE_VERSION, workdir=d)
                try:
                    _wait_ready(server, apiserver, log)
                    break
                except KubeAPIUnavailable:
                    _stop(apiserver)
                    if attempt == 2 or "address already in use" not in _tail(log):
                        raise
            _kubeconfig(server.kubeconfig, server.url, server.ca)
            server.version = server.get("/version")["gitVersion"].lstrip("v")
            yield server
        finally:
            _stop(apiserver)  # the API server first: it would retry etcd and log errors
            _stop(etcd)


def main(argv: list[str]) -> int:
    try:
        if "--serve" in argv:
            with api_server() as server:
                print(f"kube-apiserver {server.version} at {server.url}; "
                      f"KUBECONFIG={server.kubeconfig}; Ctrl-C stops it", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
        else:
            print(kube_apiserver_binary())
    except KubeAPIUnavailable as err:
        print(f"kubeapi: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
