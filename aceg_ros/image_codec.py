"""sensor_msgs/Image and CompressedImage payloads <-> numpy arrays, without ROS.

Pure numpy/OpenCV so the bag tools and the rclpy node share one codec (use
``cv_bridge`` instead where a real ROS install has it). Array conventions
follow :mod:`aceg_model.frames`:

- colour: ``HxWx3`` ``uint8`` **RGB** whatever the wire order (bgr8, rgba8, ...);
  alpha is dropped on decode and set to 255 on encode;
- mono8 / 8UC1: ``HxW`` ``uint8``; mono16 / 16UC1: ``HxW`` ``uint16``
  (depth cameras: millimetres); 32FC1: ``HxW`` ``float32`` (depth: metres).

Wire format (REP 118 / sensor_msgs/Image): ``height`` rows of ``step`` bytes,
each row ``width * bytes_per_pixel`` bytes of pixels then optional padding;
multi-byte pixels are little-endian unless ``is_bigendian``.
"""
from __future__ import annotations

import cv2
import numpy as np

# encoding -> (channels, numpy dtype of one channel). 8UC3/8UC1 are OpenCV's
# generic names; 8UC3 is taken as BGR, OpenCV's channel order.
ENCODINGS: dict[str, tuple[int, np.dtype]] = {
    "rgb8": (3, np.dtype(np.uint8)),
    "bgr8": (3, np.dtype(np.uint8)),
    "8UC3": (3, np.dtype(np.uint8)),
    "rgba8": (4, np.dtype(np.uint8)),
    "bgra8": (4, np.dtype(np.uint8)),
    "mono8": (1, np.dtype(np.uint8)),
    "8UC1": (1, np.dtype(np.uint8)),
    "mono16": (1, np.dtype(np.uint16)),
    "16UC1": (1, np.dtype(np.uint16)),
    "32FC1": (1, np.dtype(np.float32)),
}
# Channel order on the wire of the colour encodings (decode returns RGB).
_BGR_ORDER = {"bgr8", "8UC3", "bgra8"}
COMPRESSED_FORMATS = ("png", "jpeg")
DEFAULT_JPEG_QUALITY = 95  # percent; 95 keeps JPEG artefacts below typical sensor noise
# compressed_image_transport's "compressedDepth" prefixes the PNG with a 12-byte
# ConfigHeader (int32 format, float32[2] depth quantization parameters).
_COMPRESSED_DEPTH_HEADER_BYTES = 12


def _known() -> str:
    return ", ".join(ENCODINGS)


def bytes_per_pixel(encoding: str) -> int:
    """Bytes of one pixel of ``encoding``; ``ValueError`` listing the known encodings if unknown."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown image encoding {encoding!r}; supported: {_known()}")
    channels, dtype = ENCODINGS[encoding]
    return channels * dtype.itemsize


def decode_image(encoding: str, height: int, width: int, step: int, data: bytes,
                 is_bigendian: bool = False) -> np.ndarray:
    """Decode a sensor_msgs/Image payload (see the module docstring for the returned layout).

    ``step`` is the row length in bytes (>= ``width * bytes_per_pixel``; extra
    bytes are row padding and are skipped); ``len(data)`` must be ``height * step``.
    The result is a fresh array that does not alias ``data``.
    """
    bpp = bytes_per_pixel(encoding)
    channels, dtype = ENCODINGS[encoding]
    if height <= 0 or width <= 0:
        raise ValueError(f"{encoding} image has zero size ({width}x{height} px)")
    if step < width * bpp:
        raise ValueError(f"{encoding} image step {step} bytes is smaller than width {width} px "
                         f"x {bpp} bytes per pixel = {width * bpp} bytes")
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != height * step:
        raise ValueError(f"{encoding} image data is {buf.size} bytes, expected height {height} "
                         f"x step {step} = {height * step} bytes")
    # Drop row padding, then view the pixel bytes with the wire byte order.
    rows = buf.reshape(height, step)[:, : width * bpp]
    wire_dtype = dtype.newbyteorder(">" if is_bigendian else "<") if dtype.itemsize > 1 else dtype
    pixels = np.ascontiguousarray(rows).view(wire_dtype).astype(dtype)  # astype copies: writable, no alias
    pixels = pixels.reshape((height, width, channels) if channels > 1 else (height, width))
    if channels == 1:
        return pixels
    rgb = pixels[:, :, 2::-1] if encoding in _BGR_ORDER else pixels[:, :, :3]
    return np.ascontiguousarray(rgb)


def encode_image(array: np.ndarray, encoding: str) -> tuple[int, int, int, bytes]:
    """Encode ``array`` as a sensor_msgs/Image payload: ``(height, width, step, data)``.

    Colour encodings take ``HxWx3`` RGB ``uint8`` (or ``HxWx4`` RGBA for
    rgba8/bgra8) and reorder channels for the wire; single-channel encodings take
    ``HxW`` of the encoding's dtype (mono8: uint8, mono16/16UC1: uint16,
    32FC1: float32). Rows are unpadded (``step = width * bytes_per_pixel``),
    little-endian, so ``is_bigendian`` is False.
    """
    bpp = bytes_per_pixel(encoding)
    channels, dtype = ENCODINGS[encoding]
    array = np.asarray(array)
    if array.size == 0:
        raise ValueError(f"cannot encode an empty image (shape {array.shape}) as {encoding}")
    if array.dtype != dtype:
        raise ValueError(f"{encoding} needs a {dtype} array, got {array.dtype}")
    if channels == 1:
        if array.ndim != 2:
            raise ValueError(f"{encoding} needs an HxW array, got shape {array.shape}")
        pixels = array
    else:
        if array.ndim != 3 or array.shape[2] not in (3, 4) or (channels == 3 and array.shape[2] != 3):
            allowed = "HxWx3 RGB" if channels == 3 else "HxWx3 RGB or HxWx4 RGBA"
            raise ValueError(f"{encoding} needs an {allowed} array, got shape {array.shape}")
        if channels == 4 and array.shape[2] == 3:
            array = np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=2)
        # RGB(A) -> wire order: swap R and B for the BGR encodings, keep alpha last.
        pixels = array[:, :, [2, 1, 0, 3][:channels]] if encoding in _BGR_ORDER else array
    height, width = array.shape[:2]
    data = np.ascontiguousarray(pixels, dtype=dtype.newbyteorder("<")).tobytes()
    return height, width, width * bpp, data


def decode_compressed(format: str, data: bytes) -> np.ndarray:  # noqa: A002 - the message field's name
    """Decode a sensor_msgs/CompressedImage (JPEG or PNG) to RGB ``HxWx3`` uint8 or ``HxW`` grey.

    ``format`` is the message's field, e.g. ``"rgb8; png compressed bgr8"``
    (image_transport) or just ``"jpeg"``. 16-bit PNGs (and 16UC1
    ``compressedDepth``) decode to ``HxW`` uint16.
    """
    fmt = format.lower()
    if "compresseddepth" in fmt:
        if "32fc1" in fmt:
            raise ValueError(f"compressedDepth of 32FC1 (quantized inverse depth) is not supported: {format!r}")
        data = bytes(data)[_COMPRESSED_DEPTH_HEADER_BYTES:]
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        raise ValueError(f"compressed image ({format!r}) has no data")
    image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ValueError(f"could not decode {buf.size} bytes of compressed image data (format {format!r}): "
                         f"corrupt or not one of {', '.join(COMPRESSED_FORMATS)}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image
    # OpenCV decodes to BGR(A); our convention is RGB.
    code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


def encode_compressed(array: np.ndarray, fmt: str = "png",
                      jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> tuple[str, bytes]:
    """Compress an RGB ``HxWx3`` uint8 or grey ``HxW`` (uint8; uint16 for PNG) image.

    Returns ``(format, data)`` for a sensor_msgs/CompressedImage, with the format
    string image_transport writes (``"rgb8; png compressed bgr8"``,
    ``"mono8; jpeg compressed "``). PNG is lossless; JPEG uses ``jpeg_quality`` (0-100).
    """
    if fmt not in COMPRESSED_FORMATS:
        raise ValueError(f"unknown compressed format {fmt!r}; supported: {', '.join(COMPRESSED_FORMATS)}")
    array = np.asarray(array)
    if array.size == 0:
        raise ValueError(f"cannot compress an empty image (shape {array.shape})")
    grey = array.ndim == 2
    if not grey and not (array.ndim == 3 and array.shape[2] == 3):
        raise ValueError(f"compressed images must be HxW grey or HxWx3 RGB, got shape {array.shape}")
    allowed = (np.uint8, np.uint16) if fmt == "png" and grey else (np.uint8,)
    if array.dtype not in allowed:
        raise ValueError(f"{fmt} needs {' or '.join(np.dtype(d).name for d in allowed)} pixels, got {array.dtype}")
    if grey:
        source = "mono8" if array.dtype == np.uint8 else "mono16"
        target, image = "", array
    else:
        source, target, image = "rgb8", "bgr8", cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if fmt == "jpeg" else []
    ok, encoded = cv2.imencode(".png" if fmt == "png" else ".jpg", image, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.shape} {array.dtype} image as {fmt}")
    return f"{source}; {fmt} compressed {target}", encoded.tobytes()
