"""PCI addresses as sysfs names them: ``DOMAIN:BUS:DEVICE.FUNCTION`` (``0000:00:05.0``)."""
from __future__ import annotations

import re

__all__ = ["canonical_bdf", "BDF_PATTERN"]

BDF_PATTERN = re.compile(r"(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])")


def canonical_bdf(text: str) -> str:
    """``"00:05.0"`` -> ``"0000:00:05.0"``; ``ValueError`` for anything that is not a PCI address.

    The device number is 5 bits (0-0x1f) and the function 3 bits (0-7), as in
    the PCI routing ID; the domain defaults to 0.
    """
    m = BDF_PATTERN.fullmatch(str(text).strip())
    if not m or int(m.group(3), 16) > 0x1F:
        raise ValueError(f"{text!r} is not a PCI address")
    domain, bus, dev, fn = m.groups()
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{fn}"
