"""IntEnums of <linux/kvm.h> macro families, as the compiled header defines them."""
from __future__ import annotations

import bisect
import enum
from typing import List, Tuple, Type

from pykvm._native import lib

_names: List[str] = []  # sorted(dir(lib)), listed once: each family is a slice of it


def macro_enum(name: str, prefix: str, exclude: Tuple[str, ...] = ()) -> Type[enum.IntEnum]:
    """An IntEnum of the compiled ``prefix*`` macros, named without the prefix; names that
    start with one of ``exclude`` (sub-families, masks, shifts) are left out."""
    if not _names:
        _names.extend(sorted(dir(lib)))
    start = bisect.bisect_left(_names, prefix)
    end = bisect.bisect_left(_names, prefix[:-1] + chr(ord(prefix[-1]) + 1), start)  # past the prefix
    members = {n[len(prefix):]: getattr(lib, n) for n in _names[start:end]
               if not n[len(prefix):].startswith(exclude)}
    return enum.IntEnum(name, members)
