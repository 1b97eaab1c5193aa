"""A small PNG decoder in numpy for the masks and label maps the server sends.

The server writes 1-bit masks (``mask_format="png"``) and 8- or 16-bit grayscale label
maps (``Segment``); this module reads exactly those, so the client needs neither Pillow
nor OpenCV. It decodes non-interlaced grayscale PNGs of bit depth 1, 8 or 16 with any
of the five PNG filter types per row (encoders such as Pillow pick them adaptively):
rows filtered with None, Sub or Up are reconstructed with whole-row numpy operations;
Average and Paeth rows, whose every byte depends on the one before it, byte by byte, except
Paeth rows of 1-byte pixels below a row with few changes (label maps, masks), which are
running sums between those changes.
Chunk CRCs are checked; anything else (colour, palette, Adam7 interlacing, other bit
depths) raises a ``ValueError`` naming what is unsupported.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["decode_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BIT_DEPTHS = (1, 8, 16)
_NONE, _SUB, _UP, _AVERAGE, _PAETH = range(5)


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """``(type, payload)`` of every chunk up to ``IEND``, CRCs checked."""
    if not data.startswith(_SIGNATURE):
        raise ValueError("not a PNG: the data does not start with the PNG signature")
    chunks: list[tuple[bytes, bytes]] = []
    pos = len(_SIGNATURE)
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        payload = data[pos + 8 : pos + 8 + length]
        if len(payload) != length or pos + 12 + length > len(data):
            raise ValueError(f"truncated PNG: chunk {kind!r} needs {length} bytes")
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + payload) != crc:
            raise ValueError(f"corrupt PNG: CRC mismatch in chunk {kind!r}")
        chunks.append((kind, payload))
        if kind == b"IEND":
            return chunks
        pos += 12 + length
    raise ValueError("truncated PNG: no IEND chunk")


def _header(payload: bytes) -> tuple[int, int, int]:
    """``(height, width, bit_depth)`` from an ``IHDR`` payload; ValueError if unsupported."""
    if len(payload) != 13:
        raise ValueError(f"corrupt PNG: IHDR is {len(payload)} bytes, expected 13")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", payload)
    if colour != 0:
        kind = {2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}.get(colour, f"type {colour}")
        raise ValueError(f"unsupported PNG: colour type {kind}; only grayscale (type 0) is decoded")
    if depth not in _BIT_DEPTHS:
        raise ValueError(f"unsupported PNG: bit depth {depth}; decoded: 1, 8 and 16")
    if interlace != 0:
        raise ValueError("unsupported PNG: Adam7 interlacing; only non-interlaced images are decoded")
    if compression != 0 or filtering != 0:
        raise ValueError(f"corrupt PNG: compression method {compression}, filter method {filtering}")
    if width == 0 or height == 0:
        raise ValueError(f"corrupt PNG: zero size {width}x{height}")
    return height, width, depth


def _inflate(idat: bytes, size: int) -> bytes:
    """The zlib stream ``idat`` inflated to exactly ``size`` bytes (no more is ever allocated)."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(idat, size)
    except zlib.error as e:
        raise ValueError(f"corrupt PNG: image data does not inflate ({e})") from None
    if len(raw) != size or inflater.unconsumed_tail:
        raise ValueError(f"corrupt PNG: image data inflates to {len(raw)} bytes, expected {size}")
    return raw


def _paeth(a: int, b: int, c: int) -> int:
    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _unfilter_bytewise(kind: int, row: np.ndarray, prior: np.ndarray, bpp: int) -> np.ndarray:
    """Reconstruct one Average or Paeth row byte by byte (each byte needs the one ``bpp`` back)."""
    filtered = row.tolist()
    above = prior.tolist()
    out = [0] * len(filtered)
    for x, value in enumerate(filtered):
        a = out[x - bpp] if x >= bpp else 0
        b = above[x]
        if kind == _AVERAGE:
            out[x] = (value + ((a + b) >> 1)) & 0xFF
        else:
            out[x] = (value + _paeth(a, b, above[x - bpp] if x >= bpp else 0)) & 0xFF
    return np.asarray(out, dtype=np.uint8)


def _unfilter_paeth_runs(row: np.ndarray, prior: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Reconstruct a Paeth row of 1-byte pixels whose row above changes only at ``edges``.

    Where the byte above equals the one above-left (``b == c``), Paeth predicts the byte to
    the left, so a run between two edges is a running sum; only the edges need the predictor.
    """
    out = np.empty_like(row)
    last, start = 0, 0
    for x in [*edges.tolist(), row.size]:
        if x > start:
            out[start:x] = np.cumsum(row[start:x], dtype=np.uint8) + np.uint8(last)
            last = int(out[x - 1])
        if x == row.size:
            break
        last = (int(row[x]) + _paeth(last, int(prior[x]), int(prior[x - 1]) if x else 0)) & 0xFF
        out[x] = last
        start = x + 1
    return out


def _unfilter_sequential(kind: int, row: np.ndarray, prior: np.ndarray, bpp: int) -> np.ndarray:
    """Reconstruct one Average or Paeth row: by runs where that is exact and shorter, else bytewise."""
    if kind == _PAETH and bpp == 1:
        edges = np.flatnonzero(np.diff(prior, prepend=np.uint8(0)))
        if edges.size * 8 < row.size:  # few edges above: label maps and masks
            return _unfilter_paeth_runs(row, prior, edges)
    return _unfilter_bytewise(kind, row, prior, bpp)


def _unfilter(rows: np.ndarray, kinds: np.ndarray, bpp: int) -> np.ndarray:
    """Undo the per-row filters of ``rows`` (``(H, rowbytes)`` uint8) in place and return it."""
    prior = np.zeros(rows.shape[1], np.uint8)
    for y, kind in enumerate(kinds.tolist()):
        row = rows[y]
        if kind == _SUB:
            # Sub adds the byte bpp to the left: a running sum (mod 256) per byte lane.
            lanes = row.reshape(-1, bpp)  # rows of 1-, 8- and 16-bit images hold whole pixels
            np.cumsum(lanes, axis=0, dtype=np.uint8, out=lanes)
        elif kind == _UP:
            row += prior
        elif kind in (_AVERAGE, _PAETH):
            row[:] = _unfilter_sequential(kind, row, prior, bpp)
        elif kind != _NONE:
            raise ValueError(f"corrupt PNG: unknown filter type {kind} on row {y}")
        prior = row
    return rows


def decode_png(data: bytes) -> np.ndarray:
    """Decode a grayscale PNG into an ``(H, W)`` array.

    Args:
        data: the PNG file's bytes.

    Returns:
        bool for bit depth 1, uint8 for 8, uint16 (native byte order) for 16.

    Raises:
        ValueError: not a PNG, corrupt or truncated, or a kind this decoder does not
            read (colour or palette images, Adam7 interlacing, bit depths 2 and 4).
    """
    chunks = _chunks(bytes(data))
    if chunks[0][0] != b"IHDR":
        raise ValueError("corrupt PNG: the first chunk is not IHDR")
    height, width, depth = _header(chunks[0][1])
    rowbytes = (width * depth + 7) // 8
    idat = b"".join(payload for kind, payload in chunks if kind == b"IDAT")
    raw = np.frombuffer(_inflate(idat, height * (rowbytes + 1)), dtype=np.uint8).reshape(height, -1)
    rows = _unfilter(raw[:, 1:].copy(), raw[:, 0], bpp=max(1, depth // 8))
    if depth == 1:
        return np.unpackbits(rows, axis=1, count=width).astype(bool)
    if depth == 8:
        return rows
    return rows.view(">u2").astype(np.uint16)
