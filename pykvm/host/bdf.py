"""PCI addresses: ``DOMAIN:BUS:DEVICE.FUNCTION`` as sysfs names them (``0000:00:05.0``)."""
from __future__ import annotations

import re

from pykvm.host.sysfs import HostError

__all__ = ["BdfError", "parse_bdf"]

_BDF = re.compile(r"(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])")


class BdfError(HostError, ValueError):
    """A string that is not a PCI address."""


def parse_bdf(text: str) -> str:
    """Canonical sysfs name for ``text``: ``"5.0"`` is rejected, ``"00:05.0"`` -> ``"0000:00:05.0"``.

    The device number is 5 bits (0-0x1f) and the function 3 bits (0-7), as in
    the PCI routing ID.
    """
    m = _BDF.fullmatch(text.strip())
    if not m or int(m.group(3), 16) > 0x1F:
        raise BdfError(
            f"{text!r} is not a PCI address",
            "write it as DOMAIN:BUS:DEVICE.FUNCTION (e.g. 0000:00:05.0 or 00:05.0); `pykvm host groups` lists them",
        )
    domain, bus, dev, fn = m.groups()
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{fn}"
