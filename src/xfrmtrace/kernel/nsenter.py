"""Create sockets inside another network namespace without a helper process.

setns(2) switches only the calling thread, and a socket stays in the namespace it was
created in; so: switch, create, switch back.  (pyroute2's own netns sockets fork a child
per socket, and create the namespace if it is missing, which a tracer must never do.)
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from typing import Iterator, Union

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def entered(path: Union[str, os.PathLike[str]]) -> Iterator[None]:
    """Run the body with this thread in the network namespace at ``path``
    (``/run/netns/NAME``, ``/proc/PID/ns/net``)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def netns_inode(path: Union[str, os.PathLike[str]]) -> int:
    """The inode number that identifies the namespace (what events carry as ``netns``)."""
    return os.stat(path).st_ino
