"""Image and mask reading: every mode in, (H, W, 3) uint8 out; every bad file is an error naming it."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clad.data.io import as_rgb, is_image_file, load_image, load_mask
from clad.errors import ImageLoadError

H, W = 12, 20


def _check_rgb(a: np.ndarray, shape=(H, W)) -> None:
    assert a.shape == (*shape, 3) and a.dtype == np.uint8


def test_grayscale_l(tmp_path):
    p = tmp_path / "gray.png"
    Image.fromarray(np.full((H, W), 77, np.uint8)).save(p)
    a = load_image(p)
    _check_rgb(a)
    assert (a == 77).all()


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, : W // 2, 3] = 255  # left half opaque red, right half transparent
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(p)
    a = load_image(p)
    _check_rgb(a)
    assert (a[:, : W // 2] == [200, 0, 0]).all() and (a[:, W // 2 :] == 0).all()
    assert np.array_equal(as_rgb(rgba), a)  # an RGBA array gives the same pixels as the file


def test_palette_with_and_without_transparency(tmp_path):
    idx = np.zeros((H, W), np.uint8)
    idx[:, W // 2 :] = 1
    img = Image.frombytes("P", (W, H), idx.tobytes())
    img.putpalette([10, 20, 30, 250, 200, 100] + [0] * 762)
    plain = tmp_path / "p.png"
    img.save(plain)
    a = load_image(plain)
    _check_rgb(a)
    assert (a[0, 0] == [10, 20, 30]).all() and (a[0, -1] == [250, 200, 100]).all()

    trans = tmp_path / "p_trans.png"
    img.save(trans, transparency=0)  # palette index 0 fully transparent
    with Image.open(trans) as im:
        assert im.mode == "P" and "transparency" in im.info
    b = load_image(trans)
    _check_rgb(b)
    assert (b[0, 0] == 0).all() and (b[0, -1] == [250, 200, 100]).all()


def test_16_bit_png_keeps_a_fixed_scale(tmp_path):
    a16 = np.zeros((H, W), np.uint16)
    a16[:, 5:10] = 32896  # 128 * 257
    a16[:, 10:] = 65535
    p = tmp_path / "deep.png"
    Image.fromarray(a16).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    a = load_image(p)
    _check_rgb(a)
    assert a[0, 0, 0] == 0 and a[0, 7, 0] == 128 and a[0, -1, 0] == 255
    # a dim 16-bit image stays dim: no per-image stretching that would make it look like a bright one
    dim = tmp_path / "dim.png"
    Image.fromarray((a16 // 4).astype(np.uint16)).save(dim)
    assert load_image(dim).max() == 64


def test_exif_rotated_jpeg_swaps_width_and_height(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    p = tmp_path / "rotated.jpg"
    img.save(p, exif=exif.tobytes())
    with Image.open(p) as im:
        assert im.size == (W, H)
    _check_rgb(load_image(p), shape=(W, H))


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "truncated", "random"])
def test_bad_files_raise_errors_naming_the_file(tmp_path, case):
    p = tmp_path / f"bad_{case}.png"
    if case == "folder":
        p.mkdir()
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "truncated":
        good = tmp_path / "good.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
        data = good.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif case == "random":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ImageLoadError, match=f"bad_{case}.png"):
        load_image(p)
    with pytest.raises(ImageLoadError, match=f"bad_{case}.png"):
        load_mask(p)


def test_mask_is_defective_where_value_above_zero(tmp_path):
    m = np.array([[0, 1, 128, 255]], np.uint8).repeat(3, axis=0)
    p = tmp_path / "m.png"
    Image.fromarray(m).save(p)
    mask = load_mask(p, shape=(3, 4))
    assert mask.dtype == bool
    assert mask.tolist() == [[False, True, True, True]] * 3


def test_mask_of_another_size_names_the_file(tmp_path):
    p = tmp_path / "small_mask.png"
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(p)
    with pytest.raises(ImageLoadError, match="small_mask.png"):
        load_mask(p, shape=(H, W))


def test_as_rgb_accepts_arrays_pil_and_paths(tmp_path):
    gray = np.full((H, W), 0.5, np.float32)
    _check_rgb(as_rgb(gray))
    assert as_rgb(gray)[0, 0, 0] == 128
    _check_rgb(as_rgb(np.zeros((H, W, 1), bool)))
    _check_rgb(as_rgb(Image.new("L", (W, H))))
    p = tmp_path / "x.png"
    Image.new("RGB", (W, H), (1, 2, 3)).save(p)
    assert as_rgb(str(p))[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(ImageLoadError):
        as_rgb(np.zeros((H, W, 5)))


def test_is_image_file(tmp_path):
    for name in ("a.PNG", "b.jpg", ".hidden.png", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir() if is_image_file(p)) == ["a.PNG", "b.jpg"]


def test_a_tiny_file_declaring_a_huge_side_is_refused(tmp_path):
    # Found by benchmarks/fuzz.py: 183 bytes of TIFF declaring 5 x 8,716,294 16-bit pixels took 1.5 GB to decode.
    from clad.data.io import load_image
    from clad.errors import ImageLoadError

    path = tmp_path / "bomb.tif"
    path.write_bytes(bytes.fromhex("49492a0008000000090000010400010000000500000001010400010000000600850002010300010000001000000003010300010000000100000006010300010000080100000011010400010000007a00000016010400010000000600000017010400010000003c0000001c0103000100000001000000000000007f00d5006800ce00bb009b007e005d009d007500511b00a00071006f0082009900a90077007a0097005d00b600bb002900c1004900b2001900a500b600"))
    with pytest.raises(ImageLoadError, match="bomb.tif: image too large"):
        load_image(path)


def test_16_bit_grayscale_maps_to_8_bit_exactly(tmp_path):
    from PIL import Image

    from clad.data.io import load_image

    values = np.arange(0, 65536, 7, dtype=np.uint16)[:64 * 64].reshape(64, 64)
    Image.fromarray(values).save(tmp_path / "deep.png")
    out = load_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(out[..., 0], np.round(values.astype(np.float64) / 257.0).astype(np.uint8))
