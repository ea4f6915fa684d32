"""GSI allocation and the VM's interrupt routing table, shared by every device of a VM.

KVM delivers an irqfd's interrupt through a GSI (global system interrupt)
number: GSIs 0-23 are the PIC/IOAPIC pins that KVM_CREATE_IRQCHIP routes; an
MSI needs a GSI of its own whose route says "write this MSI message". KVM
has no per-GSI update: KVM_SET_GSI_ROUTING replaces the whole table, so the
router keeps every route and writes all of them (the default irqchip routes
included, or the IOAPIC would go deaf) on each change.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Protocol

from pykvm.kvm.vm import MsiRoute, Route, Vm

__all__ = ["GsiRouter", "GsiExhausted", "FIRST_MSI_GSI"]

FIRST_MSI_GSI = 24  # 0-23 are the IOAPIC's (and the PICs' 0-15)


class RoutingTable(Protocol):
    def set_gsi_routing(self, routes: List[Route]) -> None: ...


class GsiExhausted(RuntimeError):
    """Every GSI the kernel allows is in use."""


class GsiRouter:
    """Allocates GSIs from 24 up and owns the VM's routing table.

    ``limit`` is the kernel's table size (KVM_CAP_IRQ_ROUTING answers the
    number of routes; KVM_MAX_IRQ_ROUTES is 4096 on x86).
    """

    def __init__(self, vm: RoutingTable, limit: int = 4096):
        self.vm = vm
        self.limit = limit
        self._msi: Dict[int, MsiRoute] = {}
        self._free: List[int] = []
        self._next = FIRST_MSI_GSI
        self._lock = threading.Lock()

    def routes(self) -> List[Route]:
        """The full table: the irqchip defaults, then one MSI route per allocated GSI."""
        return [*Vm.default_irqchip_routes(), *sorted(self._msi.values(), key=lambda r: r.gsi)]

    def allocate(self, address: int, data: int) -> int:
        """A new GSI that raises the MSI ``(address, data)``; the table is rewritten."""
        with self._lock:
            if self._free:
                gsi = self._free.pop()
            elif self._next < self.limit:
                gsi, self._next = self._next, self._next + 1
            else:
                raise GsiExhausted(f"all {self.limit - FIRST_MSI_GSI} MSI GSIs are in use")
            self._msi[gsi] = MsiRoute(gsi, address, data)
            try:
                self.vm.set_gsi_routing(self.routes())
            except Exception:
                del self._msi[gsi]
                self._free.append(gsi)
                raise
            return gsi

    def update(self, gsi: int, address: int, data: int) -> None:
        """Point ``gsi`` at a new message (the guest rewrote the vector's address or data)."""
        with self._lock:
            route = MsiRoute(gsi, address, data)
            if self._msi.get(gsi) == route:
                return
            old, self._msi[gsi] = self._msi[gsi], route
            try:
                self.vm.set_gsi_routing(self.routes())
            except Exception:
                self._msi[gsi] = old
                raise

    def free(self, gsi: int) -> None:
        """Drop ``gsi``'s route (detach its irqfd first)."""
        with self._lock:
            if self._msi.pop(gsi, None) is None:
                return
            self._free.append(gsi)
            self.vm.set_gsi_routing(self.routes())

    def __contains__(self, gsi: int) -> bool:
        return gsi in self._msi

