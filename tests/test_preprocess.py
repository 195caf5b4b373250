"""Image decoding and CLIP's transform, on real files written by the tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.errors import ImageLoadError
from retrieval.model.preprocess import CLIP_MEAN, CLIP_STD, Preprocess, open_image, to_rgb

GOLDEN = Path(__file__).parent / "data" / "preprocess_golden.npz"
with np.load(GOLDEN) as _golden:
    GOLDEN_CASES = [str(name) for name in _golden["cases"]]

RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 200, 40), (30, 40, 220), (240, 220, 30)


def upright_quadrants(width: int = 48, height: int = 32) -> np.ndarray:
    """[H, W, 3]: red top-left, green top-right, blue bottom-left, yellow bottom-right."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = RED
    pixels[: height // 2, width // 2 :] = GREEN
    pixels[height // 2 :, : width // 2] = BLUE
    pixels[height // 2 :, width // 2 :] = YELLOW
    return pixels


# How a camera stores the upright picture for each EXIF orientation (from the EXIF specification; numpy's
# rot90 turns counter-clockwise), so that applying the orientation shows it upright again.
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: np.rot90(a.transpose(1, 0, 2), 2),
    8: lambda a: np.rot90(a, -1),
}


def quadrant_colours(image: Image.Image) -> list[tuple[int, ...]]:
    """The colour at the centre of each quadrant: top-left, top-right, bottom-left, bottom-right."""
    width, height = image.size
    points = [(width // 4, height // 4), (3 * width // 4, height // 4)]
    points += [(width // 4, 3 * height // 4), (3 * width // 4, 3 * height // 4)]
    return [image.getpixel(p) for p in points]


def assert_close_colours(got: list[tuple[int, ...]], want: list[tuple[int, ...]], tolerance: int = 12) -> None:
    """Colours equal within JPEG's error."""
    assert np.abs(np.array(got, dtype=int) - np.array(want, dtype=int)).max() <= tolerance, (got, want)


def smooth_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like smooth colour fields."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_transform_matches_torchvision(case):
    # Expected tensors were computed by openai/CLIP's torchvision pipeline (benchmarks/make_preprocess_golden.py).
    with np.load(GOLDEN) as golden:
        pixels, size, expected = golden[f"{case}/input"], int(golden[f"{case}/size"]), golden[f"{case}/expected"]
    image = Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB")

    got = Preprocess(size)(image)

    assert got.dtype == torch.float32 and got.shape == (3, size, size)
    assert np.abs(got.numpy() - expected).max() < 1e-6


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_image(tmp_path, orientation):
    stored = np.ascontiguousarray(STORED[orientation](upright_quadrants()))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"orientation{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())

    image = to_rgb(open_image(path))

    assert image.size == (48, 32)
    assert_close_colours(quadrant_colours(image), [RED, GREEN, BLUE, YELLOW])


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_onto_white(tmp_path, mode):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 40, 40) if mode == "RGBA" else (80, 80, 80)
    rgba[:, :5, 3] = 0  # left half fully transparent
    rgba[:, 5:, 3] = 255
    rgba[0, 9, 3] = 128  # one half-transparent pixel
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    image.save(tmp_path / "alpha.png")

    rgb = to_rgb(open_image(tmp_path / "alpha.png"))

    colour = (200, 40, 40) if mode == "RGBA" else (80, 80, 80)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((2, 5)) == (255, 255, 255)
    assert rgb.getpixel((7, 5)) == colour
    half = [round(c * 128 / 255 + 255 * 127 / 255) for c in colour]
    assert np.abs(np.array(rgb.getpixel((9, 0))) - half).max() <= 1


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_transparency_is_white(tmp_path, suffix):
    indices = np.zeros((8, 8), dtype=np.uint8)
    indices[:, 4:] = 1
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)  # 0: blue, 1: red
    image.save(tmp_path / f"palette{suffix}", transparency=0)

    rgb = to_rgb(open_image(tmp_path / f"palette{suffix}"))

    assert rgb.getpixel((1, 1)) == (255, 255, 255)  # the transparent blue
    assert rgb.getpixel((6, 1)) == (255, 0, 0)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")

    rgb = to_rgb(open_image(tmp_path / "deep.png"))

    assert [rgb.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (64, 64, 64), (128, 128, 128), (255, 255, 255)]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red in CMYK
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"

    rgb = to_rgb(open_image(tmp_path / "cmyk.jpg"))

    assert rgb.mode == "RGB"
    assert_close_colours([rgb.getpixel((8, 8))], [(255, 0, 0)])


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animation_gives_the_first_frame(tmp_path, suffix):
    frames = [Image.new("RGB", (12, 12), colour) for colour in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    path = tmp_path / f"animated{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    opened = Image.open(path)
    assert getattr(opened, "n_frames", 1) == 3
    opened.seek(2)  # a caller may hand over an image left at a later frame

    rgb = to_rgb(opened)

    assert_close_colours([rgb.getpixel((6, 6))], [(250, 0, 0)], tolerance=6)


def test_truncated_jpeg_is_an_image_load_error(tmp_path):
    path = tmp_path / "cut.jpg"
    smooth_photo(64, 48).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:400])

    with pytest.raises(ImageLoadError, match="cut.jpg"):
        Preprocess(32)(path)


def test_zero_byte_file_is_an_image_load_error(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.jpg: not an image Pillow can read"):
        Preprocess(32)(tmp_path / "empty.jpg")


def test_text_with_a_jpg_extension_is_an_image_load_error(tmp_path):
    (tmp_path / "notes.jpg").write_text("shopping list: eggs, milk\n")
    with pytest.raises(ImageLoadError, match=r"notes\.jpg"):
        Preprocess(32)(tmp_path / "notes.jpg")


def test_missing_file_is_an_image_load_error(tmp_path):
    with pytest.raises(ImageLoadError, match=r"gone\.png: no such file"):
        Preprocess(32)(tmp_path / "gone.png")


def test_too_many_megapixels_is_refused(tmp_path):
    smooth_photo(200, 100).save(tmp_path / "big.png")  # 0.02 MP
    with pytest.raises(ImageLoadError, match=r"big\.png: 200x100 .* above the 0\.01 MP limit"):
        to_rgb(open_image(tmp_path / "big.png"), max_megapixels=0.01)
    assert to_rgb(open_image(tmp_path / "big.png"), max_megapixels=0.03).size == (200, 100)


def test_draft_decodes_a_big_jpeg_at_reduced_size(tmp_path):
    path = tmp_path / "photo.jpg"
    smooth_photo(2000, 1500).save(path, quality=90)
    fast, exact = Preprocess(32, fast=True), Preprocess(32, fast=False)

    drafted = fast.decode(open_image(path))
    full = exact.decode(open_image(path))

    assert full.size == (2000, 1500)
    assert min(drafted.size) >= 32  # never below the model's resolution
    assert drafted.size == (250, 188)  # the 1/8 DCT scale, the smallest there is
    a, b = fast(path).flatten(), exact(path).flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999


def test_draft_never_goes_below_the_resolution(tmp_path):
    path = tmp_path / "medium.jpg"
    smooth_photo(900, 600).save(path, quality=90)

    drafted = Preprocess(224).decode(open_image(path))

    assert drafted.size == (450, 300)  # halving keeps 300 >= 224; a quarter would give 150 < 224


def test_path_and_image_give_the_same_tensor_and_preprocess_pickles(tmp_path):
    path = tmp_path / "photo.png"
    smooth_photo(90, 70).save(path)
    preprocess = Preprocess(32)

    clone = pickle.loads(pickle.dumps(preprocess))

    assert torch.equal(preprocess(path), clone(Image.open(path)))
    assert (clone.mean, clone.std) == (CLIP_MEAN, CLIP_STD)


@pytest.mark.parametrize("size", [(3000, 5), (5, 3000), (700, 3)])
def test_extreme_aspect_ratios_give_the_resize_then_crop_pixels(size):
    # Beyond 16:1 the transform resamples only the centre crop's region; the pixels must be CLIP's all the same.
    width, height = size
    image = smooth_photo(width, height)
    new_size = (32, int(32 * height / width)) if width <= height else (int(32 * width / height), 32)
    resized = np.asarray(image.resize(new_size, Image.Resampling.BICUBIC), dtype=np.float32) / 255
    top, left = int(round((new_size[1] - 32) / 2.0)), int(round((new_size[0] - 32) / 2.0))
    reference = (resized[top : top + 32, left : left + 32] - CLIP_MEAN) / CLIP_STD  # [32, 32, 3]

    got = Preprocess(32).transform(image).numpy()

    assert got.shape == (3, 32, 32)
    levels = np.abs(got - reference.transpose(2, 0, 1)).max() * 255 * min(CLIP_STD)
    assert levels < 3.5  # Pillow may order its two passes differently for a region: a few levels


@pytest.mark.parametrize("preprocess", [Preprocess(32), Preprocess(24, resize_mode="squash", interpolation="bilinear")])
def test_crops_normalised_as_a_batch_are_each_images_transform_to_the_bit(preprocess):
    rng = np.random.default_rng(7)
    shapes = ((40, 60), (90, 33), (32, 32))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    crops = np.stack([preprocess.crop_array(image) for image in images])  # what decoder workers send
    size = preprocess.image_size
    assert crops.shape == (3, size, size, 3) and crops.dtype == np.uint8
    batch = preprocess.normalize(crops)
    assert batch.shape == (3, 3, size, size) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for image, pixels in zip(images, batch, strict=True):
        np.testing.assert_array_equal(pixels, preprocess.transform_array(image))
        np.testing.assert_array_equal(pixels, preprocess.transform(image).numpy())
