"""pjsip's identifiers from the operating system's random source, not glibc ``rand()``.

The pinned wheel builds pjlib's GUIDs (``pj_generate_unique_string``: Call-IDs, tags,
Via branches) and its other ``pj_rand()`` values (CSeq, STUN ids) from the C
library's ``rand()``, seeded once from a 32-bit hash (review 122).  glibc's
``rand()`` is a lagged additive generator: every MESSAGE a phone sends hands its
recipient 25 consecutive outputs, and outputs 31 and 3 apart add up, so later
identifiers follow from earlier ones.  A certificate NOTIFY is matched by our
SUBSCRIBE's Call-ID and From tag, and a proxy's branch notes by the Via branch: an
identifier a stranger can work out is a door.

:func:`install` points the extension's import of ``rand`` (its GOT slot) at a
function that returns ``secrets.randbits(31)``: the same range as glibc's ``rand()``
(0 to ``RAND_MAX``), so every caller's arithmetic is unchanged.  SRTP keys never came
from here (pjmedia takes them from OpenSSL's ``RAND_bytes``).  Linux, ELF64 only;
:func:`install` says why when it cannot, and the phone's gate refuses to start an E2M
phone then (fail closed).  The slot is put back at interpreter exit, once pjsua is
gone, so no pjsip thread calls into a finalised interpreter.
"""

from __future__ import annotations

import atexit
import ctypes as C
import mmap
import os
import secrets
import struct
import sys
from dataclasses import dataclass

__all__ = ["RandomSourceError", "Installed", "install", "installed"]

_RAND_MAX = (1 << 31) - 1
_SHT_RELA, _SHT_DYNSYM = 4, 11
_PT_GNU_RELRO = 0x6474E552
# e_machine -> (JUMP_SLOT, GLOB_DAT) relocation types
_SLOT_TYPES = {62: (7, 6),          # x86-64
               183: (1026, 1025)}   # AArch64
_PROT_READ, _PROT_WRITE = 1, 2


class RandomSourceError(RuntimeError):
    """pjsip's ``rand()`` could not be replaced; the reason is the message."""


@dataclass(frozen=True)
class Installed:
    """Where :func:`install` wrote: the library and the GOT slots replaced."""

    library: str
    slots: tuple[int, ...]


_CALLBACK_TYPE = C.CFUNCTYPE(C.c_int)


def _strong_rand() -> int:
    # Kept minimal: it runs inside pjsip, maybe on a pjsip thread, with pjsip's locks held.
    return secrets.randbits(31)


_CALLBACK = _CALLBACK_TYPE(_strong_rand)
_STATE: dict[str, object] = {}


def _rand_slots(path: str) -> tuple[list[int], tuple[int, int] | None]:
    """The link-time addresses of the GOT slots through which ``path`` calls ``rand``,
    and its RELRO range (start, end) if it has one."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as elf:
        if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
            raise RandomSourceError(f"{path} is not a little-endian ELF64 file")
        (machine,) = struct.unpack_from("<H", elf, 18)
        if machine not in _SLOT_TYPES:
            raise RandomSourceError(f"{path}: machine {machine} is not one this module knows")
        phoff, shoff = struct.unpack_from("<QQ", elf, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", elf, 54)
        relro = None
        for i in range(phnum):
            p_type, _, _, p_vaddr, _, _, p_memsz, _ = struct.unpack_from(
                "<IIQQQQQQ", elf, phoff + i * phentsize)
            if p_type == _PT_GNU_RELRO:
                relro = (p_vaddr, p_vaddr + p_memsz)
        sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize)
                    for i in range(shnum)]
        dynsym = next((s for s in sections if s[1] == _SHT_DYNSYM), None)
        if dynsym is None:
            raise RandomSourceError(f"{path} has no dynamic symbol table")
        strtab = sections[dynsym[6]]

        def name(index: int) -> bytes:
            (st_name,) = struct.unpack_from("<I", elf, dynsym[4] + index * dynsym[9])
            start = strtab[4] + st_name
            return elf[start:elf.find(b"\0", start)]

        kinds = _SLOT_TYPES[machine]
        slots = []
        for section in sections:
            if section[1] != _SHT_RELA:
                continue
            offset, size, entsize = section[4], section[5], section[9] or 24
            for at in range(offset, offset + size, entsize):
                r_offset, r_info = struct.unpack_from("<QQ", elf, at)
                if (r_info & 0xFFFFFFFF) in kinds and name(r_info >> 32) == b"rand":
                    slots.append(r_offset)
        return slots, relro


class _DlInfo(C.Structure):
    _fields_ = [("dli_fname", C.c_char_p), ("dli_fbase", C.c_void_p),
                ("dli_sname", C.c_char_p), ("dli_saddr", C.c_void_p)]


def _load_base(library: C.CDLL, symbol: str) -> int:
    libc = C.CDLL(None)
    info = _DlInfo()
    address = C.cast(getattr(library, symbol), C.c_void_p)
    if not libc.dladdr(address, C.byref(info)) or not info.dli_fbase:
        raise RandomSourceError(f"dladdr found no library for {symbol}")
    return info.dli_fbase


def _write_slot(address: int, value: int, relro: bool) -> int:
    """Store ``value`` in the pointer at ``address``; return what was there."""
    libc = C.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [C.c_void_p, C.c_size_t, C.c_int]
    page = address & ~(mmap.PAGESIZE - 1)
    if relro and libc.mprotect(page, mmap.PAGESIZE, _PROT_READ | _PROT_WRITE) != 0:
        raise RandomSourceError(f"mprotect failed: {os.strerror(C.get_errno())}")
    try:
        slot = C.c_void_p.from_address(address)
        old = slot.value or 0
        slot.value = value
    finally:
        if relro:
            libc.mprotect(page, mmap.PAGESIZE, _PROT_READ)
    return old


def _pj_rand_is_ours(library: C.CDLL) -> bool:
    """Whether ``pj_rand`` no longer follows glibc: after the same ``srand`` seed, its
    outputs and ``rand()``'s own must differ (equal by chance: 2^-124)."""
    libc = C.CDLL(None)
    library.pj_rand.restype = C.c_int
    libc.srand(1)
    through_pjsip = [library.pj_rand() for _ in range(4)]
    libc.srand(1)
    glibcs = [libc.rand() for _ in range(4)]
    libc.srand(secrets.randbits(32))
    return through_pjsip != glibcs and all(0 <= v <= _RAND_MAX for v in through_pjsip)


def install(path: str | None = None) -> Installed:
    """Replace the ``rand()`` pjsip calls (in the pjsua2 extension at ``path``, by
    default the loaded wheel's) with the OS random source; idempotent.  Raises
    :class:`RandomSourceError` when it cannot, or when ``pj_rand`` still follows glibc."""
    done = _STATE.get("installed")
    if isinstance(done, Installed):
        return done
    if not sys.platform.startswith("linux"):
        raise RandomSourceError(f"replacing rand() is done on Linux only, not {sys.platform}")
    if path is None:
        from pjsua2 import _pjsua2

        path = _pjsua2.__file__
    library = C.CDLL(path)
    slots, relro = _rand_slots(path)
    if not slots:
        raise RandomSourceError(f"{os.path.basename(path)} does not import rand()")
    base = _load_base(library, "pj_rand")
    target = C.cast(_CALLBACK, C.c_void_p).value
    written = []
    for offset in slots:
        inside = relro is not None and relro[0] <= offset < relro[1]
        address = base + offset
        written.append((address, _write_slot(address, target, inside), inside))
    _STATE["written"] = written
    if not _pj_rand_is_ours(library):
        _restore()
        raise RandomSourceError("pj_rand() still follows glibc's rand() after the GOT write")
    done = Installed(path, tuple(address for address, _, _ in written))
    _STATE["installed"] = done
    return done


def installed() -> Installed | None:
    """What :func:`install` replaced in this process, or None."""
    done = _STATE.get("installed")
    return done if isinstance(done, Installed) else None


def _restore() -> None:
    for address, old, inside in _STATE.pop("written", []):   # type: ignore[attr-defined]
        _write_slot(address, old, inside)
    _STATE.pop("installed", None)


def restore_at_exit() -> None:
    """Put glibc's ``rand()`` back (at interpreter exit, after pjsua was destroyed)."""
    _restore()


atexit.register(restore_at_exit)
