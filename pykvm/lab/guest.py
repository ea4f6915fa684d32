"""What runs inside L1, and how the host reads L1's console.

L1 boots Debian's kernel with our initramfs. Its ``/init`` (busybox sh) mounts the host's
root (9p tag ``hostroot``, read-only) and the per-run writable share (tag ``labout``),
loads the modules, then runs ``job.sh`` from the share inside a chroot of the host root,
so the command sees the host's Python and checkout, with the lab kernel's config at
``/boot/config-<release>`` and, where the host has a ``/lib/modules`` to mount over, its
modules at ``/lib/modules/<release>`` (paths from the files ``kernel-config`` and
``kernel-modules`` in the job dir; ``$PYKVM_LAB_MODULES_DIR`` names the modules in any
case), and a writable ``/run``. ``/tmp`` there is a fresh tmpfs
(with the host's ``/tmp`` entries listed in ``tmp-keep`` bound back, so a checkout under
``/tmp`` stays visible) and the writable share appears at ``/tmp/lab-out``.

The console protocol: init prints ``PYKVM-LAB-<token>-BEGIN`` before the command and
``PYKVM-LAB-<token>-END rc=<status>`` after it, then powers off. The token is random per
run, so a command's own output cannot fake the end of the run. Before ``BEGIN``, a line
starting with ``PYKVM-LAB-FAIL`` reports that init itself failed.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from pykvm.lab.devices import LAB_OUT_GUEST
from pykvm.lab.initramfs import LOAD_MODULES

# Modules L1 needs: the 9p share (virtio), KVM on TCG's SVM, VFIO with the type1 IOMMU
# backend (vfio-pci does not pull it in: without it VFIO_SET_IOMMU fails with ENODEV)
# and the NVMe driver, so L1 can read the disk before a test hands it to vfio-pci.
L1_MODULES = [
    "virtio_pci", "9pnet_virtio", "9p", "kvm_amd", "vfio_pci", "vfio_iommu_type1", "nvme",
]

HOST_TAG = "hostroot"
OUT_TAG = "labout"
JOB_DIR = ".pykvm"          # inside the writable share: token, job.sh, tmp-keep, kernel-*
FAIL_PREFIX = "PYKVM-LAB-FAIL"

L1_INIT = r"""#!/bin/sh
# pykvm lab: init of L1 (busybox). Mount, load modules, chroot into the host, run job.
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "PYKVM-LAB-FAIL $*"; poweroff -f; sleep 10; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
__LOAD_MODULES__ || echo "pykvm-lab: warning: some modules did not load"
opts=trans=virtio,version=9p2000.L,msize=262144
mkdir -p /host /out /orig-tmp
mount -t 9p -o $opts,ro,cache=loose __HOST_TAG__ /host || fail "cannot mount the host root (9p tag __HOST_TAG__)"
mount -t 9p -o $opts __OUT_TAG__ /out || fail "cannot mount the writable share (9p tag __OUT_TAG__)"
job=/out/__JOB_DIR__
token=$(cat $job/token) || fail "no run token in the writable share"
# The lab kernel's modules and config where tools in the chroot look for them; a writable /run.
release=$(uname -r)
if [ -f $job/kernel-modules ] && [ -d /host/lib/modules ]; then
    mount -t tmpfs -o mode=755 tmpfs /host/lib/modules && mkdir -p /host/lib/modules/$release \
        && mount --bind "/host$(cat $job/kernel-modules)" /host/lib/modules/$release \
        || echo "pykvm-lab: warning: cannot show the kernel's modules at /lib/modules/$release"
fi
if [ -f $job/kernel-config ]; then
    mount -t tmpfs -o mode=755 tmpfs /host/boot && cp "/host$(cat $job/kernel-config)" /host/boot/config-$release \
        || echo "pykvm-lab: warning: cannot show the kernel's config at /boot/config-$release"
fi
mount -t tmpfs -o mode=755 tmpfs /host/run || echo "pykvm-lab: warning: /run stays read-only"
mount --bind /host/tmp /orig-tmp
mount -t tmpfs -o mode=1777 tmpfs /host/tmp || fail "cannot mount tmpfs on /tmp"
for name in $(cat $job/tmp-keep 2>/dev/null); do
    mkdir -p "/host/tmp/$name" && mount --bind "/orig-tmp/$name" "/host/tmp/$name"
done
mkdir -p /host__OUT__ && mount --bind /out /host__OUT__ || fail "cannot bind the writable share"
mount --rbind /proc /host/proc && mount --rbind /sys /host/sys && mount --rbind /dev /host/dev \
    || fail "cannot bind /proc, /sys, /dev into the host root"
echo "PYKVM-LAB-$token-BEGIN"
setsid cttyhack chroot /host /bin/sh __OUT__/__JOB_DIR__/job.sh
rc=$?
echo "PYKVM-LAB-$token-END rc=$rc"
sync
poweroff -f
"""


def l1_init_script() -> str:
    """The ``/init`` of L1's initramfs."""
    return (
        L1_INIT.replace("__LOAD_MODULES__", LOAD_MODULES)
        .replace("__HOST_TAG__", HOST_TAG)
        .replace("__OUT_TAG__", OUT_TAG)
        .replace("__JOB_DIR__", JOB_DIR)
        .replace("__OUT__", LAB_OUT_GUEST)
    )


def job_script(argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
    """``job.sh``: enter ``cwd`` and exec ``argv`` with exactly ``env`` (shell-quoted)."""
    if not argv:
        raise ValueError("empty command")
    home = env.get("HOME", "/tmp/home")
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    return (
        "# pykvm lab job, run by L1's init inside the chroot\n"
        f"mkdir -p {shlex.quote(home)}\n"
        f"cd {shlex.quote(cwd)} || {{ echo 'pykvm-lab: no such directory in L1: {cwd}' >&2; exit 125; }}\n"
        f"exec env -i {assignments} {shlex.join(argv)}\n"
    )


def tmp_keep(paths: Sequence[str]) -> List[str]:
    """Top-level names under ``/tmp`` that must stay visible in L1 (e.g. a checkout there)."""
    keep = []
    for path in paths:
        parts = path.split("/")
        if len(parts) > 2 and parts[0] == "" and parts[1] == "tmp" and parts[2]:
            if parts[2] not in keep and parts[2] != "lab-out":
                keep.append(parts[2])
    return keep


@dataclass
class ConsoleParser:
    """Splits L1's console into boot noise, the command's output and its exit status."""

    token: str
    console: List[str] = field(default_factory=list)
    output: List[str] = field(default_factory=list)
    began: bool = False
    returncode: Optional[int] = None
    failure: Optional[str] = None

    def __post_init__(self) -> None:
        self._begin = f"PYKVM-LAB-{self.token}-BEGIN"
        self._end = re.compile(rf"PYKVM-LAB-{re.escape(self.token)}-END rc=(\d+)$")

    @property
    def done(self) -> bool:
        return self.returncode is not None

    def feed(self, line: str) -> bool:
        """Take one console line (without newline); True if it is command output."""
        line = line.rstrip("\r\n")
        self.console.append(line)
        if self.done:
            return False
        if not self.began:
            if line.endswith(self._begin):
                self.began = True
            elif line.startswith(FAIL_PREFIX) and self.failure is None:
                self.failure = line[len(FAIL_PREFIX):].strip()
            return False
        match = self._end.search(line)
        if match:
            # The command's last line may lack a newline: keep what precedes the marker.
            head = line[: match.start()]
            if head:
                self.output.append(head)
            self.returncode = int(match.group(1))
            return False
        self.output.append(line)
        return True


def tail(lines: Sequence[str], count: int = 80) -> str:
    """The last ``count`` lines, for error messages."""
    return "\n".join(lines[-count:])


# Host variables a command in L1 keeps: where Python and its packages are, the locale,
# and test settings (CI picks Hypothesis' CI profile in tests/conftest.py).
_PASSED_THROUGH = (
    "PATH", "LANG", "LC_ALL", "PYTHONPATH", "PYENV_ROOT", "PYENV_VERSION", "VIRTUAL_ENV",
    "CI", "HYPOTHESIS_PROFILE",
)


def lab_env(host_env: Mapping[str, str], extra: Optional[Mapping[str, str]] = None, *, interactive: bool = False) -> Dict[str, str]:
    """The environment of a command in L1: the host's PATH, Python and PYKVM_* settings,
    a writable HOME, and the lab's own variables."""
    env = {
        k: v
        for k, v in host_env.items()
        if k in _PASSED_THROUGH or k.startswith("PYKVM_")
    }
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(
        HOME="/tmp/home",
        TMPDIR="/tmp",
        TERM=host_env.get("TERM", "linux") if interactive else "dumb",
        PYTHONPYCACHEPREFIX="/tmp/pycache",  # bytecode on L1's tmpfs, never in the read-only checkout
        PYKVM_IN_LAB="1",
        PYKVM_LAB_OUT=LAB_OUT_GUEST,
    )
    env.update(extra or {})
    return env
