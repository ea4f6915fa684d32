"""PCI addresses: ``DOMAIN:BUS:DEVICE.FUNCTION`` as sysfs names them (``0000:00:05.0``)."""
from __future__ import annotations

from pykvm.host.sysfs import HostError
from pykvm.pci_address import canonical_bdf

__all__ = ["BdfError", "parse_bdf"]


class BdfError(HostError, ValueError):
    """A string that is not a PCI address."""


def parse_bdf(text: str) -> str:
    """Canonical sysfs name for ``text``: ``"5.0"`` is rejected, ``"00:05.0"`` -> ``"0000:00:05.0"``.

    The device number is 5 bits (0-0x1f) and the function 3 bits (0-7), as in
    the PCI routing ID.
    """
    try:
        return canonical_bdf(text)
    except ValueError:
        raise BdfError(
            f"{text!r} is not a PCI address",
            "write it as DOMAIN:BUS:DEVICE.FUNCTION (e.g. 0000:00:05.0 or 00:05.0); `pykvm host groups` lists them",
        ) from None
