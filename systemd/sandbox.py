"""Run a command under the system-call part of edge-agent.service's sandbox, without systemd.

    python3 systemd/sandbox.py [--unit systemd/edge-agent.service] -- COMMAND [ARG...]

Where PID 1 is not systemd (a container, CI) the unit cannot be started to see whether
PyAV, FFmpeg and CPython live with its filters. This builds the filters the way systemd
does, with the library systemd uses (libseccomp, through ctypes: no build step), from the
unit's own lines, loads them and execs COMMAND:

- ``SystemCallFilter=`` (in order; the first line that is not ``~`` makes an allow list,
  ``@default`` always in it, and later ``~`` lines take from it; groups as the installed
  ``systemd-analyze syscall-filter`` lists them) with ``SystemCallErrorNumber=``, and
  ENOSYS for calls systemd does not know (``@known``), as systemd >= 247 does;
- ``SystemCallArchitectures=native`` (libseccomp's default: other ABIs are killed);
- ``MemoryDenyWriteExecute=``: mmap with PROT_WRITE|PROT_EXEC, mprotect and pkey_mprotect
  with PROT_EXEC, shmat with SHM_EXEC are refused (EPERM);
- ``RestrictAddressFamilies=`` (an allow list): socket() of another family, EAFNOSUPPORT;
- ``RestrictNamespaces=yes``: unshare, setns, clone with a CLONE_NEW* flag (EPERM);
  clone3, whose flags a filter cannot read, ENOSYS so that glibc falls back to clone;
- ``RestrictRealtime=``, ``LockPersonality=``, ``RestrictSUIDSGID=``, ``NoNewPrivileges=``
  and ``UMask=``.

Not reproduced: the mount namespace (ProtectSystem=, ProtectProc=, PrivateDevices=, ...),
User=, the capability sets and the cgroup/BPF side; see README, "Hardening".
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

UNIT = Path(__file__).resolve().parent / "edge-agent.service"

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_FLTATR_CTL_NNP = 3
SCMP_CMP_NE, SCMP_CMP_LT, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 1, 2, 6, 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
S_ISUID, S_ISGID = 0o4000, 0o2000
O_CREAT = 0o100
CLONE_NEW = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
CLONE_NEWTIME = 0x00000080
SCHED_FIFO, SCHED_RR, SCHED_DEADLINE = 1, 2, 6
PER_LINUX = 0
FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}


def errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def service_lines(unit: Path) -> list[tuple[str, str]]:
    """The [Service] section's assignments in order (a key may come more than once)."""
    out, section = [], ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line:
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def syscall_groups() -> dict[str, list[str]]:
    """``@group -> members`` (names and nested groups), from the installed systemd."""
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        if raw.startswith("@"):
            current = groups.setdefault(raw.strip(), [])
        elif not raw.strip() or raw.lstrip().startswith("#"):
            current = None if not raw.strip() else current
        elif current is not None:
            current.append(raw.strip())
    return groups


def expand(names: Iterable[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for name in names:
        if name.startswith("@"):
            out |= expand(groups[name], groups)
        else:
            out.add(name)
    return out


def allowed_syscalls(filters: list[str], groups: dict[str, list[str]]) -> set[str] | None:
    """What the SystemCallFilter= lines allow; None for a deny list (not used by our unit)."""
    allow: set[str] | None = None
    for value in filters:
        deny = value.startswith("~")
        names = expand(value.lstrip("~").split(), groups)
        if allow is None:
            if deny:
                raise SystemExit("sandbox.py: a SystemCallFilter= deny list is not supported")
            allow = expand(["@default"], groups) | names
        elif deny:
            allow -= names
        else:
            allow |= names
    return allow


class Filter:
    def __init__(self, default_action: int) -> None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        self.lib = ctypes.CDLL(name, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
        self.lib.seccomp_rule_add_array.argtypes = (
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(ArgCmp),
        )
        self.lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
        self.lib.seccomp_load.argtypes = (ctypes.c_void_p,)
        self.ctx = self.lib.seccomp_init(ctypes.c_uint32(default_action))
        if not self.ctx:
            raise OSError("seccomp_init failed")
        self.lib.seccomp_attr_set(self.ctx, SCMP_FLTATR_CTL_NNP, 1)

    def rule(self, action: int, syscall: str, *cmps: tuple[int, int, int, int]) -> None:
        """Add a rule; a call this architecture lacks (mmap2 on x86-64) is skipped."""
        nr = self.lib.seccomp_syscall_resolve_name(syscall.encode())
        if nr < 0:
            return
        args = (ArgCmp * max(1, len(cmps)))(*(ArgCmp(*c) for c in cmps))
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), args)
        if rc not in (0, -errno.EEXIST, -errno.EACCES):  # EACCES: same as the default
            raise OSError(-rc, f"seccomp_rule_add({syscall})")

    def load(self) -> None:
        rc = self.lib.seccomp_load(self.ctx)
        if rc:
            raise OSError(-rc, "seccomp_load")


def syscall_filter(allow: set[str], known: set[str], error: int) -> Filter:
    f = Filter(errno_action(errno.ENOSYS))  # not in @known: ENOSYS, as systemd does
    for name in sorted(known | allow):
        f.rule(SCMP_ACT_ALLOW if name in allow else errno_action(error), name)
    return f


def deny_write_execute(f: Filter, eperm: int) -> None:
    wx = PROT_WRITE | PROT_EXEC
    for call in ("mmap", "mmap2"):
        f.rule(eperm, call, (2, SCMP_CMP_MASKED_EQ, wx, wx))
    for call in ("mprotect", "pkey_mprotect"):
        f.rule(eperm, call, (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
    f.rule(eperm, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))


def restrict_families(f: Filter, names: str) -> None:
    allowed = sorted(FAMILIES[name] for name in names.split())
    refuse = errno_action(errno.EAFNOSUPPORT)
    f.rule(refuse, "socket", (0, SCMP_CMP_LT, allowed[0], 0))
    f.rule(refuse, "socket", (0, SCMP_CMP_GT, allowed[-1], 0))
    for family in range(allowed[0] + 1, allowed[-1]):
        if family not in allowed:
            f.rule(refuse, "socket", (0, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, family))


def restrict_namespaces(f: Filter, eperm: int) -> None:
    f.rule(eperm, "unshare")
    f.rule(eperm, "setns")
    for flag in (*(1 << b for b in range(32) if CLONE_NEW >> b & 1), CLONE_NEWTIME):
        f.rule(eperm, "clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
    f.rule(errno_action(errno.ENOSYS), "clone3")


def restrict_realtime(f: Filter, eperm: int) -> None:
    for policy in (SCHED_FIFO, SCHED_RR, SCHED_DEADLINE):
        f.rule(eperm, "sched_setscheduler", (1, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, policy))


def lock_personality(f: Filter, eperm: int) -> None:  # any but the one we run with
    f.rule(eperm, "personality", (0, SCMP_CMP_NE, PER_LINUX, 0))


def restrict_suid_sgid(f: Filter, eperm: int) -> None:
    for bit in (S_ISUID, S_ISGID):
        f.rule(eperm, "chmod", (1, SCMP_CMP_MASKED_EQ, bit, bit))
        f.rule(eperm, "fchmod", (1, SCMP_CMP_MASKED_EQ, bit, bit))
        f.rule(eperm, "fchmodat", (2, SCMP_CMP_MASKED_EQ, bit, bit))
        f.rule(eperm, "creat", (1, SCMP_CMP_MASKED_EQ, bit, bit))
        creating = (1, SCMP_CMP_MASKED_EQ, O_CREAT, O_CREAT)
        f.rule(eperm, "open", creating, (2, SCMP_CMP_MASKED_EQ, bit, bit))
        creating = (2, SCMP_CMP_MASKED_EQ, O_CREAT, O_CREAT)
        f.rule(eperm, "openat", creating, (3, SCMP_CMP_MASKED_EQ, bit, bit))


BOOLEANS = {
    "MemoryDenyWriteExecute": deny_write_execute,
    "RestrictNamespaces": restrict_namespaces,
    "RestrictRealtime": restrict_realtime,
    "LockPersonality": lock_personality,
    "RestrictSUIDSGID": restrict_suid_sgid,
}


def restrictions(settings: dict[str, str]) -> Filter:
    """A second filter (the kernel applies the stricter verdict), default allow."""
    f = Filter(SCMP_ACT_ALLOW)
    for key, add in BOOLEANS.items():
        if settings.get(key) == "yes":
            add(f, errno_action(errno.EPERM))
    if families := settings.get("RestrictAddressFamilies"):
        restrict_families(f, families)
    return f


def apply(unit: Path) -> None:
    """Load the unit's filters into this process (and so into what it execs)."""
    lines = service_lines(unit)
    settings = dict(lines)
    if settings.get("SystemCallArchitectures", "native") != "native":
        raise SystemExit("sandbox.py: only SystemCallArchitectures=native is supported")
    groups = syscall_groups()
    filters = [v for k, v in lines if k == "SystemCallFilter" and v]
    allow = allowed_syscalls(filters, groups)
    if umask := settings.get("UMask"):
        os.umask(int(umask, 8))
    error = getattr(errno, settings.get("SystemCallErrorNumber", "EPERM"))
    # The restrictions go on first: the allow list may not let seccomp() itself through.
    restrictions(settings).load()
    if allow is not None:
        syscall_filter(allow, expand(["@known"], groups), error).load()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unit", type=Path, default=UNIT)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    apply(args.unit)
    os.execvp(command[0], command)  # noqa: S606 - exec is the point
    return 127


if __name__ == "__main__":
    sys.exit(main())
