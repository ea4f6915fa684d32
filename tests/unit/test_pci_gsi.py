"""GSI router: MSI GSIs from 24 up, the full table (irqchip defaults included) on each change."""
from __future__ import annotations

import pytest

from pykvm.kvm.vm import MsiRoute, Vm
from pykvm.vmm.pci.gsi import FIRST_MSI_GSI, GsiExhausted, GsiRouter


class Table:
    """Records the tables written (the router's only contact with the VM)."""

    def __init__(self, fail=False):
        self.tables = []
        self.fail = fail

    def set_gsi_routing(self, routes):
        if self.fail:
            raise OSError(22, "refused")
        self.tables.append(list(routes))


def test_allocate_update_free_rewrite_the_whole_table():
    t = Table()
    r = GsiRouter(t)
    a = r.allocate(0xFEE00000, 0x41)
    b = r.allocate(0xFEE00000, 0x42)
    assert (a, b) == (FIRST_MSI_GSI, FIRST_MSI_GSI + 1)
    defaults = Vm.default_irqchip_routes()
    assert t.tables[-1] == [*defaults, MsiRoute(a, 0xFEE00000, 0x41), MsiRoute(b, 0xFEE00000, 0x42)]
    r.update(a, 0xFEE01000, 0x51)
    assert t.tables[-1][len(defaults)] == MsiRoute(a, 0xFEE01000, 0x51)
    n = len(t.tables)
    r.update(a, 0xFEE01000, 0x51)  # unchanged: no rewrite
    assert len(t.tables) == n
    r.free(a)
    assert t.tables[-1] == [*defaults, MsiRoute(b, 0xFEE00000, 0x42)]
    assert r.allocate(0xFEE00000, 0x43) == a  # reused
    assert a in r and 7 not in r


def test_limit_and_failed_write_leave_state_unchanged():
    r = GsiRouter(Table(), limit=FIRST_MSI_GSI + 1)
    r.allocate(0, 0)
    with pytest.raises(GsiExhausted):
        r.allocate(0, 0)
    bad = GsiRouter(Table(fail=True))
    with pytest.raises(OSError):
        bad.allocate(0xFEE00000, 0x41)
    assert bad.routes() == Vm.default_irqchip_routes()


def test_routes_accepted_by_real_kvm(vm):
    """KVM takes the router's tables: defaults plus MSI routes, and a freed GSI."""
    vm.create_irqchip()
    r = GsiRouter(vm)
    gsis = [r.allocate(0xFEE00000, 0x40 + i) for i in range(3)]
    r.update(gsis[1], 0xFEE01000, 0x60)
    r.free(gsis[0])
    assert [x.gsi for x in r.routes()[-2:]] == gsis[1:]
