"""TensorBoard event files written by hand: crc32c, the protobuf bytes, the TFRecord framing
and a round trip through our reader (and TensorBoard's, when it is installed)."""

import struct

import numpy as np
import pytest

from ocljax.errors import DataError
from ocljax.run import tensorboard as tb


def test_crc32c_matches_the_published_check_values():
    assert tb.crc32c(b"123456789") == 0xE3069283  # the CRC catalogue's check value
    # RFC 3720 (iSCSI) Appendix B.4
    assert tb.crc32c(bytes(32)) == 0x8A9136AA
    assert tb.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tb.crc32c(bytes(range(32))) == 0x46DD794E
    assert tb.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert tb.crc32c(b"") == 0
    assert tb.crc32c(b"6789", tb.crc32c(b"12345")) == 0xE3069283  # continued checksum


def test_masked_crc_rotates_and_adds_the_delta():
    crc = 0xE3069283
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    assert tb.masked_crc32c(b"123456789") == (rotated + 0xA282EAD8) & 0xFFFFFFFF
    assert tb.masked_crc32c(b"") == 0xA282EAD8


def test_event_bytes_follow_the_protobuf_wire_format():
    got = tb.encode_event(tb.Event(wall_time=1.0, step=300, scalars=[("a", 0.5)]))
    value = b"\x0a\x01a" + b"\x15" + struct.pack("<f", 0.5)  # tag=1 string, simple_value=2 f32
    summary = b"\x0a" + bytes([len(value)]) + value  # Summary.value = 1
    want = (b"\x09" + struct.pack("<d", 1.0)  # wall_time = 1, fixed64
            + b"\x10\xac\x02"  # step = 2, varint 300
            + b"\x2a" + bytes([len(summary)]) + summary)  # summary = 5
    assert got == want
    header = tb.encode_event(tb.Event(wall_time=2.0, file_version="brain.Event:2"))
    assert header == b"\x09" + struct.pack("<d", 2.0) + b"\x1a\x0dbrain.Event:2"
    back = tb.decode_event(got)
    assert (back.wall_time, back.step, back.scalars) == (1.0, 300, [("a", 0.5)])
    assert tb.decode_event(tb.encode_event(tb.Event(step=-5))).step == -5  # 10-byte varint


def test_record_framing():
    data = b"hello"
    rec = tb.frame_record(data)
    assert rec[:8] == struct.pack("<Q", 5)
    assert rec[8:12] == struct.pack("<I", tb.masked_crc32c(struct.pack("<Q", 5)))
    assert rec[12:17] == data
    assert rec[17:] == struct.pack("<I", tb.masked_crc32c(data))


def test_scalars_round_trip_exactly(tmp_path):
    scalars = [("loss", 2, 0.25), ("acc/mean", 1, 0.1), ("acc/mean", 2, 1 / 3),
               ("acc/std", 1, float("nan")), ("acc/mean", 0, 0.0)]
    path = tb.write_scalars(tmp_path / "run", scalars, wall_time=123.5)
    assert path.name == tb.EVENT_FILE and "tfevents" in path.name
    events = tb.read_events(path)
    assert events[0].file_version == "brain.Event:2" and events[0].wall_time == 123.5
    assert [e.step for e in events[1:]] == [0, 1, 2]  # one event per step, ascending
    got = tb.read_scalars(path)
    # NaN left out; values are float32 on disk
    assert got == [("acc/mean", 0, 0.0), ("acc/mean", 1, float(np.float32(0.1))),
                   ("loss", 2, 0.25), ("acc/mean", 2, float(np.float32(1 / 3)))]
    # rewriting replaces the file instead of appending a second one
    tb.write_scalars(tmp_path / "run", [("x", 1, 1.0)])
    assert [p.name for p in (tmp_path / "run").iterdir()] == [tb.EVENT_FILE]
    assert tb.read_scalars(path) == [("x", 1, 1.0)]


def test_corrupt_or_foreign_files_are_clear_errors(tmp_path):
    path = tb.write_scalars(tmp_path, [("a", 1, 0.5)])
    raw = bytearray(path.read_bytes())
    raw[-6] ^= 0xFF  # a byte of the last record's data
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="data checksum mismatch"):
        tb.read_events(bad)
    bad.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        tb.read_events(bad)
    bad.write_bytes(tb.frame_record(tb.encode_event(tb.Event(step=1))))
    with pytest.raises(DataError, match="not a TensorBoard event file"):
        tb.read_scalars(bad)


def test_tensorboard_reads_our_file(tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tb.write_scalars(tmp_path, [("acc", 1, 0.5), ("acc", 3, 0.75), ("loss", 3, 2.0)])
    acc = ea_mod.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["acc", "loss"]
    assert [(e.step, e.value) for e in acc.Scalars("acc")] == [(1, 0.5), (3, 0.75)]
