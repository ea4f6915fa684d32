"""IntEnums of <linux/kvm.h> macro families, as the compiled header defines them."""
from __future__ import annotations

import enum
from typing import Tuple, Type

from pykvm._native import lib


def macro_enum(name: str, prefix: str, exclude: Tuple[str, ...] = ()) -> Type[enum.IntEnum]:
    """An IntEnum of the compiled ``prefix*`` macros, named without the prefix; names that
    start with one of ``exclude`` (sub-families, masks, shifts) are left out."""
    members = {n[len(prefix):]: getattr(lib, n) for n in sorted(dir(lib))
               if n.startswith(prefix) and not n[len(prefix):].startswith(exclude)}
    return enum.IntEnum(name, members)
