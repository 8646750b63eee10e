"""Which arguments of a site's enclosing function hold the packet, flow and namespace.

Positions come from the function's BTF prototype.  Only functions whose
symbol is exactly the BTF name are used: compiler clones (``.isra``,
``.constprop``, ``.part``) may have dropped or reordered parameters.
"""

from __future__ import annotations

import re
from typing import Optional, Protocol, Sequence

from xfrmtrace.bpf.abi import XtArgRole
from xfrmtrace.resolve.model import FunctionArgs
from xfrmtrace.resolve.x86_registers import ARGUMENT_REGISTERS

# Parameter type (without qualifiers) -> its role; ``family`` is found by name.
_ROLE_BY_TYPE = {
    "struct sk_buff *": XtArgRole.SKB,
    "struct flowi *": XtArgRole.FLOW,
    "struct net *": XtArgRole.NET,
    "struct xfrm_state *": XtArgRole.STATE,
    "struct dst_entry *": XtArgRole.DST,
}


class Param(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def type(self) -> str: ...


class FunctionPrototypes(Protocol):
    def func_params(self, func_name: str) -> Optional[Sequence[Param]]: ...


def _normalize(type_text: str) -> str:
    text = re.sub(r"\b(const|volatile|restrict)\b", " ", type_text)
    text = re.sub(r"\s*\*", " *", text)
    return re.sub(r"\s+", " ", text).strip()


def function_args(btf: FunctionPrototypes, name: str, address: int,
                  obj: str = "vmlinux") -> Optional[FunctionArgs]:
    """Argument roles of ``name``, or None when BTF does not describe it usefully."""
    if "." in name:
        return None
    params = btf.func_params(name)
    if not params:
        return None
    args = FunctionArgs(function=name, address=address, object=obj)
    for position, param in enumerate(params[:len(ARGUMENT_REGISTERS)]):
        role = _ROLE_BY_TYPE.get(_normalize(param.type))
        if role is None and param.name == "family" and "*" not in param.type:
            role = XtArgRole.FAMILY
        if role is not None:
            args.positions.setdefault(role, position)
    return args if args.positions else None
