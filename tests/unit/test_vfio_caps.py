"""VFIO INFO capability chains (region info and IOMMU info), parsed from byte buffers.

Buffers are built with the compiled struct layouts (ffi), as the kernel would lay
them out, so the parser is checked against the real ABI, not a hand copy of it.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm._native import ffi, lib
from pykvm.vfio.caps import CapabilityChainError, walk_chain
from pykvm.vfio.container import Migration, parse_iommu_caps
from pykvm.vfio.regions import RegionType, SparseArea, parse_region_caps

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


def _struct_bytes(ctype, fields, extra=b""):
    p = ffi.new(ctype + " *")
    for name, value in fields.items():
        setattr(p, name, value)
    return bytes(ffi.buffer(p)) + extra


def _cap(ctype, cap_id, fields, extra=b"", version=1):
    """A capability's bytes with its header filled except ``next``."""
    body = bytearray(_struct_bytes(ctype, fields, extra))
    hdr = ffi.new("struct vfio_info_cap_header *")
    hdr.id, hdr.version = cap_id, version
    body[: ffi.sizeof(hdr[0])] = bytes(ffi.buffer(hdr))
    return bytes(body)


def _chain(base_ctype, caps, order=None):
    """The INFO struct followed by ``caps`` (8-byte aligned), linked in ``order``; returns (buf, first)."""
    buf = bytearray(ffi.sizeof(base_ctype))
    offsets = []
    for cap in caps:
        buf += bytes(-len(buf) % 8)
        offsets.append(len(buf))
        buf += cap
    order = list(range(len(caps))) if order is None else order
    next_off = ffi.offsetof("struct vfio_info_cap_header", "next")
    for pos, i in enumerate(order):
        nxt = offsets[order[pos + 1]] if pos + 1 < len(order) else 0
        at = offsets[i] + next_off
        buf[at : at + 4] = nxt.to_bytes(4, "little")
    return bytes(buf), (offsets[order[0]] if order else 0)


def _sparse(areas):
    extra = b"".join(_struct_bytes("struct vfio_region_sparse_mmap_area", {"offset": o, "size": s}) for o, s in areas)
    return _cap("struct vfio_region_info_cap_sparse_mmap", lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP,
                {"nr_areas": len(areas)}, extra)


region_caps = st.one_of(
    st.tuples(st.just("sparse"), st.lists(st.tuples(u64, u64), max_size=6)),
    st.tuples(st.just("type"), st.tuples(u32, u32)),
    st.tuples(st.just("msix"), st.none()),
    st.tuples(st.just("other"), st.tuples(st.integers(4, 0xFFFF), st.binary(max_size=24))),
)


def _build_region_cap(kind, value):
    if kind == "sparse":
        return _sparse(value)
    if kind == "type":
        return _cap("struct vfio_region_info_cap_type", lib.VFIO_REGION_INFO_CAP_TYPE,
                    {"type": value[0], "subtype": value[1]})
    if kind == "msix":
        return _cap("struct vfio_info_cap_header", lib.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, {})
    return _cap("struct vfio_info_cap_header", value[0], {}, value[1])


@settings(max_examples=200)
@given(st.lists(region_caps, max_size=6), st.randoms())
def test_region_caps_round_trip(caps, rnd):
    order = list(range(len(caps)))
    rnd.shuffle(order)  # the chain order need not follow buffer order
    buf, first = _chain("struct vfio_region_info", [_build_region_cap(k, v) for k, v in caps], order)
    parsed = parse_region_caps(buf, first)
    # the last capability of a kind in chain order wins, as for the kernel's single instance
    chained = [caps[i] for i in order]
    sparse = [v for k, v in chained if k == "sparse"]
    types = [v for k, v in chained if k == "type"]
    assert parsed.sparse_areas == (tuple(SparseArea(o, s) for o, s in sparse[-1]) if sparse else None)
    assert parsed.type == (RegionType(*types[-1]) if types else None)
    assert parsed.msix_mappable == any(k == "msix" for k, _ in chained)
    assert parsed.other == tuple(v[0] for k, v in chained if k == "other")


def test_nvme_like_bar0():
    """What vfio-pci 6.1 reports for a BAR holding the MSI-X table: MSIX_MAPPABLE, no sparse areas."""
    buf, first = _chain("struct vfio_region_info", [_build_region_cap("msix", None)])
    caps = parse_region_caps(buf, first)
    assert caps.msix_mappable and caps.sparse_areas is None and caps.type is None


@settings(max_examples=300)
@given(st.binary(max_size=200), st.integers(0, 300))
def test_garbage_never_crashes(buf, first):
    """Any buffer parses or raises CapabilityChainError; nothing else escapes, nothing loops."""
    for parse in (parse_region_caps, parse_iommu_caps):
        try:
            parse(buf, first)
        except CapabilityChainError:
            pass


def test_loop_is_an_error():
    a = _build_region_cap("msix", None)
    buf, first = _chain("struct vfio_region_info", [a, a], [0, 1])
    raw = bytearray(buf)
    second = first + 8
    at = second + ffi.offsetof("struct vfio_info_cap_header", "next")
    raw[at : at + 4] = first.to_bytes(4, "little")  # second points back at the first
    with pytest.raises(CapabilityChainError, match="bad link"):
        list(walk_chain(bytes(raw), first, ffi.sizeof("struct vfio_region_info")))


def test_link_into_the_info_struct_is_an_error():
    with pytest.raises(CapabilityChainError):
        parse_region_caps(bytes(64), 8)


def test_truncated_sparse_array_is_an_error():
    buf, first = _chain("struct vfio_region_info", [_sparse([(0, 0x1000), (0x3000, 0x1000)])])
    with pytest.raises(CapabilityChainError, match="overruns"):
        parse_region_caps(buf[:-8], first)


iova_ranges = st.lists(st.tuples(u64, u64), max_size=5)


@settings(max_examples=200)
@given(iova_ranges, st.none() | u32, st.none() | st.tuples(u32, u64, u64), st.randoms())
def test_iommu_caps_round_trip(ranges, avail, migration, rnd):
    caps = []
    extra = b"".join(_struct_bytes("struct vfio_iova_range", {"start": s, "end": e}) for s, e in ranges)
    caps.append(_cap("struct vfio_iommu_type1_info_cap_iova_range", lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
                     {"nr_iovas": len(ranges)}, extra))
    if avail is not None:
        caps.append(_cap("struct vfio_iommu_type1_info_dma_avail", lib.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
                         {"avail": avail}))
    if migration is not None:
        caps.append(_cap("struct vfio_iommu_type1_info_cap_migration", lib.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION,
                         {"flags": migration[0], "pgsize_bitmap": migration[1],
                          "max_dirty_bitmap_size": migration[2]}))
    order = list(range(len(caps)))
    rnd.shuffle(order)
    buf, first = _chain("struct vfio_iommu_type1_info", caps, order)
    parsed = parse_iommu_caps(buf, first)
    assert parsed["iova_ranges"] == tuple(ranges)
    assert parsed["dma_avail"] == avail
    assert parsed["migration"] == (Migration(*migration) if migration else None)
    assert parsed["other_caps"] == ()


def test_real_6_1_x86_iommu_info_layout():
    """The chain a 6.1 kernel returns on VT-d: ranges around the MSI window, then DMA avail."""
    extra = b"".join(_struct_bytes("struct vfio_iova_range", {"start": s, "end": e})
                     for s, e in [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)])
    buf, first = _chain("struct vfio_iommu_type1_info", [
        _cap("struct vfio_iommu_type1_info_cap_iova_range", lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
             {"nr_iovas": 2}, extra),
        _cap("struct vfio_iommu_type1_info_dma_avail", lib.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, {"avail": 65535}),
    ])
    parsed = parse_iommu_caps(buf, first)
    assert parsed["iova_ranges"] == ((0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1))
    assert parsed["dma_avail"] == 65535
