"""PCI config-space logic: the capability-list walk and the MSI-X capability, on byte snapshots."""
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm._native import lib
from pykvm.vfio.pci import MAX_CAPS, parse_msix, walk_capabilities


def _config(caps, first=None):
    """256 bytes of config space holding ``caps`` = [(id, offset, body)] linked in list order."""
    cfg = bytearray(256)
    cfg[lib.PCI_STATUS] = lib.PCI_STATUS_CAP_LIST
    cfg[lib.PCI_CAPABILITY_LIST] = caps[0][1] if caps else 0
    for i, (cid, off, body) in enumerate(caps):
        cfg[off + lib.PCI_CAP_LIST_ID] = cid
        cfg[off + lib.PCI_CAP_LIST_NEXT] = caps[i + 1][1] if i + 1 < len(caps) else 0
        cfg[off + 2 : off + 2 + len(body)] = body
    return bytes(cfg)


def test_nvme_like_list():
    """QEMU's nvme: PM, MSI-X (table in BAR0 at 0x2000, PBA at 0x3000), PCIe."""
    msix_body = (63).to_bytes(2, "little") + (0x2000 | 0).to_bytes(4, "little") + (0x3000 | 0).to_bytes(4, "little")
    cfg = _config([(lib.PCI_CAP_ID_PM, 0x40, b""), (lib.PCI_CAP_ID_MSIX, 0x80, msix_body),
                   (lib.PCI_CAP_ID_EXP, 0x60, b"")])
    assert walk_capabilities(cfg) == [(lib.PCI_CAP_ID_PM, 0x40), (lib.PCI_CAP_ID_MSIX, 0x80), (lib.PCI_CAP_ID_EXP, 0x60)]
    msix = parse_msix(cfg, 0x80)
    assert (msix.table_size, msix.table_bar, msix.table_offset, msix.pba_bar, msix.pba_offset) == (64, 0, 0x2000, 0, 0x3000)
    assert not msix.enabled and not msix.masked


def test_msix_bits():
    body = (0xC000 | 7).to_bytes(2, "little") + (0x1000 | 4).to_bytes(4, "little") + (0x1800 | 5).to_bytes(4, "little")
    msix = parse_msix(_config([(lib.PCI_CAP_ID_MSIX, 0x50, body)]), 0x50)
    assert (msix.table_size, msix.table_bar, msix.table_offset, msix.pba_bar, msix.pba_offset) == (8, 4, 0x1000, 5, 0x1800)
    assert msix.enabled and msix.masked


def test_no_cap_list_bit_means_no_caps():
    cfg = bytearray(_config([(lib.PCI_CAP_ID_MSI, 0x40, b"")]))
    cfg[lib.PCI_STATUS] = 0
    assert walk_capabilities(bytes(cfg)) == []


def test_loop_stops():
    cfg = bytearray(_config([(lib.PCI_CAP_ID_MSI, 0x40, b""), (lib.PCI_CAP_ID_PM, 0x48, b"")]))
    cfg[0x48 + lib.PCI_CAP_LIST_NEXT] = 0x40
    assert walk_capabilities(bytes(cfg)) == [(lib.PCI_CAP_ID_MSI, 0x40), (lib.PCI_CAP_ID_PM, 0x48)]


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=300))
def test_any_snapshot_walks_safely(cfg):
    caps = walk_capabilities(cfg)
    assert len(caps) <= MAX_CAPS
    offsets = [off for _, off in caps]
    assert len(set(offsets)) == len(offsets)
    assert all(lib.PCI_STD_HEADER_SIZEOF <= off < len(cfg) and off % 4 == 0 for off in offsets)


@given(st.lists(st.integers(0x10, 0x3F).map(lambda x: x * 4), unique=True, max_size=20), st.data())
def test_generated_lists_walk_in_order(offsets, data):
    ids = [data.draw(st.integers(1, 0x14)) for _ in offsets]
    caps = walk_capabilities(_config([(cid, off, b"") for cid, off in zip(ids, offsets)]))
    assert caps == list(zip(ids, offsets))
