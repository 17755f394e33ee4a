"""Is this file DICOM, by its content? Archives and PACS exports often store DICOM files without a suffix, and some
without the 128-byte preamble. A leaf module (no package imports): readers, decoders and discovery all use it.

'part10': the preamble and `DICM` at byte 128. 'bare': the first few KB parse as little-endian data elements with
rising tags, valid VRs and lengths that fit the file, starting in group 0002 or 0008. Never reads past SNIFF_BYTES.
"""

from __future__ import annotations

import os
import struct

SNIFF_BYTES = 4096  # the most of a file read to decide whether it is DICOM
_PREAMBLE = 128
_MAGIC = b"DICM"
_FIRST_GROUPS = (0x0002, 0x0008)  # file meta, or identification: the first group of practically every dataset
_SNIFF_ELEMENTS = 3
_UNDEFINED_LENGTH = 0xFFFFFFFF
_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split())
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # 2 reserved bytes, then a 32-bit length


def sniff_dicom(path: str | os.PathLike[str]) -> str:
    """'part10' (preamble + 'DICM'), 'bare' (a dataset without preamble; see the module docstring) or '' (not
    DICOM by content). Reads at most the first `SNIFF_BYTES` of the file; OSError passes through."""
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
        size = os.fstat(fh.fileno()).st_size
    if head[_PREAMBLE : _PREAMBLE + 4] == _MAGIC:
        return "part10"
    return "bare" if _bare_dataset(head, size) else ""


def _bare_dataset(head: bytes, size: int) -> bool:
    """Whether `head` (the start of a file of `size` bytes) begins with plausible little-endian data elements."""
    pos, count, last = 0, 0, -1
    explicit: bool | None = None  # decided by the first element after the (always explicit) file meta group
    while count < _SNIFF_ELEMENTS:
        if pos == size:
            return count > 0  # a tiny dataset, walked to its end
        if pos + 8 > len(head):
            return False
        group, element = struct.unpack_from("<HH", head, pos)
        tag = group << 16 | element
        if tag <= last or (count == 0 and group not in _FIRST_GROUPS):
            return False
        vr = head[pos + 4 : pos + 6]
        if group != 0x0002 and explicit is None:
            explicit = vr in _VRS
        if group == 0x0002 or explicit:
            if vr not in _VRS:
                return False
            if vr in _LONG_VRS:
                if pos + 12 > len(head):
                    return False
                length, header = struct.unpack_from("<I", head, pos + 8)[0], 12
            else:
                length, header = struct.unpack_from("<H", head, pos + 6)[0], 8
        else:
            length, header = struct.unpack_from("<I", head, pos + 4)[0], 8
        count += 1
        if length == _UNDEFINED_LENGTH:
            return count >= 2  # a sequence of undefined length: its items are not walked
        pos += header + length
        if pos > size:
            return False
        last = tag
    return True
