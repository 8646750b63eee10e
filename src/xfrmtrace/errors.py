"""Typed errors.  Each carries one line an operator can act on; only the CLI prints them."""

from __future__ import annotations


class XfrmtraceError(Exception):
    """Base class: ``str(err)`` is a complete, one-line, actionable message."""


class PermissionProblem(XfrmtraceError):
    """Not root, or missing CAP_BPF / CAP_PERFMON / CAP_SYS_ADMIN."""


class KernelFeatureMissing(XfrmtraceError):
    """The running kernel lacks something xfrmtrace needs (kprobes, BTF, XFRM statistics, ...)."""


class LibbpfError(XfrmtraceError):
    """libbpf is missing, too old, or one of its calls failed."""

    def __init__(self, message: str, errno: int = 0, log: str = "") -> None:
        super().__init__(message)
        self.errno = errno
        self.log = log


class VerifierError(LibbpfError):
    """The kernel's BPF verifier rejected a program; ``log`` holds the verifier log."""


class SiteResolutionError(XfrmtraceError):
    """Kernel text or symbols could not be read or analysed."""


class InputError(XfrmtraceError):
    """A file or argument given by the user is unreadable or malformed."""


class BtfLookupError(XfrmtraceError, LookupError):
    """A type, member, enumerator, function or variable is not in the BTF searched.

    Raised by ``btf.Btf``; callers decide what the absence means (e.g. "struct net has no
    mib.xfrm_statistics" becomes KernelFeatureMissing for CONFIG_XFRM_STATISTICS).
    """


class DecodeError(XfrmtraceError):
    """A record from the kernel (ring-buffer event) is too short or otherwise undecodable."""
