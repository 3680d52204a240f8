"""aceg_ros.image_codec: every encoding round trips bit-exactly, padding and byte order, clear errors."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from aceg_ros.image_codec import (
    ENCODINGS,
    bytes_per_pixel,
    decode_compressed,
    decode_image,
    encode_compressed,
    encode_image,
)

RNG = np.random.default_rng(0)


def sample(encoding: str, height: int = 5, width: int = 7) -> np.ndarray:
    """A random array in the layout ``decode_image`` returns for ``encoding``."""
    channels, dtype = ENCODINGS[encoding]
    shape = (height, width, 3) if channels > 1 else (height, width)
    if dtype == np.float32:
        return RNG.normal(size=shape).astype(np.float32)
    return RNG.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True, dtype=dtype)


def pad_rows(data: bytes, height: int, row_bytes: int, padding: int) -> bytes:
    """The same pixels with ``padding`` junk bytes after each row."""
    rows = np.frombuffer(data, np.uint8).reshape(height, row_bytes)
    junk = np.full((height, padding), 0xAB, np.uint8)
    return np.hstack([rows, junk]).tobytes()


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_round_trip_every_encoding(encoding: str) -> None:
    array = sample(encoding)
    height, width, step, data = encode_image(array, encoding)
    assert (height, width, step) == (5, 7, 7 * bytes_per_pixel(encoding))
    assert len(data) == height * step
    decoded = decode_image(encoding, height, width, step, data)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()
    assert decoded.flags.writeable  # a fresh array, not a view of the message buffer


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_row_padding_is_skipped(encoding: str) -> None:
    array = sample(encoding, 4, 3)
    height, width, step, data = encode_image(array, encoding)
    padded = pad_rows(data, height, step, padding=5)
    decoded = decode_image(encoding, height, width, step + 5, padded)
    assert decoded.tobytes() == array.tobytes()


def test_wire_channel_order() -> None:
    rgb = np.array([[[10, 20, 30]]], np.uint8)
    assert encode_image(rgb, "rgb8")[3] == bytes([10, 20, 30])
    assert encode_image(rgb, "bgr8")[3] == bytes([30, 20, 10])
    assert encode_image(rgb, "8UC3")[3] == bytes([30, 20, 10])  # OpenCV's order
    assert encode_image(rgb, "rgba8")[3] == bytes([10, 20, 30, 255])
    assert encode_image(rgb, "bgra8")[3] == bytes([30, 20, 10, 255])
    # Decoding always gives RGB and drops alpha.
    assert decode_image("bgr8", 1, 1, 3, bytes([30, 20, 10])).tolist() == [[[10, 20, 30]]]
    assert decode_image("bgra8", 1, 1, 4, bytes([30, 20, 10, 7])).tolist() == [[[10, 20, 30]]]
    assert decode_image("rgba8", 1, 1, 4, bytes([10, 20, 30, 7])).tolist() == [[[10, 20, 30]]]
    rgba = np.array([[[1, 2, 3, 4]]], np.uint8)
    assert encode_image(rgba, "bgra8")[3] == bytes([3, 2, 1, 4])


@pytest.mark.parametrize("encoding", ["mono16", "16UC1", "32FC1"])
def test_big_endian(encoding: str) -> None:
    array = sample(encoding, 3, 4)
    big = array.astype(array.dtype.newbyteorder(">")).tobytes()
    step = 4 * array.itemsize
    decoded = decode_image(encoding, 3, 4, step, big, is_bigendian=True)
    assert decoded.dtype == array.dtype and decoded.dtype.isnative
    assert np.array_equal(decoded, array)
    # With padding too.
    assert np.array_equal(decode_image(encoding, 3, 4, step + 2, pad_rows(big, 3, step, 2), True), array)
    # Little-endian data read as little-endian is the default.
    assert np.array_equal(decode_image(encoding, 3, 4, step, array.astype("<" + array.dtype.str[1:]).tobytes()),
                          array)


def test_known_values() -> None:
    assert decode_image("mono16", 1, 2, 4, bytes([1, 2, 3, 4])).tolist() == [[0x0201, 0x0403]]
    assert decode_image("16UC1", 1, 2, 4, bytes([1, 2, 3, 4]), is_bigendian=True).tolist() == [[0x0102, 0x0304]]
    assert decode_image("32FC1", 1, 1, 4, np.float32(1.5).tobytes()).tolist() == [[1.5]]


def test_decode_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown image encoding 'yuv422'.*rgb8.*32FC1"):
        decode_image("yuv422", 2, 2, 4, bytes(8))
    with pytest.raises(ValueError, match=r"24 bytes, expected height 2 x step 9 = 18"):
        decode_image("rgb8", 2, 3, 9, bytes(24))
    with pytest.raises(ValueError, match=r"step 8 bytes is smaller than width 3 px x 3 bytes per pixel = 9"):
        decode_image("rgb8", 2, 3, 8, bytes(16))
    with pytest.raises(ValueError, match="zero size"):
        decode_image("mono8", 0, 3, 3, b"")
    with pytest.raises(ValueError, match="zero size"):
        decode_image("mono8", 3, 0, 0, b"")


def test_encode_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown image encoding 'bayer_rggb8'"):
        encode_image(np.zeros((2, 2), np.uint8), "bayer_rggb8")
    with pytest.raises(ValueError, match="mono16 needs a uint16 array, got uint8"):
        encode_image(np.zeros((2, 2), np.uint8), "mono16")
    with pytest.raises(ValueError, match="rgb8 needs an HxWx3 RGB array"):
        encode_image(np.zeros((2, 2), np.uint8), "rgb8")
    with pytest.raises(ValueError, match="rgb8 needs an HxWx3 RGB array"):
        encode_image(np.zeros((2, 2, 4), np.uint8), "rgb8")
    with pytest.raises(ValueError, match="mono8 needs an HxW array"):
        encode_image(np.zeros((2, 2, 3), np.uint8), "mono8")
    with pytest.raises(ValueError, match="empty image"):
        encode_image(np.zeros((0, 2, 3), np.uint8), "rgb8")


@pytest.mark.parametrize("image", [sample("rgb8", 9, 11), sample("mono8", 9, 11), sample("mono16", 9, 11)],
                         ids=["rgb", "grey", "grey16"])
def test_png_is_lossless(image: np.ndarray) -> None:
    fmt, data = encode_compressed(image, "png")
    assert "png compressed" in fmt
    decoded = decode_compressed(fmt, data)
    assert decoded.dtype == image.dtype and np.array_equal(decoded, image)


def test_compressed_format_strings_and_jpeg() -> None:
    # A smooth image: JPEG keeps it close, and the channel order survives (red stays red).
    yy, xx = np.mgrid[0:32, 0:48]
    image = np.stack([xx * 5, yy * 7, np.full_like(xx, 40)], axis=2).astype(np.uint8)
    fmt, data = encode_compressed(image, "jpeg", jpeg_quality=95)
    assert fmt == "rgb8; jpeg compressed bgr8"
    decoded = decode_compressed(fmt, data)
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - image).mean() < 3.0
    assert encode_compressed(image[:, :, 0], "png")[0] == "mono8; png compressed "
    # A bare format string (some drivers) and a BGR PNG written by OpenCV decode as RGB too.
    ok, png = cv2.imencode(".png", image[:, :, ::-1])
    assert ok and np.array_equal(decode_compressed("png", png.tobytes()), image)


def test_compressed_depth_header_is_skipped() -> None:
    depth_mm = sample("16UC1", 6, 5)
    _, png = encode_compressed(depth_mm, "png")
    data = bytes(12) + png  # compressed_depth_image_transport's ConfigHeader
    assert np.array_equal(decode_compressed("16UC1; compressedDepth png", data), depth_mm)
    with pytest.raises(ValueError, match="32FC1"):
        decode_compressed("32FC1; compressedDepth png", data)


def test_compressed_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"could not decode 13 bytes .*'rgb8; png compressed bgr8'.*corrupt"):
        decode_compressed("rgb8; png compressed bgr8", b"garbage bytes")
    _, png = encode_compressed(sample("rgb8"), "png")
    with pytest.raises(ValueError, match="could not decode"):
        decode_compressed("png", png[: len(png) // 3])  # truncated
    with pytest.raises(ValueError, match="has no data"):
        decode_compressed("png", b"")
    with pytest.raises(ValueError, match="unknown compressed format 'webp'; supported: png, jpeg"):
        encode_compressed(sample("rgb8"), "webp")
    with pytest.raises(ValueError, match="jpeg needs uint8"):
        encode_compressed(sample("mono16"), "jpeg")
    with pytest.raises(ValueError, match="HxW grey or HxWx3 RGB"):
        encode_compressed(np.zeros((4, 4, 2), np.uint8), "png")
    with pytest.raises(ValueError, match="empty image"):
        encode_compressed(np.zeros((0, 4), np.uint8), "png")


# --- properties -----------------------------------------------------------------------------------


@st.composite
def images(draw) -> tuple[str, np.ndarray]:
    encoding = draw(st.sampled_from(list(ENCODINGS)))
    channels, dtype = ENCODINGS[encoding]
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    shape = (h, w, 3) if channels > 1 else (h, w)
    # float32: any bit pattern (NaN, inf, -0.0) must survive; compare bytes, not values.
    elements = st.floats(width=32, allow_nan=True) if dtype == np.float32 else None
    return encoding, draw(arrays(dtype, shape, elements=elements))


@settings(max_examples=80, deadline=None)
@given(images(), st.integers(0, 7), st.booleans())
def test_property_encode_decode_round_trip(image: tuple[str, np.ndarray], padding: int, big_endian: bool) -> None:
    encoding, array = image
    height, width, step, data = encode_image(array, encoding)
    if big_endian:  # re-serialize multi-byte pixels the other way round
        channels, dtype = ENCODINGS[encoding]
        wire = array if channels == 1 else np.frombuffer(data, np.uint8)
        data = wire.astype(dtype.newbyteorder(">")).tobytes() if channels == 1 else wire.tobytes()
    decoded = decode_image(encoding, height, width, step + padding, pad_rows(data, height, step, padding),
                           is_bigendian=big_endian)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()


@settings(max_examples=25, deadline=None)
@given(st.one_of(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12))),
                 arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12), st.just(3))),
                 arrays(np.uint16, st.tuples(st.integers(1, 12), st.integers(1, 12)))))
def test_property_png_round_trip(array: np.ndarray) -> None:
    fmt, data = encode_compressed(array, "png")
    assert np.array_equal(decode_compressed(fmt, data), array)
