"""Image decoding and validation, and sizing inputs for a model."""
from __future__ import annotations

import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from vitlens.errors import ImageError, OptionError
from vitlens.images import (GALLERY, decode_image, gallery_image, input_shape, read_image_file, resize_for_model,
                            to_tensor)


def _decode_rgb(data: bytes) -> np.ndarray:
    decoded = decode_image(data, name="upload")
    assert decoded.image.mode == "RGB"
    return np.asarray(decoded.image)


def _expect_image_error(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageError) as error:
        decode_image(data, name="upload.bin", **kwargs)
    message = str(error.value)
    assert "\n" not in message and message.endswith(".") and "upload.bin" in message
    return message


@pytest.mark.parametrize("fmt,tolerance", [("PNG", 0), ("TIFF", 0), ("WEBP", 0), ("JPEG", 12), ("BMP", 0)])
def test_common_formats_decode_to_the_same_picture(make_photo, encode, fmt, tolerance):
    source = make_photo(40, 30)
    args = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    pixels = _decode_rgb(encode(source, fmt, **args))
    assert pixels.shape == (30, 40, 3)
    assert np.abs(pixels.astype(int) - np.asarray(source, dtype=int)).mean() <= tolerance


def test_animated_gif_gives_its_first_frame(encode):
    red, blue = Image.new("RGB", (16, 12), (255, 0, 0)), Image.new("RGB", (16, 12), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    pixels = _decode_rgb(data)
    assert (pixels == [255, 0, 0]).all()
    data = encode(blue, "GIF", save_all=True, append_images=[red], duration=100, loop=0)
    assert (_decode_rgb(data) == [0, 0, 255]).all()


def test_multipage_tiff_gives_its_first_page(encode):
    first, second = Image.new("RGB", (8, 8), (10, 200, 30)), Image.new("RGB", (8, 8), (0, 0, 0))
    pixels = _decode_rgb(encode(first, "TIFF", save_all=True, append_images=[second]))
    assert (pixels == [10, 200, 30]).all()


def test_grayscale_modes(encode):
    gray = Image.fromarray(np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8))
    pixels = _decode_rgb(encode(gray, "PNG"))
    assert (pixels[..., 0] == np.asarray(gray)).all() and (pixels[..., 0] == pixels[..., 2]).all()
    bilevel = Image.fromarray(np.eye(8, dtype=bool))
    assert bilevel.mode == "1"
    pixels = _decode_rgb(encode(bilevel, "PNG"))
    assert set(np.unique(pixels)) == {0, 255}
    assert (pixels[..., 0] == np.eye(8) * 255).all()


def test_alpha_goes_on_white(encode):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red-ish everywhere
    rgba[:2, :, 3] = 255  # top half opaque, bottom half fully transparent
    pixels = _decode_rgb(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (pixels[:2] == [200, 0, 0]).all()
    assert (pixels[2:] == [255, 255, 255]).all()
    la = Image.fromarray(np.dstack([np.full((4, 4), 50, np.uint8), np.tile([[255], [0]], (2, 4)).astype(np.uint8)]), "LA")
    pixels = _decode_rgb(encode(la, "PNG"))
    assert (pixels[0::2] == 50).all() and (pixels[1::2] == 255).all()


def test_palette_with_transparency(encode):
    palette_image = Image.new("P", (6, 6), 0)
    palette_image.putpalette([0, 128, 0] + [255, 0, 0] + [0] * 762)
    palette_image.paste(1, (0, 0, 3, 6))  # left half red, right half index 0
    data = encode(palette_image, "PNG", transparency=0)  # index 0 (green) is transparent
    pixels = _decode_rgb(data)
    assert (pixels[:, :3] == [255, 0, 0]).all()
    assert (pixels[:, 3:] == [255, 255, 255]).all()
    opaque = _decode_rgb(encode(palette_image, "PNG"))
    assert (opaque[:, 3:] == [0, 128, 0]).all()


def test_cmyk(encode):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    for fmt in ("JPEG", "TIFF"):
        pixels = _decode_rgb(encode(cmyk, fmt))
        assert pixels[..., 0].min() > 200 and pixels[..., 1:].max() < 60, fmt


def test_sixteen_bit_values_are_scaled_not_clipped(encode):
    values = np.array([[0, 1000, 30000, 65535]], dtype=np.uint16).repeat(2, axis=0)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    pixels = _decode_rgb(encode(image, "PNG"))[0, :, 0]
    assert pixels.tolist() == [0, 4, 117, 255]
    dark = Image.fromarray(np.full((4, 4), 300, dtype=np.uint16))
    assert _decode_rgb(encode(dark, "TIFF")).max() < 5  # 300 of 65535 is nearly black, not white


def test_wide_integer_and_float_modes_are_stretched(encode):
    ints = Image.fromarray(np.array([[-5000, 0], [5000, 100000]], dtype=np.int32))
    assert ints.mode == "I"
    pixels = _decode_rgb(encode(ints, "TIFF"))[..., 0]
    assert pixels[0, 0] == 0 and pixels[1, 1] == 255 and 0 < pixels[0, 1] < pixels[1, 0] < 255
    floats = Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    pixels = _decode_rgb(encode(floats, "TIFF"))[..., 0]
    assert pixels.tolist() == [[0, 64], [128, 255]]
    flat = Image.fromarray(np.full((3, 3), 7.5, dtype=np.float32))
    assert np.isfinite(_decode_rgb(encode(flat, "TIFF"))).all()


def test_exif_orientation_is_applied(make_photo, encode):
    source = make_photo(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(source, "JPEG", exif=exif, quality=95))
    assert decoded.image.size == (20, 40)
    top_left = np.asarray(decoded.image)[0, 0].astype(int)
    bottom_left = np.asarray(source)[-1, 0].astype(int)  # rotated clockwise: bottom-left comes to the top-left
    assert np.abs(top_left - bottom_left).max() < 40
    plain = decode_image(encode(source, "JPEG", quality=95))
    assert plain.image.size == (40, 20)


def test_digest_depends_on_pixels_not_on_the_file(make_photo, encode):
    source = make_photo(24, 24)
    png, tiff = decode_image(encode(source, "PNG")), decode_image(encode(source, "TIFF"))
    assert png.digest == tiff.digest
    assert decode_image(encode(make_photo(24, 24, seed=1), "PNG")).digest != png.digest
    assert decode_image(encode(source.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG")).digest != png.digest


@pytest.mark.parametrize("data", [b"", b"hello, this is text\n", b"\x00" * 100, b"%PDF-1.4\n%\xe2\xe3", b"GIF89a"],
                         ids=["empty", "text", "zeros", "pdf", "gif_magic_only"])
def test_non_images_are_image_errors(data):
    _expect_image_error(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF"])
def test_truncated_files_are_image_errors(make_photo, encode, fmt):
    data = encode(make_photo(64, 64), fmt)
    for cut in (len(data) // 2, len(data) * 3 // 4, 40):
        _expect_image_error(data[:cut])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF"])
def test_damaged_files_decode_or_raise_image_error_only(make_photo, encode, fmt):
    """Random truncations and byte flips: either a picture or ImageError, never another exception."""
    data = encode(make_photo(32, 32), fmt)
    rng = np.random.default_rng(0)
    for _ in range(40):
        damaged = bytearray(data)
        if rng.random() < 0.5:
            damaged = damaged[:rng.integers(1, len(data))]
        else:
            for position in rng.integers(0, len(data), size=rng.integers(1, 8)):
                damaged[position] = rng.integers(0, 256)
        try:
            decoded = decode_image(bytes(damaged), name="damaged")
        except ImageError:
            continue
        assert decoded.image.mode == "RGB" and decoded.image.size[0] >= 1


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (with a valid CRC) and one small IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    data = _png_claiming(100_000, 100_000)
    assert len(data) < 200
    assert "too many pixels" in _expect_image_error(data) or "limit" in _expect_image_error(data)
    _expect_image_error(data, max_pixels=10**12)  # past our limit, PIL's own bomb check still holds
    _expect_image_error(_png_claiming(8000, 8000), max_pixels=1_000_000)


def test_pixel_limit_is_configurable(make_photo, encode):
    data = encode(make_photo(100, 100), "PNG")
    _expect_image_error(data, max_pixels=9_999)
    assert decode_image(data, max_pixels=10_000).image.size == (100, 100)


def test_read_image_file(tmp_path, png_file):
    path = png_file(30, 20)
    assert read_image_file(path).image.size == (30, 20)
    assert read_image_file(path).name == path.name
    with pytest.raises(ImageError):
        read_image_file(tmp_path / "missing.png")
    with pytest.raises(ImageError):
        read_image_file(tmp_path)  # a directory


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "folder", "oversized"])
def test_special_files_are_refused_without_reading(tmp_path, png_file, kind):
    """A symlink to /dev/zero would be read forever and a FIFO would block: both are refused at once."""
    path = tmp_path / "picture.png"
    if kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path = png_file(64, 48)
    start = time.monotonic()
    with pytest.raises(ImageError) as refused:
        read_image_file(path, max_bytes=1000)
    assert time.monotonic() - start < 2
    expected = {"dev_zero": "a device", "fifo": "a pipe", "folder": "a folder", "oversized": "more than the limit"}[kind]
    assert expected in str(refused.value)


def test_gallery_is_offline_and_decodes():
    for name in GALLERY:
        decoded = gallery_image(name)
        assert decoded.image.mode == "RGB" and min(decoded.image.size) >= 64, name


@pytest.mark.parametrize("size", [(1, 1000), (1000, 1), (3, 2), (2, 3), (640, 480), (7, 7), (1, 1)])
@pytest.mark.parametrize("side,patch", [(224, 14), (224, 16), (518, 14), (28, 14)])
def test_input_shape_is_a_whole_number_of_patches(size, side, patch):
    height, width = input_shape(size, side, patch)
    assert height % patch == 0 and width % patch == 0
    assert height >= patch and width >= patch
    assert max(height, width) == side
    image_width, image_height = size
    assert (width if image_width >= image_height else height) == side  # the longer side stays the longer one
    exact_short = min(size) / max(size) * side
    assert abs(min(height, width) - exact_short) <= patch / 2 or min(height, width) == patch


@pytest.mark.parametrize("size", [(1, 1000), (1000, 1), (3, 2)])
def test_resize_for_model_gives_input_shape(size):
    image = Image.new("RGB", size, (10, 20, 30))
    resized = resize_for_model(image, 224, 14)
    height, width = input_shape(size, 224, 14)
    assert resized.size == (width, height)
    tensor = to_tensor(resized, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert tuple(tensor.shape) == (3, height, width)
    assert tensor[0, 0, 0].item() == pytest.approx((10 / 255 - 0.5) / 0.25, abs=1e-3)


@pytest.mark.parametrize("side", [225, 0, -14, 13, 230])
def test_sizes_off_the_patch_grid_are_refused(side):
    with pytest.raises(OptionError) as error:
        input_shape((100, 100), side, 14)
    assert "\n" not in str(error.value)
    with pytest.raises(OptionError):
        resize_for_model(Image.new("RGB", (10, 10)), side, 14)
