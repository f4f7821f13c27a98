"""Read and write AIMET-style encodings files: the 0.6.1 dict layout and the 1.0.0 list layout.

A file read here is a set of quantization overrides (QNN ``--quantization_overrides``). Every
problem is an ``EncodingError`` naming the file, the section and the tensor, because these files
are hand-edited and a bare "bad bitwidth" is useless in a file with thousands of entries.

Nothing in a file is silently ignored: keys outside the entry's layout (a 1.0.0 entry's min/max,
a 0.6.1 entry's bw/name), 0.6.1 scale/offset without min/max (the spec recomputes them from
bitwidth, min and max, and its own examples disagree on the offset's sign, so min/max are
required), duplicate JSON keys, and a ``version`` that contradicts the layout are all errors.

Here: the two layouts as documents (``to_json``/``from_json``) and files (``save``/``load``). The
types are ``encodings_file``'s, one entry's validation ``encodings_entries``', and reading the
JSON itself ``strict_json``'s.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from qpasses.core.errors import EncodingError
from qpasses.quant.encodings_entries import parse_legacy, parse_v1
from qpasses.quant.encodings_file import EncodingsFile, Entry, PrecisionOverride, TensorSpec
from qpasses.quant.strict_json import duplicates, parse_json

Version = Literal["0.6.1", "1.0.0"]
SECTIONS = ("activation_encodings", "param_encodings")
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


# --- export -----------------------------------------------------------------------------------------


def _legacy_entry(entry: Entry) -> list[dict[str, Any]]:
    if isinstance(entry, PrecisionOverride):
        return [{"bitwidth": entry.bitwidth, "dtype": entry.dtype}]
    return [
        {
            "bitwidth": entry.bitwidth,
            "dtype": "int",
            "is_symmetric": str(entry.symmetric),
            "max": hi,
            "min": lo,
            "offset": offset,
            "scale": scale,
        }
        for lo, hi, offset, scale in zip(entry.min, entry.max, entry.offset, entry.scale, strict=True)
    ]


def _v1_entry(name: str, entry: Entry) -> dict[str, Any]:
    if isinstance(entry, PrecisionOverride):
        return {"name": name, "enc_type": "PER_TENSOR", "dtype": entry.dtype.upper(), "bw": entry.bitwidth}
    return {
        "name": name,
        "enc_type": "PER_TENSOR" if entry.axis is None else "PER_CHANNEL",
        "dtype": "INT",
        "bw": entry.bitwidth,
        "is_sym": entry.symmetric,
        "scale": list(entry.scale),
        "offset": list(entry.offset),
    }


def to_json(encodings: EncodingsFile, version: Version = "0.6.1") -> dict[str, Any]:
    """The JSON document for ``version`` (AIMET 0.6.1 dicts of lists, or 1.0.0 lists of named entries)."""
    sections = (encodings.activations, encodings.params)
    if version == "0.6.1":
        body: dict[str, Any] = {
            key: {name: _legacy_entry(entry) for name, entry in section.items()}
            for key, section in zip(SECTIONS, sections, strict=True)
        }
    elif version == "1.0.0":
        body = {
            key: [_v1_entry(name, entry) for name, entry in section.items()]
            for key, section in zip(SECTIONS, sections, strict=True)
        }
    else:
        raise EncodingError(f"unknown encodings file version {version!r} (expected '0.6.1' or '1.0.0')")
    return {"version": version, **body}


def save(path: str | os.PathLike[str], encodings: EncodingsFile, version: Version = "0.6.1") -> None:
    """Write atomically: a temporary file in the same directory, then ``os.replace``.

    A crash mid-write must never leave a truncated file where a previous good one was.
    """
    target = Path(path)
    text = json.dumps(to_json(encodings, version), indent=4) + "\n"
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- import -----------------------------------------------------------------------------------------


def _named_entries(raw: dict[str, Any] | list[Any], section: str, source: str) -> list[tuple[str, Any]]:
    """(name, raw entry) pairs of one section in either layout."""
    if isinstance(raw, dict):
        for duplicate in duplicates(raw):
            raise EncodingError(f"{source}: {section} '{duplicate}': listed more than once (JSON keeps only the last)")
        return list(raw.items())
    pairs: list[tuple[str, Any]] = []
    for index, entry in enumerate(raw):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise EncodingError(f"{source}: {section}[{index}]: missing required key 'name' (or it is not a string)")
        if any(name == seen for seen, _ in pairs):
            raise EncodingError(f"{source}: {section} '{name}': listed more than once")
        pairs.append((name, entry))
    return pairs


def _check_version(version: object, lists: bool, empty: bool, source: str) -> None:
    """A stated version must be known and match the layout: 0.x has objects, 1.0.0 lists."""
    match = _VERSION.match(version) if isinstance(version, str) else None
    if match is None or (int(match.group(1)) >= 1 and version != "1.0.0"):
        raise EncodingError(
            f"{source}: unsupported encodings 'version' {version!r} (expected a string: "
            '"0.6.1" or another 0.x for the object layout, "1.0.0" for the list layout)'
        )
    v1 = version == "1.0.0"
    if v1 != lists and not empty:
        stated = "lists of named entries (1.0.0 layout)" if v1 else "objects keyed by tensor name (0.6.1 layout)"
        found = "lists (1.0.0 layout)" if lists else "objects (0.6.1 layout)"
        raise EncodingError(
            f"{source}: 'version' is {version!r}, whose sections are {stated}, but this file's sections are {found}"
        )


def from_json(
    data: object, *, source: str = "<encodings>", tensors: Mapping[str, TensorSpec] | None = None
) -> EncodingsFile:
    """Parse and validate an encodings document, detecting the layout from its sections.

    With ``tensors``, names must be known and bitwidths/channel counts must suit the tensor.
    """
    if not isinstance(data, dict):
        raise EncodingError(f"{source}: top level must be a JSON object")
    for key in duplicates(data):
        raise EncodingError(f"{source}: top-level key '{key}' appears more than once (JSON keeps only the last)")
    for key in SECTIONS:
        if key not in data:
            raise EncodingError(f"{source}: missing required section '{key}'")
    raw_sections = [data[key] for key in SECTIONS]
    parse: Callable[[Any, str, TensorSpec | None], Entry]
    if all(isinstance(s, dict) for s in raw_sections):
        parse = parse_legacy
    elif all(isinstance(s, list) for s in raw_sections):
        parse = parse_v1
    else:
        raise EncodingError(f"{source}: sections must both be objects (0.6.1 layout) or both lists (1.0.0 layout)")
    if "version" in data:
        _check_version(data["version"], parse is parse_v1, not any(raw_sections), source)

    result = EncodingsFile()
    for key, raw, target in zip(SECTIONS, raw_sections, (result.activations, result.params), strict=True):
        for name, entry in _named_entries(raw, key, source):
            where = f"{source}: {key} '{name}'"
            if tensors is not None and name not in tensors:
                raise EncodingError(f"{where}: unknown tensor (not in the model)")
            try:
                target[name] = parse(entry, key, tensors.get(name) if tensors is not None else None)
            except EncodingError as exc:
                raise EncodingError(f"{where}: {exc}") from None
    return result


def load(path: str | os.PathLike[str], *, tensors: Mapping[str, TensorSpec] | None = None) -> EncodingsFile:
    """Read an encodings/overrides file (either layout); see ``from_json`` for validation."""
    source = Path(path)
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise EncodingError(f"{source}: cannot read encodings file: {exc.strerror or exc}") from None
    return from_json(parse_json(raw, source), source=str(source), tensors=tensors)
