"""Which arguments of a site's enclosing function hold the packet, flow and namespace.

Positions come from the function's BTF prototype.  Only functions whose
symbol is exactly the BTF name are used: compiler clones (``.isra``,
``.constprop``, ``.part``) may have dropped or reordered parameters.
"""

from __future__ import annotations

import re
from typing import Optional, Protocol, Sequence

from xfrmtrace.model import FunctionArgs

# x86-64 passes the first six integer arguments in registers.
MAX_REGISTER_ARGS = 6

# Parameter type (without qualifiers) -> FunctionArgs attribute.
_ROLE_BY_TYPE = {
    "struct sk_buff *": "skb",
    "struct flowi *": "flow",
    "struct net *": "net",
    "struct xfrm_state *": "state",
    "struct dst_entry *": "dst",
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
    found = False
    for position, param in enumerate(params[:MAX_REGISTER_ARGS]):
        role = _ROLE_BY_TYPE.get(_normalize(param.type))
        if role is None and param.name == "family" and "*" not in param.type:
            role = "family"
        if role is not None and getattr(args, role) is None:
            setattr(args, role, position)
            found = True
    return args if found else None
