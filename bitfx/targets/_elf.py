"""A small ELF reader: just what the cross-compile checks need, so they need no binutils."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

EM_ARM, EM_X86_64, EM_AARCH64 = 40, 62, 183
ET_REL, ET_EXEC, ET_DYN = 1, 2, 3
_PT_LOAD, _PT_TLS = 1, 7
_SHT_SYMTAB, _SHT_DYNAMIC, _SHT_DYNSYM = 2, 6, 11
_SHT_GNU_VERNEED = 0x6FFFFFFE
_DT_NEEDED, _DT_SONAME, _DT_TEXTREL, _DT_FLAGS = 1, 14, 22, 30
_DF_TEXTREL = 0x4
_STB_GLOBAL, _STB_WEAK = 1, 2
MACHINE_NAMES = {EM_ARM: "ARM", EM_X86_64: "x86-64", EM_AARCH64: "AArch64"}
TYPE_NAMES = {ET_REL: "relocatable", ET_EXEC: "executable", ET_DYN: "shared object"}


@dataclass
class ElfInfo:
    path: Path
    bits: int
    machine: int
    type: int
    needed: list[str] = field(default_factory=list)
    soname: str | None = None
    textrel: bool = False
    load_aligns: list[int] = field(default_factory=list)
    has_tls: bool = False
    undefined: dict[str, str] = field(default_factory=dict)  # name -> "GLOBAL" | "WEAK"
    defined: set[str] = field(default_factory=set)
    version_needs: dict[str, set[str]] = field(default_factory=dict)  # "libc.so.6" -> {"GLIBC_2.17"}

    @property
    def machine_name(self) -> str:
        return MACHINE_NAMES.get(self.machine, f"e_machine={self.machine}")

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"e_type={self.type}")


def read_elf(path: str | Path) -> ElfInfo:
    """Header, program headers, dynamic section and symbol table of a little-endian ELF file."""
    path = Path(path)
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file (magic {data[:4]!r})")
    if data[5] != 1:
        raise ValueError(f"{path} is big-endian ELF; only little-endian targets are supported")
    is64 = data[4] == 2
    if is64:
        e_type, e_machine, _, _, e_phoff, e_shoff = struct.unpack_from("<HHIQQQ", data, 16)
        e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, 54)
    else:
        e_type, e_machine, _, _, e_phoff, e_shoff = struct.unpack_from("<HHIIII", data, 16)
        e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, 42)
    info = ElfInfo(path, 64 if is64 else 32, e_machine, e_type)

    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        if is64:
            p_type, _, _, _, _, _, _, p_align = struct.unpack_from("<IIQQQQQQ", data, off)
        else:
            p_type, _, _, _, _, _, _, p_align = struct.unpack_from("<IIIIIIII", data, off)
        if p_type == _PT_LOAD:
            info.load_aligns.append(p_align)
        info.has_tls |= p_type == _PT_TLS

    sections = []
    for i in range(e_shnum):
        off = e_shoff + i * e_shentsize
        if is64:
            _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize = struct.unpack_from(
                "<IIQQQQIIQQ", data, off)
        else:
            _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize = struct.unpack_from(
                "<IIIIIIIIII", data, off)
        sections.append((sh_type, sh_offset, sh_size, sh_link, sh_entsize))

    def string(table: int, index: int) -> str:
        start = sections[table][1] + index
        return data[start:data.index(b"\0", start)].decode()

    # A shared object's interface is its .dynsym; an object file only has .symtab.
    wanted = _SHT_DYNSYM if any(s[0] == _SHT_DYNSYM for s in sections) else _SHT_SYMTAB
    for sh_type, sh_offset, sh_size, sh_link, sh_entsize in sections:
        if sh_type == _SHT_GNU_VERNEED:
            _read_verneed(data, sh_offset, sh_link, string, info.version_needs)
        elif sh_type == _SHT_DYNAMIC:
            fmt = "<qQ" if is64 else "<iI"
            for off in range(sh_offset, sh_offset + sh_size, struct.calcsize(fmt)):
                tag, val = struct.unpack_from(fmt, data, off)
                if tag == _DT_NEEDED:
                    info.needed.append(string(sh_link, val))
                elif tag == _DT_SONAME:
                    info.soname = string(sh_link, val)
                elif tag == _DT_TEXTREL or (tag == _DT_FLAGS and val & _DF_TEXTREL):
                    info.textrel = True
        elif sh_type == wanted and sh_entsize:
            for off in range(sh_offset + sh_entsize, sh_offset + sh_size, sh_entsize):
                if is64:
                    st_name, st_info, _, st_shndx = struct.unpack_from("<IBBH", data, off)
                else:
                    st_name, = struct.unpack_from("<I", data, off)
                    st_info, _, st_shndx = struct.unpack_from("<BBH", data, off + 12)
                bind = st_info >> 4
                if bind not in (_STB_GLOBAL, _STB_WEAK) or st_name == 0:
                    continue
                name = string(sh_link, st_name)
                if st_shndx == 0:
                    info.undefined[name] = "WEAK" if bind == _STB_WEAK else "GLOBAL"
                else:
                    info.defined.add(name)
    return info


def _read_verneed(data: bytes, offset: int, strtab: int, string, out: dict[str, set[str]]) -> None:
    """``.gnu.version_r``: the symbol versions needed from each library (Elf32/64 layouts agree)."""
    while True:
        _, vn_cnt, vn_file, vn_aux, vn_next = struct.unpack_from("<HHIII", data, offset)
        names = out.setdefault(string(strtab, vn_file), set())
        aux = offset + vn_aux
        for _ in range(vn_cnt):
            _, _, _, vna_name, vna_next = struct.unpack_from("<IHHII", data, aux)
            names.add(string(strtab, vna_name))
            aux += vna_next
        if vn_next == 0:
            return
        offset += vn_next
