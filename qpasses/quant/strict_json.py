"""Strict JSON reading for encodings files: every way a file can fail is an ``EncodingError``.

Encodings files are hand-edited, so duplicate keys (JSON keeps only the last value) are recorded
on the parsed objects for the validation to report, and non-UTF-8 text, malformed JSON, deep
nesting and oversized numbers get messages naming the file instead of Python's exceptions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qpasses.core.errors import EncodingError


def duplicates(obj: object) -> tuple[str, ...]:
    """Keys a JSON object listed more than once (``parse_json`` records them; the last value won)."""
    return getattr(obj, "duplicates", ())


class _JsonObject(dict[str, Any]):
    """A JSON object that remembers which keys it listed more than once."""

    duplicates: tuple[str, ...] = ()


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    repeated: dict[str, None] = {}
    for key, value in pairs:
        if key in obj:
            repeated[key] = None
        obj[key] = value
    if repeated:
        obj.duplicates = tuple(repeated)
    return obj


def parse_json(raw: bytes, source: Path) -> object:
    """The JSON value of a UTF-8 file (JSON's encoding, RFC 8259); every way it can fail is an EncodingError."""
    # JSON text never holds a raw NUL: one among the first bytes (or a UTF-16 byte order mark) means UTF-16/32.
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:4]:
        raise EncodingError(
            f"{source}: the file is UTF-16 or UTF-32 text, but encodings files are UTF-8 JSON: save it as UTF-8"
        )
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte order mark (Windows editors) is harmless
    except UnicodeDecodeError as exc:
        raise EncodingError(
            f"{source}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): "
            "encodings files are UTF-8 JSON"
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as exc:
        raise EncodingError(f"{source}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise EncodingError(f"{source}: JSON nested too deeply to be an encodings file") from None
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise EncodingError(f"{source}: unreadable JSON number: {str(exc).split(':')[0]}") from None
