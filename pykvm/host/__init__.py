"""Host preparation for PCI passthrough: the library behind ``pykvm host``.

Every function takes a :class:`Root` (``Root("/")`` is this machine; any directory
with ``sys/``, ``proc/``, ``dev/`` works the same, which is how the tests run)::

    from pykvm.host import Root, run_checks, list_groups, bind, restore, show_device
    report = run_checks(Root(), memory=2 << 30)      # CheckReport: items with PASS/WARN/FAIL and fixes
    for group in list_groups(Root()):                 # IommuGroup: devices, drivers, ready
        ...
    result = bind(Root(), "0000:00:05.0")             # BindResult: changes, writes, notes
    restore(Root(), "0000:00:05.0")
    print(format_device(show_device(Root(), "0000:00:05.0")))

Errors a user can act on are :class:`HostError` (with ``.fix``); nothing is written
before every check of a ``bind``/``restore`` has passed.
"""
from pykvm.host.bdf import BdfError, parse_bdf
from pykvm.host.bind import BindResult, bind, persist_lines, restore
from pykvm.host.check import CheckItem, CheckReport, format_report, run_checks
from pykvm.host.groups import IommuGroup, format_groups, list_groups
from pykvm.host.pci import PciDevice, read_device
from pykvm.host.show import DeviceView, format_device, show_device
from pykvm.host.sysfs import HostError, Root

__all__ = [
    "Root", "HostError", "BdfError", "parse_bdf", "run_checks", "format_report", "CheckItem", "CheckReport",
    "list_groups", "format_groups", "IommuGroup", "PciDevice", "read_device", "bind", "restore", "persist_lines",
    "BindResult", "show_device", "format_device", "DeviceView",
]
