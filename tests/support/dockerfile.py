"""The repository's Dockerfile, read and (without a container engine) run in Debian chroots.

:func:`read_dockerfile` and friends are the small reader the consistency tests use.
:class:`ChrootBuild` runs the Dockerfile the way an engine would, for machines without one:
each stage's base is a Debian rootfs made by ``mmdebstrap`` with exactly the packages the
stage's ``apt-get install`` names (cached as a tarball under
``${XFRMTRACE_LAB_CACHE:-/var/cache/xfrmtrace-lab}/rootfs``), its other RUN instructions run
in a chroot (a private mount namespace with /proc and /sys, the host's network), COPY reads
the context through .dockerignore, ENV/ARG/WORKDIR/LABEL/ENTRYPOINT are honoured.  It
supports what this Dockerfile uses and refuses the rest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
# What a container's processes get when the image sets nothing else.
DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/root"}
# A cached rootfs older than this is made again (Debian's point releases and security fixes).
ROOTFS_MAX_AGE = 7 * 24 * 3600
# Like the -slim images: no documentation, manual pages or translations.
MMDEBSTRAP_OPTS = ["--variant=minbase", "--aptopt=APT::Install-Recommends \"false\"",
                   "--dpkgopt=path-exclude=/usr/share/doc/*",
                   "--dpkgopt=path-exclude=/usr/share/man/*",
                   "--dpkgopt=path-exclude=/usr/share/info/*",
                   "--dpkgopt=path-exclude=/usr/share/locale/*"]


# --- reading --------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: Optional[str]
    instructions: List[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> List[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def read_dockerfile(path: Optional[Path] = None) -> Tuple[Dict[str, str], List[Stage]]:
    """Global ARGs (name -> default) and the stages, with continuation lines joined."""
    logical: List[str] = []
    pending = ""
    for raw in (path or DOCKERFILE).read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue  # comments and blank lines, also inside a continued instruction
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        logical.append(pending + raw)
        pending = ""
    if pending:
        raise ValueError("Dockerfile ends inside a continued instruction")
    global_args: Dict[str, str] = {}
    stages: List[Stage] = []
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"{keyword} before the first FROM")
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages


def shell_commands(run: str) -> List[List[str]]:
    """The simple commands of a RUN line split at ``&&`` and ``;``, as words."""
    return [shlex.split(c) for c in re.split(r"&&|;", run) if c.strip()]


def apt_installs(stage: Stage) -> List[List[str]]:
    """The package lists of every ``apt-get install`` in the stage's RUN instructions."""
    lists = []
    for run in stage.all("RUN"):
        for words in shell_commands(run.args):
            if words[:1] == ["apt-get"] and "install" in words:
                after = words[words.index("install") + 1:]
                lists.append([w for w in after if not w.startswith("-")])
    return lists


def copy_sources(stage: Stage) -> List[str]:
    """The context paths the stage's COPY/ADD instructions read (not ``--from=``)."""
    sources = []
    for ins in stage.all("COPY") + stage.all("ADD"):
        words = shlex.split(ins.args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        sources.extend(words[:-1])
    return sources


def dockerignore_patterns() -> List[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def ignored(path: str, patterns: Optional[List[str]] = None) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, '/'-separated) out of the context: a
    pattern matching the path or one of its parent directories excludes it, ``!`` re-includes,
    the last matching pattern wins (Docker's rules)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for pattern in dockerignore_patterns() if patterns is None else patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern[1:] if negate else pattern)
        if any(regex.fullmatch(p) for p in prefixes):
            result = not negate
    return result


# --- running in chroots ---------------------------------------------------------------------


class ChrootBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("XFRMTRACE_LAB_CACHE", "/var/cache/xfrmtrace-lab")) / "rootfs"


def debian_suite(image: str) -> str:
    """``debian:bookworm-slim[@sha256:...]`` -> ``bookworm``."""
    m = re.fullmatch(r"(?:docker\.io/)?(?:library/)?debian:([a-z]+)(?:-slim)?"
                     r"(?:@sha256:[0-9a-f]+)?", image)
    if not m:
        raise ChrootBuildError(f"base image {image}: only debian:<suite>[-slim] is emulated")
    return m.group(1)


def base_rootfs(suite: str, packages: List[str], log=print) -> Path:
    """A tarball of Debian ``suite`` (minbase) with ``packages``: cached, made by mmdebstrap."""
    key = hashlib.sha256(json.dumps([suite, sorted(packages), MMDEBSTRAP_OPTS]).encode())
    tarball = cache_dir() / f"{suite}-{key.hexdigest()[:16]}.tar"
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with open(tarball.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists() and time.time() - tarball.stat().st_mtime < ROOTFS_MAX_AGE:
            return tarball
        log(f"mmdebstrap {suite} with {' '.join(sorted(packages))} -> {tarball}")
        partial = tarball.with_name(f"{tarball.stem}.partial.tar")
        cmd = ["mmdebstrap", "--mode=root", "--format=tar", *MMDEBSTRAP_OPTS,
               f"--include={','.join(sorted(packages))}", suite, str(partial)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise ChrootBuildError(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        partial.rename(tarball)
    return tarball


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def substitute(text: str, variables: Dict[str, str]) -> str:
    """Docker's ``$VAR`` / ``${VAR}`` substitution in ENV, LABEL, WORKDIR, COPY, FROM."""
    return _VAR.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def _context_files(source: Path) -> Iterator[Path]:
    """The files (and symlinks) under ``source`` that .dockerignore lets into the context."""
    patterns = dockerignore_patterns()
    if source.is_file() or source.is_symlink():
        yield source
        return
    for dirpath, dirnames, filenames in os.walk(source):
        rel_dir = Path(dirpath).relative_to(REPO).as_posix()
        dirnames[:] = sorted(d for d in dirnames if not ignored(f"{rel_dir}/{d}", patterns))
        for name in sorted(filenames):
            if not ignored(f"{rel_dir}/{name}", patterns):
                yield Path(dirpath) / name


@dataclass
class BuiltStage:
    root: Path
    env: Dict[str, str]
    labels: Dict[str, str]
    entrypoint: List[str]
    workdir: str


class ChrootBuild:
    """Runs the stages of the Dockerfile in ``workspace`` (one rootfs directory per stage)."""

    def __init__(self, workspace: Path, build_args: Dict[str, str], log=print) -> None:
        self.workspace = workspace
        self.build_args = build_args
        self.log = log
        self.global_args, self.stages = read_dockerfile()
        self.built: Dict[str, BuiltStage] = {}

    def build(self) -> BuiltStage:
        last = None
        for index, stage in enumerate(self.stages):
            last = self._build_stage(index, stage)
            self.built[stage.name or str(index)] = last
        assert last is not None
        return last

    def run(self, stage: BuiltStage, argv: List[str], timeout: int = 300,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """Run ``argv`` (exec form) in the stage's rootfs as its container would."""
        script = f"cd {shlex.quote(stage.workdir)} && exec {shlex.join(argv)}"
        return self._chroot(stage.root, script, {**stage.env, **(env or {})}, timeout)

    # -- internals ---------------------------------------------------------------------------

    def _chroot(self, root: Path, script: str, env: Dict[str, str],
                timeout: int) -> subprocess.CompletedProcess:
        # A private mount namespace: /proc and /sys disappear with the process.
        r = shlex.quote(str(root))
        outer = (f"mount -t proc proc {r}/proc && mount --rbind /sys {r}/sys && "
                 f"exec chroot {r} /bin/sh -c {shlex.quote(script)}")
        host_env = {**env, "PATH": f"{env.get('PATH', '')}:{DEFAULT_ENV['PATH']}"}
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh",
                               "-c", outer], capture_output=True, text=True, env=host_env,
                              timeout=timeout)

    def _build_stage(self, index: int, stage: Stage) -> BuiltStage:
        args = {**self.global_args, **{k: v for k, v in self.build_args.items()
                                       if k in self.global_args}}
        base = substitute(stage.base, args)
        if base in self.built:
            raise ChrootBuildError("FROM <earlier stage> is not emulated")
        suite = debian_suite(base)
        installs = apt_installs(stage)
        packages = sorted({p for install in installs for p in install})
        tarball = base_rootfs(suite, packages, self.log)
        root = self.workspace / f"stage{index}-{stage.name or 'final'}"
        root.mkdir(parents=True)
        # Our own mmdebstrap output, device nodes included; extracted as root.
        subprocess.run(["tar", "--numeric-owner", "-x", "-f", str(tarball), "-C", str(root)],
                       check=True)
        # The host's network setup, as an engine gives it: DNS and, where the stage trusts
        # certificates at all, the host's CA bundle (a TLS-intercepting proxy's CA included).
        shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
        bundle = root / "etc/ssl/certs/ca-certificates.crt"
        if bundle.exists() and Path("/etc/ssl/certs/ca-certificates.crt").exists():
            shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", bundle)
        env = dict(DEFAULT_ENV)
        stage_args: Dict[str, str] = {}
        labels: Dict[str, str] = {}
        entrypoint: List[str] = []
        workdir = "/"
        for ins in stage.instructions:
            variables = {**stage_args, **env}
            if ins.keyword == "ARG":
                name, has_default, default = ins.args.partition("=")
                if name in self.build_args:
                    stage_args[name] = self.build_args[name]
                elif has_default:
                    stage_args[name] = substitute(default, variables)
                elif name in self.global_args:
                    stage_args[name] = args.get(name, "")
            elif ins.keyword == "ENV":
                for word in shlex.split(ins.args):
                    key, _, value = word.partition("=")
                    env[key] = substitute(value, variables)
            elif ins.keyword == "LABEL":
                for word in shlex.split(ins.args):
                    key, _, value = word.partition("=")
                    labels[key] = substitute(value, variables)
            elif ins.keyword == "WORKDIR":
                workdir = substitute(ins.args, variables)
                (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                self._copy(root, workdir, substitute(ins.args, variables))
            elif ins.keyword == "RUN":
                self._run(root, workdir, ins.args, {**stage_args, **env})
            elif ins.keyword == "ENTRYPOINT":
                entrypoint = json.loads(ins.args)
            else:
                raise ChrootBuildError(f"{ins.keyword} is not emulated")
        return BuiltStage(root, env, labels, entrypoint, workdir)

    def _run(self, root: Path, workdir: str, command: str, env: Dict[str, str]) -> None:
        commands = shell_commands(command)
        if any(words[:1] == ["apt-get"] for words in commands):
            # The rootfs was made with these packages: the RUN must be apt-get and cleanup only.
            if not all(words[:1] in (["apt-get"], ["rm"]) for words in commands):
                raise ChrootBuildError(f"RUN mixes apt-get with other commands: {command}")
            return
        self.log(f"RUN {command}")
        proc = self._chroot(root, f"cd {shlex.quote(workdir)} && {command}", env, 1200)
        if proc.returncode != 0:
            raise ChrootBuildError(f"RUN {command}\nexit {proc.returncode}\n"
                                   f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    def _copy(self, root: Path, workdir: str, args: str) -> None:
        words = shlex.split(args)
        source_stage = None
        while words and words[0].startswith("--"):
            flag = words.pop(0)
            if flag.startswith("--from="):
                source_stage = self.built[flag.split("=", 1)[1]].root
            else:
                raise ChrootBuildError(f"COPY {flag} is not emulated")
        *sources, dest = words
        dest_path = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
        into_dir = dest.endswith("/") or len(sources) > 1
        target = root / dest_path.lstrip("/")
        for source in sources:
            if source_stage is not None:
                src = source_stage / source.lstrip("/")
                if src.is_dir():
                    shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
                else:
                    out = target / src.name if into_dir else target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, out, follow_symlinks=False)
                continue
            src = REPO / source
            if not src.exists() or ignored(source):
                raise ChrootBuildError(f"COPY {source}: not in the build context")
            if src.is_dir():
                for file in _context_files(src):
                    out = target / file.relative_to(src)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, out, follow_symlinks=False)
            else:
                out = target / src.name if into_dir else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)
