"""TFRecord files and ``tf.train.Example`` records without TensorFlow.

Training machines often have PyTorch and no TensorFlow (DESIGN.md), and importing
TensorFlow costs seconds and hundreds of MB, so the export is written and read here with
two small, well-kept libraries instead:

* **framing** — a TFRecord file is a sequence of
  ``uint64 length (LE) | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``;
  the CRC32C comes from ``google-crc32c`` (Google's C library, GB/s);
* **records** — ``tf.train.Example`` is a protobuf; its four messages are declared below
  from TensorFlow's ``example.proto`` (field numbers and types) in a *private* descriptor
  pool, so this module never clashes with TensorFlow's own ``tensorflow.Example`` when
  both are loaded in one process.

:func:`write_records` writes files TensorFlow's ``tf.data.TFRecordDataset`` reads, and
:func:`read_records` reads files ``tf.io.TFRecordWriter`` writes, byte for byte
(``tests/test_export.py`` checks both directions in a process that has TensorFlow).
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

import google_crc32c
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_MASK_DELTA = 0xA282EAD8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class CorruptRecordError(ValueError):
    """A TFRecord file whose framing or checksum is wrong; names the file and the record."""


def masked_crc(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC32C: ``rotr15(crc) + 0xa282ead8`` (mod 2³²)."""
    crc = google_crc32c.value(bytes(data)) if isinstance(data, memoryview) else google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------
# framing
# ---------------------------------------------------------------------------------------
def frame(record: bytes) -> bytes:
    """One record as it is stored in a TFRecord file."""
    head = _U64.pack(len(record))
    return head + _U32.pack(masked_crc(head)) + record + _U32.pack(masked_crc(record))


def write_records(dest: str | os.PathLike[str] | IO[bytes], records: Iterable[bytes]) -> int:
    """Write ``records`` as a TFRecord file (a path, or an open binary file); returns
    the number of records written."""
    if isinstance(dest, (str, os.PathLike)):
        with open(dest, "wb") as f:
            return write_records(f, records)
    n = 0
    for record in records:
        dest.write(frame(record))
        n += 1
    return n


def read_records(path: str | os.PathLike[str], verify: bool = True) -> Iterator[bytes]:
    """The records of a TFRecord file, in order. With ``verify`` (the default) both
    checksums of every record are checked; a bad one or a cut-off file raises
    :class:`CorruptRecordError` naming the file and the record's index."""
    name = os.fspath(path)
    with open(path, "rb", buffering=1 << 20) as f:
        index = 0
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise CorruptRecordError(f"{name}: record {index}: file ends inside the length header")
            (length,) = _U64.unpack_from(head)
            (head_crc,) = _U32.unpack_from(head, 8)
            if verify and head_crc != masked_crc(head[:8]):
                raise CorruptRecordError(f"{name}: record {index}: length checksum mismatch")
            body = f.read(length + 4)
            if len(body) < length + 4:
                raise CorruptRecordError(f"{name}: record {index}: file ends inside the record")
            data = body[:length]
            if verify and _U32.unpack_from(body, length)[0] != masked_crc(data):
                raise CorruptRecordError(f"{name}: record {index}: data checksum mismatch")
            yield data
            index += 1


# ---------------------------------------------------------------------------------------
# tf.train.Example
# ---------------------------------------------------------------------------------------
def _example_pool() -> descriptor_pool.DescriptorPool:
    """tensorflow/core/example/{feature,example}.proto's messages in a pool of our own."""
    T = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="carflow/tf_example.proto", package="tensorflow", syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, int, str | None, int | None]):
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name, oneof in fields:
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                fd.type_name = type_name
            if oneof is not None:
                fd.oneof_index = oneof
        return m

    rep, opt = T.LABEL_REPEATED, T.LABEL_OPTIONAL
    message("BytesList", ("value", 1, T.TYPE_BYTES, rep, None, None))
    message("FloatList", ("value", 1, T.TYPE_FLOAT, rep, None, None)).field[0].options.packed = True
    message("Int64List", ("value", 1, T.TYPE_INT64, rep, None, None)).field[0].options.packed = True
    feature = message(
        "Feature",
        ("bytes_list", 1, T.TYPE_MESSAGE, opt, ".tensorflow.BytesList", 0),
        ("float_list", 2, T.TYPE_MESSAGE, opt, ".tensorflow.FloatList", 0),
        ("int64_list", 3, T.TYPE_MESSAGE, opt, ".tensorflow.Int64List", 0),
    )
    feature.oneof_decl.add(name="kind")
    features = message("Features", ("feature", 1, T.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry", None))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=T.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=T.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature")
    message("Example", ("features", 1, T.TYPE_MESSAGE, opt, ".tensorflow.Features", None))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return pool


_EXAMPLE: Any = None


def example_class() -> Any:
    """The ``tensorflow.Example`` message class (built on first use, not at import)."""
    global _EXAMPLE
    if _EXAMPLE is None:
        _EXAMPLE = message_factory.GetMessageClass(_example_pool().FindMessageTypeByName("tensorflow.Example"))
    return _EXAMPLE


FeatureValue = bytes | str | int | float | Sequence[bytes | str] | Sequence[int] | Sequence[float]


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
    """A serialized ``tf.train.Example``. Values: ``bytes``/``str`` (or a list of them)
    → ``bytes_list``; ``int`` (or a list) → ``int64_list``; ``float`` (or a list) →
    ``float_list``. An empty list is an empty ``bytes_list``. Map keys are written in
    sorted order (deterministic bytes)."""
    ex = example_class()()
    fmap = ex.features.feature
    for key, value in features.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        feat = fmap[key]
        first = values[0] if values else b""
        try:
            if isinstance(first, (bytes, str)):
                feat.bytes_list.SetInParent()
                feat.bytes_list.value.extend(v if isinstance(v, bytes) else v.encode() for v in values)
            elif isinstance(first, int) and not isinstance(first, bool):
                feat.int64_list.value.extend(values)
            elif isinstance(first, float):
                feat.float_list.value.extend(values)
            else:
                raise TypeError(type(first).__name__)
        except (TypeError, AttributeError) as exc:
            raise TypeError(f"feature {key!r}: unsupported or mixed values ({exc})") from None
    return ex.SerializeToString(deterministic=True)


def decode_example(data: bytes) -> dict[str, list[Any]]:
    """A serialized ``tf.train.Example`` → ``{name: list of values}`` (bytes, int or
    float, as the feature's kind says; an empty feature is an empty list)."""
    ex = example_class().FromString(data)
    out: dict[str, list[Any]] = {}
    for key, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        out[key] = list(getattr(feat, kind).value) if kind else []
    return out
