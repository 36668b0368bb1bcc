"""TensorBoard scalar event files, written and read without TensorFlow or TensorBoard.

An event file is a sequence of TFRecords, each framed as::

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes) |
    data[length] | uint32 masked_crc32c(data)

(TensorFlow ``core/lib/io/record_writer.cc``). Each record's data is a serialized ``Event``
protocol buffer (``tensorflow/core/util/event.proto``), of which these fields are used::

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

The first record carries ``file_version = "brain.Event:2"``; TensorBoard reads every file of
a folder whose name contains ``tfevents``. The protobuf wire format (varints, field keys
``field << 3 | wire_type``, length-delimited strings and sub-messages, little-endian fixed32 /
fixed64 numbers) is encoded here by hand.
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ocljax.errors import DataError
from ocljax.run.results import write_atomic

FILE_VERSION = "brain.Event:2"
EVENT_FILE = "events.out.tfevents.report.ocljax"  # fixed: a new report replaces the old file

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_BYTES, _WIRE_FIXED32 = 0, 1, 2, 5
_CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial 0x1EDC6F41, bit-reversed
_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli; Castagnoli, Braeuer & Herrmann 1993, as used by iSCSI, RFC 3720
    Appendix B.4): reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF.
    ``crc`` continues a previous checksum. ``crc32c(b"123456789") == 0xE3069283``."""
    crc ^= 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum: crc32c rotated right by 15 bits plus 0xA282EAD8 (mod 2**32)."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


# --- protobuf wire format -------------------------------------------------------------------

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values are sent as 10-byte two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _length_delimited(number: int, data: bytes) -> bytes:
    return _key(number, _WIRE_BYTES) + _varint(len(data)) + data


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DataError("malformed protobuf varint in an event record")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> Iterator[tuple[int, int, object]]:
    """``(field number, wire type, value)`` of each field of one message; the value is an int
    for varints, ``bytes`` otherwise (8 or 4 raw bytes for fixed64 / fixed32)."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(data, pos)
        elif wire in (_WIRE_FIXED64, _WIRE_FIXED32):
            size = 8 if wire == _WIRE_FIXED64 else 4
            value, pos = data[pos:pos + size], pos + size
        elif wire == _WIRE_BYTES:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise DataError(f"unsupported protobuf wire type {wire} in an event record")
        if pos > len(data):
            raise DataError("truncated protobuf field in an event record")
        yield number, wire, value


@dataclass
class Event:
    """The decoded fields of one ``Event`` record that this module reads and writes."""

    wall_time: float = 0.0
    step: int = 0
    file_version: str | None = None
    scalars: list[tuple[str, float]] = field(default_factory=list)  # (tag, simple_value)


def encode_event(event: Event) -> bytes:
    """Serialize ``event`` as an ``Event`` protocol buffer (fields 1, 2, 3 and 5)."""
    out = _key(1, _WIRE_FIXED64) + struct.pack("<d", event.wall_time)
    if event.step:
        out += _key(2, _WIRE_VARINT) + _varint(event.step)
    if event.file_version is not None:
        out += _length_delimited(3, event.file_version.encode())
    if event.scalars:
        summary = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode())
                              + _key(2, _WIRE_FIXED32) + struct.pack("<f", value))
            for tag, value in event.scalars)
        out += _length_delimited(5, summary)
    return out


def decode_event(data: bytes) -> Event:
    """Parse an ``Event`` protocol buffer; fields other than 1, 2, 3 and 5 (and summary
    values without ``simple_value``) are skipped."""
    event = Event()
    for number, wire, value in _fields(data):
        if number == 1 and wire == _WIRE_FIXED64:
            event.wall_time = struct.unpack("<d", value)[0]
        elif number == 2 and wire == _WIRE_VARINT:
            event.step = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 3 and wire == _WIRE_BYTES:
            event.file_version = value.decode()
        elif number == 5 and wire == _WIRE_BYTES:
            for vnum, vwire, vdata in _fields(value):
                if vnum != 1 or vwire != _WIRE_BYTES:
                    continue
                tag, simple = None, None
                for fnum, fwire, fval in _fields(vdata):
                    if fnum == 1 and fwire == _WIRE_BYTES:
                        tag = fval.decode()
                    elif fnum == 2 and fwire == _WIRE_FIXED32:
                        simple = struct.unpack("<f", fval)[0]
                if tag is not None and simple is not None:
                    event.scalars.append((tag, simple))
    return event


# --- TFRecord framing ------------------------------------------------------------------------

def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked crc32c, the data, the data's masked crc32c."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))


def read_records(path: str | os.PathLike) -> Iterator[bytes]:
    """The data of each TFRecord in ``path``; ``DataError`` on a truncated record or a
    checksum mismatch."""
    buf = Path(path).read_bytes()
    pos = 0
    while pos < len(buf):
        if pos + 12 > len(buf):
            raise DataError(f"{path}: truncated record header at byte {pos}")
        length = buf[pos:pos + 8]
        (size,) = struct.unpack("<Q", length)
        (crc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
        if crc != masked_crc32c(length):
            raise DataError(f"{path}: length checksum mismatch at byte {pos}")
        start, end = pos + 12, pos + 12 + size
        if end + 4 > len(buf):
            raise DataError(f"{path}: truncated record at byte {pos}")
        data = buf[start:end]
        (crc,) = struct.unpack("<I", buf[end:end + 4])
        if crc != masked_crc32c(data):
            raise DataError(f"{path}: data checksum mismatch at byte {pos}")
        yield data
        pos = end + 4


# --- scalar files ----------------------------------------------------------------------------

def write_scalars(
    logdir: str | os.PathLike, scalars: Iterable[tuple[str, int, float]],
    wall_time: float | None = None, filename: str = EVENT_FILE,
) -> Path:
    """Write ``(tag, step, value)`` scalars as one event file in ``logdir`` (created), one
    ``Event`` per step (ascending) holding that step's values; non-finite values are left out
    (TensorBoard shows a gap). The file is written atomically and replaces an earlier one of
    the same ``filename``. Returns its path."""
    wall_time = time.time() if wall_time is None else float(wall_time)
    by_step: dict[int, list[tuple[str, float]]] = {}
    for tag, step, value in scalars:
        if value is not None and math.isfinite(value):
            by_step.setdefault(int(step), []).append((str(tag), float(value)))
    records = [Event(wall_time, 0, FILE_VERSION)]
    records += [Event(wall_time, step, None, by_step[step]) for step in sorted(by_step)]
    payload = b"".join(frame_record(encode_event(e)) for e in records)
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    path = logdir / filename
    write_atomic(path, payload)
    return path


def read_events(path: str | os.PathLike) -> list[Event]:
    """Every event of an event file, in order (checksums verified)."""
    return [decode_event(r) for r in read_records(path)]


def read_scalars(path: str | os.PathLike) -> list[tuple[str, int, float]]:
    """The ``(tag, step, value)`` scalars of an event file, in file order; ``DataError`` when
    the first event does not declare the ``brain.Event:2`` file version."""
    events = read_events(path)
    if not events or events[0].file_version != FILE_VERSION:
        raise DataError(f"{path}: not a TensorBoard event file (no {FILE_VERSION!r} header)")
    return [(tag, e.step, value) for e in events for tag, value in e.scalars]
