"""Parsers of structured host inputs: PCI addresses, kernel command lines, Kconfig,
sizes, config space, sysfs resource files, pci.ids."""
from __future__ import annotations

import struct

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from pykvm.host.bdf import BdfError, parse_bdf
from pykvm.host.check import parse_size
from pykvm.host.config_space import parse_capabilities, parse_resources
from pykvm.host.kernel import Cmdline, parse_cmdline, parse_kconfig, parse_kmsg
from pykvm.host.pci_ids import PciIds
from tests.unit.host.sysfs_tree import PCI_IDS

# -- BDF ------------------------------------------------------------------------


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0x1F), st.integers(0, 7), st.booleans())
def test_bdf_canonical_form_round_trips(domain, bus, dev, fn, upper):
    text = f"{domain:04x}:{bus:02x}:{dev:02x}.{fn}"
    assert parse_bdf(text.upper() if upper else text) == text
    assert parse_bdf(parse_bdf(text)) == text


@given(st.integers(0, 0xFF), st.integers(0, 0x1F), st.integers(0, 7))
def test_bdf_without_domain_means_domain_0(bus, dev, fn):
    assert parse_bdf(f"{bus:x}:{dev:x}.{fn}") == f"0000:{bus:02x}:{dev:02x}.{fn}"


@pytest.mark.parametrize("bad", ["", "05.0", "0000:00:05", "0000:00:05.8", "0000:00:20.0", "00:05.0.1",
                                 "g0:05.0", "00000:00:05.0", "0000:000:05.0", "0000:00:05.0; rm -rf /"])
def test_bdf_rejects_malformed_with_a_fix(bad):
    with pytest.raises(BdfError) as err:
        parse_bdf(bad)
    assert "not a PCI address" in str(err.value) and "0000:00:05.0" in err.value.fix


def _hex(max_size: int) -> st.SearchStrategy[str]:
    return st.text("0123456789abcdefABCDEF", min_size=1, max_size=max_size)


_space = st.sampled_from(["", "", " ", "\t", "\n", " \n"])
# (domain or None, bus, device, function, leading, trailing): device up to 0xff and function up to
# 9, so that both of parse_bdf's range checks refuse some
_bdf_parts = st.tuples(st.none() | _hex(4), _hex(2), _hex(2), st.sampled_from("0123456789"), _space, _space)


def _bdf_text(parts) -> str:
    domain, bus, dev, fn, lead, trail = parts
    return f"{lead}{'' if domain is None else domain + ':'}{bus}:{dev}.{fn}{trail}"


def _spliced(args) -> str:
    text, junk, at = args
    at = min(at, len(text))
    return text[:at] + junk + text[at:]


@given(st.one_of(
    st.text(max_size=20),
    _bdf_parts.map(_bdf_text),  # shaped like a PCI address
    st.tuples(_bdf_parts.map(_bdf_text), st.text(min_size=1, max_size=3), st.integers(0, 16)).map(_spliced),
))
def test_bdf_any_text_is_either_canonical_or_rejected(text):
    try:
        canon = parse_bdf(text)
    except BdfError:
        event("rejected")
        return
    event("canonical")
    assert parse_bdf(canon) == canon and len(canon) == 12 and canon == canon.lower()
    assert parse_bdf(canon.upper()) == canon


@given(_bdf_parts)
def test_bdf_shaped_text_is_taken_exactly_when_device_and_function_fit(parts):
    domain, bus, dev, fn, _, _ = parts
    text = _bdf_text(parts)
    if int(dev, 16) <= 0x1F and int(fn) <= 7:
        event("taken")
        assert parse_bdf(text) == f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{fn}"
    else:
        event("refused: device" if int(dev, 16) > 0x1F else "refused: function")
        with pytest.raises(BdfError):
            parse_bdf(text)


# -- kernel command line ----------------------------------------------------------

_name = st.from_regex(r"[a-z][a-z0-9_.\-]{0,10}", fullmatch=True).filter(lambda n: n != "--")
_plain = st.from_regex(r'[A-Za-z0-9_,=./:\-]{0,10}', fullmatch=True)
_spaced = st.from_regex(r'[A-Za-z0-9_ ,]{1,10}', fullmatch=True)
_param = st.tuples(_name, st.one_of(st.none(), _plain, _spaced))


def _render(name, value):
    if value is None:
        return name
    if " " in value or value == "":
        return f'{name}="{value}"'
    return f"{name}={value}"


@given(st.lists(_param, max_size=8), st.sampled_from([" ", "  ", "\t", "\n"]))
def test_cmdline_round_trips_through_the_kernels_quoting(params, sep):
    text = sep.join(_render(n, v) for n, v in params) + "\n"
    assert parse_cmdline(text) == params


@given(st.lists(_param, max_size=4), st.lists(_param, max_size=4))
def test_cmdline_stops_at_double_dash(kernel, init):
    text = " ".join([_render(n, v) for n, v in kernel] + ["--"] + [_render(n, v) for n, v in init])
    assert parse_cmdline(text) == kernel


def test_cmdline_quoting_forms_and_lookup():
    params = parse_cmdline('"dyndbg=file x.c +p" intel_iommu=on,sm_on a="b c" pci-acs-override=downstream quiet')
    assert params[0] == ("dyndbg", "file x.c +p")
    line = Cmdline(params)
    assert line.options("intel_iommu") == ["on", "sm_on"]
    assert line.get("pci_acs_override") == "downstream"  # '-' and '_' are the same to the kernel
    assert line.get("quiet") == "" and line.get("missing") is None
    assert Cmdline(parse_cmdline("iommu=off iommu=pt")).get("iommu") == "pt"  # the last one wins


# -- Kconfig ---------------------------------------------------------------------

_symbol = st.from_regex(r"CONFIG_[A-Z0-9_]{1,16}", fullmatch=True)
_value = st.one_of(st.sampled_from(["y", "m", "n"]), st.integers(0, 1 << 20).map(str),
                   st.from_regex(r'[a-z0-9 ./_-]{0,12}', fullmatch=True).map(lambda s: f'"{s}"'))


@given(st.dictionaries(_symbol, _value, max_size=12))
def test_kconfig_round_trips(options):
    text = "#\n# Automatically generated file; DO NOT EDIT.\n#\n"
    text += "".join(f"# {k} is not set\n" if v == "n" else f"{k}={v}\n" for k, v in options.items())
    parsed = parse_kconfig(text)
    assert parsed == {k: v[1:-1] if v.startswith('"') else v for k, v in options.items()}


# -- sizes -----------------------------------------------------------------------

@given(st.integers(1, 1 << 20), st.sampled_from([("K", 10), ("M", 20), ("G", 30), ("T", 40)]),
       st.sampled_from(["", "B", "iB"]), st.booleans())
def test_size_units_are_binary(n, unit, suffix, lower):
    text = f"{n}{unit[0].lower() if lower else unit[0]}{suffix}"
    assert parse_size(text) == n << unit[1]


def test_size_bare_number_is_mib_and_garbage_is_refused():
    assert parse_size("512") == 512 << 20
    assert parse_size("4096B") == 4096  # bytes, as `pykvm run --memory` reads it (host check read 4 GiB)
    for bad in ("", "G", "1.5G", "-1G", "12X"):
        with pytest.raises(ValueError):
            parse_size(bad)


# -- config space, resources, kmsg, pci.ids ----------------------------------------

@given(st.binary(max_size=4096))
def test_capability_walk_never_fails_or_loops_on_any_bytes(config):
    caps = parse_capabilities(config)
    assert len(caps) <= 64 + 1024
    assert all(c.offset < len(config) for c in caps)


def test_capability_walk_reads_a_loop_once():
    cfg = bytearray(256)
    struct.pack_into("<H", cfg, 6, 0x10)
    cfg[0x34] = 0x40
    cfg[0x40:0x42] = bytes([0x11, 0x50])
    cfg[0x50:0x52] = bytes([0x05, 0x40])  # points back to 0x40
    assert [(c.offset, c.name) for c in parse_capabilities(bytes(cfg))] == [(0x40, "MSI-X"), (0x50, "MSI")]


def test_extended_capabilities_and_acs_bits():
    cfg = bytearray(4096)
    struct.pack_into("<I", cfg, 0x100, 0x000D | 1 << 16 | 0x148 << 20)  # ACS, next at 0x148
    struct.pack_into("<HH", cfg, 0x104, 0x1F, 0x1D)  # cap SV TB RR CR UF, ctl SV RR CR UF
    struct.pack_into("<I", cfg, 0x148, 0x0003 | 1 << 16)  # serial number, end
    struct.pack_into("<II", cfg, 0x14C, 0x89ABCDEF, 0x01234567)
    caps = parse_capabilities(bytes(cfg))
    assert [c.name for c in caps] == ["Access Control Services", "Device Serial Number"]
    assert "ACSCtl: SrcValid+ TransBlk- ReqRedir+ CmpltRedir+ UpstreamFwd+" in caps[0].detail
    assert caps[1].detail == "0123456789abcdef"


def test_resources_describe_bars_and_rom():
    text = ("0x00000000febf0000 0x00000000febf3fff 0x0000000000140204\n"
            "0x000000000000c000 0x000000000000c01f 0x0000000000040101\n"
            "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 1
            + "0x0000008000000000 0x00000080000fffff 0x000000000014220c\n"
            + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 2
            + "0x00000000feb80000 0x00000000febbffff 0x0000000000046200\n"
            + "0x00000000fe000000 0x00000000fe0fffff 0x0000000000000200\n")  # a bridge window: ignored
    regions = parse_resources(text)
    assert [(r.index, r.kind, r.size, r.flags) for r in regions] == [
        (0, "Memory", 0x4000, "64-bit, non-prefetchable"),
        (1, "I/O ports", 0x20, ""),
        (3, "Memory", 0x100000, "64-bit, prefetchable"),
        (6, "Expansion ROM", 0x40000, ""),
    ]


def test_kmsg_records_and_plain_lines():
    text = "6,1,100,-;DMAR: IOMMU enabled\n SUBSYSTEM=pci\n DEVICE=+pci:0000:00:05.0\n4,2,200,c;a;b\nplain line\n"
    assert parse_kmsg(text) == ["DMAR: IOMMU enabled", "a;b", "plain line"]




def test_pci_ids_names_and_class_fallback():
    ids = PciIds.parse(PCI_IDS)
    assert ids.vendor_name(0x1B36) == "Red Hat, Inc."
    assert ids.device_name(0x1B36, 0x0010) == "QEMU NVM Express Controller"
    assert ids.device_name(0x1AF4, 0x1100) is None  # a subsystem line is not a device
    assert ids.class_name(0x010802) == "Non-Volatile memory controller"
    assert ids.prog_if_name(0x010802) == "NVM Express"
    builtin = PciIds()
    assert builtin.class_name(0x010802) == "Non-Volatile memory controller"
    assert builtin.class_name(0x060400) == "PCI bridge"
    assert builtin.class_name(0x420000) == "Class 4200"
    assert builtin.vendor_name(0x1B36) is None


@given(st.text(max_size=300))
def test_pci_ids_parser_survives_any_text(text):
    PciIds.parse(text).class_name(0x010802)
