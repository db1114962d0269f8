"""Incremental Ogg demuxer for an Opus stream that arrives in arbitrary HTTP chunks.

Bytes are fed as they come; whole Opus audio packets come out as soon as the page that ends them
is complete and its CRC checks. A packet may span pages (continuation flag) and a page may be
split across any number of chunks. The OpusHead and OpusTags header packets are skipped. Only
the first logical stream is followed. Anything left unfinished when the stream ends (a cut
connection) is reported by :meth:`OggOpusDemuxer.close` and dropped, never half-delivered.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CAPTURE = b"OggS"
HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, seqno, crc, segs
FLAG_CONTINUED = 0x01
MAX_PACKET_BYTES = 255 * 255  # a sane bound: one packet never needs more than a full page


def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return tuple(table)


_CRC_TABLE = _crc_table()


def ogg_crc(data: bytes | bytearray | memoryview) -> int:
    """The Ogg page checksum (CRC-32, polynomial 0x04C11DB7, unreflected, zero initial value)."""
    crc = 0
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[((crc >> 24) ^ byte) & 0xFF]
    return crc


@dataclass(slots=True)
class DemuxStats:
    """What was seen, for logs: pages parsed, packets returned, and what had to be dropped."""

    pages: int = 0
    packets: int = 0
    headers: int = 0
    bad_pages: int = 0
    skipped_bytes: int = 0
    dropped_partial: int = 0


class OggOpusDemuxer:
    """Feed bytes, get complete Opus audio packets (bytes) in stream order."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._partial = bytearray()  # a packet continued on the next page
        self._in_packet = False
        self._serial: int | None = None
        self.stats = DemuxStats()

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every audio packet it completed."""
        self._buf += data
        out: list[bytes] = []
        while self._next_page(out):
            pass
        return out

    def close(self) -> int:
        """End of stream: drop any unfinished page or packet; return the bytes dropped."""
        dropped = len(self._buf) + len(self._partial)
        if self._partial or self._in_packet:
            self.stats.dropped_partial += 1
        self._buf.clear()
        self._partial.clear()
        self._in_packet = False
        return dropped

    # -- pages

    def _next_page(self, out: list[bytes]) -> bool:
        """Parse one page from the buffer if it is complete; False when more bytes are needed."""
        buf = self._buf
        start = buf.find(CAPTURE)
        if start < 0:
            keep = 3  # the capture pattern may be split across chunks
            if len(buf) > keep:
                self.stats.skipped_bytes += len(buf) - keep
                del buf[: len(buf) - keep]
            return False
        if start > 0:
            self.stats.skipped_bytes += start
            del buf[:start]
        if len(buf) < HEADER.size:
            return False
        _, version, flags, _granule, serial, _seq, crc, nsegs = HEADER.unpack_from(buf)
        header_len = HEADER.size + nsegs
        if len(buf) < header_len:
            return False
        lacing = bytes(buf[HEADER.size:header_len])
        page_len = header_len + sum(lacing)
        if len(buf) < page_len:
            return False
        page = bytearray(buf[:page_len])
        page[22:26] = b"\0\0\0\0"
        if version != 0 or ogg_crc(page) != crc:
            self.stats.bad_pages += 1
            self.stats.skipped_bytes += 1
            del buf[:1]  # not a real page boundary (or corrupt): resynchronise after it
            self._drop_partial()
            return True
        body = bytes(buf[header_len:page_len])
        del buf[:page_len]
        self.stats.pages += 1
        if self._serial is None:
            self._serial = serial
        if serial == self._serial:  # another logical stream (chained, video) is not ours
            self._split_packets(flags, lacing, body, out)
        return True

    def _split_packets(self, flags: int, lacing: bytes, body: bytes, out: list[bytes]) -> None:
        continued = bool(flags & FLAG_CONTINUED)
        if self._in_packet and not continued:
            self._drop_partial()  # the previous page promised a continuation that never came
        # A continuation without its start (a lost or corrupt page): skip to its end.
        orphan = continued and not self._in_packet
        pos = 0
        for size in lacing:
            segment = body[pos:pos + size]
            pos += size
            if orphan:
                orphan = size == 255
                continue
            self._partial += segment
            self._in_packet = True
            if size < 255:
                self._emit(bytes(self._partial), out)
                self._partial.clear()
                self._in_packet = False
            elif len(self._partial) > MAX_PACKET_BYTES:
                self._drop_partial()
                orphan = True

    def _drop_partial(self) -> None:
        if self._in_packet or self._partial:
            self.stats.dropped_partial += 1
        self._partial.clear()
        self._in_packet = False

    def _emit(self, packet: bytes, out: list[bytes]) -> None:
        if packet.startswith((b"OpusHead", b"OpusTags")):
            self.stats.headers += 1
            return
        if not packet:
            return
        self.stats.packets += 1
        out.append(packet)
