"""VM config files (TOML) with the same fields as ``pykvm run``'s options.

Example ``vm.toml``::

    kernel = "/boot/vmlinuz-6.1.0-13-amd64"
    initrd = "initrd.img"            # relative paths are relative to this file
    cmdline = "console=ttyS0 reboot=k panic=-1"
    memory = "512M"                  # or an integer number of bytes (512 is 512 bytes, not MiB)
    cpus = 2
    console = "stdio"                # stdio | file:PATH | none; a relative PATH is relative to this file
    stats = true
    marker = "login:"
    timeout = 60
    vfio = ["0000:00:05.0"]
    direct = true                    # a bzImage's kernel decompressed by pykvm (cached), as --direct

Options given on the command line override the file's values; paths given on the command
line (--kernel, --initrd, --console file:PATH) are relative to the current directory, as usual.
"""
from __future__ import annotations

import os
from typing import Any, Dict

from pykvm.vmm.layout import MIN_MEMORY
from pykvm.vmm.machine import CONFIG_FIELDS, MachineConfig, MachineError

_TYPES: Dict[str, tuple] = {f.name: f.types for f in CONFIG_FIELDS}  # MachineConfig's fields, in order
_PATHS = ("kernel", "initrd")
_FILE_CONSOLE = "file:"


def load_config(path: str) -> Dict[str, Any]:
    """Read ``path`` and return its fields, checked against MachineConfig, paths made absolute."""
    import tomllib  # here, not at the top: `pykvm run` without --config does not pay for the parser

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise MachineError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise MachineError(f"config file {path!r} is a directory: give the path of a TOML file") from None
    except OSError as exc:
        raise MachineError(f"cannot read config file {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise MachineError(f"config file {path!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                           f"{exc.start}): is it a TOML file?") from None
    except tomllib.TOMLDecodeError as exc:
        raise MachineError(f"config file {path!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise MachineError(f"config file {path!r}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_TYPES)}")
    base = os.path.dirname(os.path.abspath(path))
    for key, value in data.items():
        types = _TYPES[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            raise MachineError(f"config file {path!r}: {key} must be {want}, not {type(value).__name__} ({value!r})")
        if key == "vfio" and not all(isinstance(v, str) for v in value):
            raise MachineError(f"config file {path!r}: vfio must be a list of strings (PCI addresses)")
        if key in _PATHS:
            if not value:
                raise MachineError(f"config file {path!r}: {key} is empty; give a path, or leave the key out"
                                   + (" for no initrd" if key == "initrd" else ""))
            data[key] = os.path.join(base, os.path.expanduser(value))
        if key == "console" and value.startswith(_FILE_CONSOLE) and len(value) > len(_FILE_CONSOLE):
            data[key] = _FILE_CONSOLE + os.path.join(base, os.path.expanduser(value[len(_FILE_CONSOLE):]))
        if key == "memory" and isinstance(value, int) and not isinstance(value, bool) and value < MIN_MEMORY:
            raise MachineError(f"config file {path!r}: memory = {value} is {value} bytes (an integer in a config "
                               f"file counts bytes), below the minimum of {MIN_MEMORY >> 20}M; for {value} MiB "
                               f"write memory = \"{value}M\"")
    return data


def merge(file_fields: Dict[str, Any], overrides: Dict[str, Any]) -> MachineConfig:
    """A MachineConfig from a file's fields and command-line values (``None`` = not given)."""
    fields = dict(file_fields)
    fields.update({k: v for k, v in overrides.items() if v is not None and v != []})
    if "kernel" not in fields:
        raise MachineError("no kernel: give --kernel or `kernel = ...` in the config file")
    return MachineConfig(**fields)
