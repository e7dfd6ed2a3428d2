"""Image-folder scanning, decoding of odd and bad files, the ADM crop, and the latent cache."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from difffit.engine.data.images import (
    ImageFolder,
    center_crop,
    find_bad_images,
    load_image,
    scan_image_folder,
    to_model_range,
)
from difffit.engine.data.latents import draw_cached_latents, latent_cache
from difffit.engine.errors import DiffFitError


def _save(image: Image.Image, path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_mixed_folder(root):
    """A flat folder with good, odd and bad files; returns (good+odd names, bad names)."""
    rng = np.random.default_rng(0)
    _save(Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)), root / "good.png")
    _save(Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)), root / "GOOD2.JPG", quality=95)
    _save(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), root / "cmyk.jpg")
    _save(Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)), root / "gray16.png")
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    _save(rgba, root / "rgba.png")
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    _save(palette, root / "palette.png")
    _save(Image.new("RGB", (1, 1), (0, 0, 255)), root / "tiny.webp")
    _save(Image.new("L", (20, 20), 100), root / "gray.bmp")
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not an image\n")
    (root / "corrupt.png").write_bytes(_png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60])
    (root / "notes.txt").write_text("ignored: not an image extension")
    good = ["good.png", "GOOD2.JPG", "cmyk.jpg", "gray16.png", "rgba.png", "palette.png", "tiny.webp", "gray.bmp"]
    return good, ["empty.jpg", "text.png", "corrupt.png"]


def test_scan_class_folders_sorted_and_flat(tmp_path):
    for cls, n in (("zebra", 2), ("apple", 3)):
        for i in range(n):
            _save(Image.new("RGB", (8, 8)), tmp_path / "ds" / cls / f"{i}.PNG")
    (tmp_path / "ds" / "apple" / "readme.md").write_text("x")
    folder = scan_image_folder(tmp_path / "ds")
    assert folder.class_names == ["apple", "zebra"]
    assert folder.labels == [0, 0, 0, 1, 1]
    assert all(f.suffix == ".PNG" for f in folder.files)

    _save(Image.new("RGB", (8, 8)), tmp_path / "flat" / "a.jpeg")
    flat = scan_image_folder(tmp_path / "flat")
    assert flat.class_names == ["flat"] and flat.labels == [0]


def test_empty_or_missing_folder_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DiffFitError, match="No images found"):
        scan_image_folder(tmp_path / "empty")
    with pytest.raises(DiffFitError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")


def test_mixed_folder_keeps_good_and_odd_names_bad(tmp_path):
    good, bad = make_mixed_folder(tmp_path / "mixed")
    folder = scan_image_folder(tmp_path / "mixed", validate=True, progress=False)
    assert sorted(f.name for f in folder.files) == sorted(good)
    assert sorted(p.name for p, _ in folder.skipped) == sorted(bad)
    reasons = {p.name: r for p, r in folder.skipped}
    assert reasons["empty.jpg"] == "empty file"
    assert "not a readable image" in reasons["text.png"]


def test_odd_modes_convert_to_rgb(tmp_path):
    make_mixed_folder(tmp_path)
    for name in ("cmyk.jpg", "gray16.png", "rgba.png", "palette.png", "tiny.webp", "gray.bmp"):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB", name
    assert load_image(tmp_path / "gray16.png").getpixel((3, 3)) == (255, 255, 255)  # rescaled, not clipped
    assert load_image(tmp_path / "rgba.png").getpixel((3, 3)) == (255, 255, 255)  # transparent -> white
    assert load_image(tmp_path / "palette.png").getpixel((3, 3)) == (0, 255, 0)
    assert load_image(tmp_path / "gray.bmp").getpixel((0, 0)) == (100, 100, 100)
    red, green, blue = load_image(tmp_path / "cmyk.jpg").getpixel((10, 10))
    assert red > 200 and green < 60 and blue < 60
    assert center_crop(load_image(tmp_path / "tiny.webp"), 8).shape == (8, 8, 3)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    _save(image, tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (10, 20)


def test_decompression_bombs_are_skipped(tmp_path, monkeypatch):
    _save(Image.new("RGB", (12, 12)), tmp_path / "bombs" / "warn.png")  # 144 px: between 1x and 2x the limit
    _save(Image.new("RGB", (20, 20)), tmp_path / "bombs" / "error.png")  # 400 px: over 2x
    _save(Image.new("RGB", (8, 8)), tmp_path / "bombs" / "fine.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    folder = scan_image_folder(tmp_path / "bombs", validate=True, progress=False)
    assert [f.name for f in folder.files] == ["fine.png"]
    assert all("decompression-bomb" in reason for _, reason in folder.skipped)


def test_all_bad_is_one_clear_error(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("nope")
    with pytest.raises(DiffFitError, match="could be read"):
        scan_image_folder(tmp_path / "bad", validate=True, progress=False)


def test_center_crop_box_downsamples_then_crops_the_center():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    out = center_crop(Image.fromarray(pixels), 16)
    expected = pixels.reshape(16, 2, 16, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0  # one box halving, no resampling after

    wide = np.zeros((40, 100, 3), np.uint8)
    wide[:, 40:60] = 255  # a white band in the middle 20 columns
    out = center_crop(Image.fromarray(wide), 20)  # 40 >= 2*20: box-halved to 20 x 50, then columns 15-34
    assert out.shape == (20, 20, 3)
    assert (out[:, 5:15] == 255).all() and (out[:, :5] == 0).all() and (out[:, 15:] == 0).all()


def _image_tree(root, n=5, size=16):
    rng = np.random.default_rng(2)
    for i in range(n):
        _save(Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)), root / f"{i}.png")
    (root / "broken.png").write_text("not an image")


def test_latent_cache_matches_encoding_and_is_reused(tmp_path, tiny_vae_dir):
    from difffit.engine.models.vae import load_vae

    _image_tree(tmp_path / "imgs")
    folder = scan_image_folder(tmp_path / "imgs")
    vae = load_vae(str(tiny_vae_dir))
    calls = []

    def get_vae():
        calls.append(1)
        return vae

    cache = latent_cache(folder, 16, str(tiny_vae_dir), get_vae, tmp_path / "cache", batch_size=2, progress=False)
    assert cache.built and len(calls) == 1
    assert cache.rows.shape == (6, 2, 2, 4, 8, 8) and cache.rows.dtype == np.float16
    assert list(cache.bad) == ["broken.png"]

    index = folder.files.index(tmp_path / "imgs" / "3.png")
    pixels = torch.from_numpy(center_crop(load_image(folder.files[index]), 16).copy()).permute(2, 0, 1)[None]
    images = to_model_range(pixels)
    for flip, batch in enumerate((images, images.flip(-1))):
        mean, std = vae.encode(batch)
        row = torch.from_numpy(cache.rows[index, flip].astype(np.float32))
        torch.testing.assert_close(row[0], mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(row[1], std[0], atol=2e-3, rtol=2e-3)

    again = latent_cache(folder, 16, str(tiny_vae_dir), get_vae, tmp_path / "cache", progress=False)
    assert not again.built and len(calls) == 1 and again.path == cache.path

    os.utime(folder.files[0], ns=(1, 1))  # a changed file means a new cache
    changed = latent_cache(folder, 16, str(tiny_vae_dir), get_vae, tmp_path / "cache", progress=False)
    assert changed.built and changed.path != cache.path and len(calls) == 2


def test_draw_cached_latents_picks_flip_and_scales_noise():
    rows = torch.zeros(3, 2, 2, 1, 1, 1)
    rows[:, 0, 0], rows[:, 1, 0] = 1.0, -1.0  # means: plain 1, flipped -1
    rows[:, :, 1] = 0.5  # std
    flips = torch.tensor([0, 1, 1])
    noise = torch.tensor([2.0, 2.0, 0.0]).view(3, 1, 1, 1)
    out = draw_cached_latents(rows, flips, noise).flatten()
    assert out.tolist() == [2.0, 0.0, -1.0]


def test_find_bad_images_reports_each(tmp_path):
    _image_tree(tmp_path / "imgs", n=2)
    folder = scan_image_folder(tmp_path / "imgs")
    bad = find_bad_images(folder, 8, progress=False)
    assert [p.name for p in bad] == ["broken.png"]


# -- symlinks: each real folder read once, each name of a file an image, loops not followed --------------


def _two_classes(root, per_class=8):
    for cls in ("c1", "c2"):
        for i in range(per_class):
            _save(Image.new("RGB", (8, 8), (i * 20, 0, 0)), root / cls / f"{i}.png")
    return root


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) when the code under test runs past 20 s."""
    import signal

    def expired(*_):
        raise TimeoutError("still scanning after 20 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_symlink_loop_adds_no_image_and_no_other_class(tmp_path, capsys, deadline):
    from difffit.engine.evaluation.image_sets import FolderImages

    root = _two_classes(tmp_path / "data")
    os.symlink("..", root / "c1" / "up")  # reached 656 "images" from 16 files, c1 holding c2's images
    os.symlink(".", root / "c2" / "self")  # reached 8 * 41 from 8
    folder = scan_image_folder(root)
    assert folder.class_names == ["c1", "c2"] and len(folder) == 16
    assert [
        f.relative_to(root).parts[0] for f, label in zip(folder.files, folder.labels, strict=True) if label == 0
    ] == ["c1"] * 8
    err = " ".join(capsys.readouterr().err.split())
    assert f"Not following {root / 'c1' / 'up'}" in err and f"Not following {root / 'c2' / 'self'}" in err
    assert FolderImages(root).count == 16  # eval-fid's folders scan the same way


def test_two_loops_in_one_folder_end_quickly(tmp_path, deadline):
    from difffit.engine.evaluation.image_sets import FolderImages

    root = _two_classes(tmp_path / "data")
    os.symlink("..", root / "c1" / "up")
    os.symlink(".", root / "c1" / "self")  # two loops: 2^40 paths, the walk ran for hours
    assert len(scan_image_folder(root)) == 16
    assert FolderImages(root / "c1").count == 8


def test_each_name_of_a_file_is_an_image_and_links_out_are_followed(tmp_path, deadline):
    root = _two_classes(tmp_path / "data", per_class=2)
    os.symlink("0.png", root / "c1" / "alias.png")  # the same file under a second name
    (root / "c1" / "sub").mkdir()
    os.symlink("../1.png", root / "c1" / "sub" / "again.png")
    _save(Image.new("RGB", (8, 8)), tmp_path / "elsewhere" / "far.png")
    os.symlink(tmp_path / "elsewhere", root / "c2" / "more")  # a folder outside the data: followed
    os.symlink(tmp_path / "elsewhere", root / "c2" / "more-again")  # the same folder twice: read once
    os.symlink(".", root / "everything")  # a class folder that is the data folder itself: a loop
    os.link(root / "c2" / "0.png", root / "c2" / "hard.png")  # a hard link: a name of its own too
    folder = scan_image_folder(root)
    assert folder.class_names == ["c1", "c2"]
    assert [f.relative_to(root).as_posix() for f in folder.files] == [
        "c1/0.png",
        "c1/1.png",
        "c1/alias.png",
        "c1/sub/again.png",
        "c2/0.png",
        "c2/1.png",
        "c2/hard.png",
        "c2/more/far.png",
    ]


# -- images the centre crop cannot take -----------------------------------------------------------------


def test_a_thin_strip_is_skipped_before_it_is_upscaled(tmp_path):
    _save(Image.new("RGB", (60000, 1)), tmp_path / "strips" / "strip.png")  # 259 bytes; 12 GB when cropped at 256
    _save(Image.new("RGB", (1, 51)), tmp_path / "strips" / "tall.png")
    _save(Image.new("RGB", (50, 1), (0, 9, 0)), tmp_path / "strips" / "banner.png")  # 50:1 is still taken
    folder = scan_image_folder(tmp_path / "strips", validate=True, progress=False)
    assert [f.name for f in folder.files] == ["banner.png"]
    reasons = dict((p.name, reason) for p, reason in folder.skipped)
    assert reasons["strip.png"] == "60000 x 1 px is more elongated than 50:1, too thin for a centre crop"
    assert "1 x 51 px" in reasons["tall.png"]
    assert center_crop(load_image(folder.files[0]), 8).shape == (8, 8, 3)


def test_keep_classes_keeps_captions_aligned(tmp_path):
    """A held-out set with captions (a dataset's text column) takes the training data's classes after one was
    dropped: its captions follow its files."""
    folder = ImageFolder(
        tmp_path,
        [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"],
        [0, 1, 1],
        ["cat", "dog"],
        captions=["a cat", "a dog", "another dog"],
    )
    kept = folder.keep_classes(["dog"])
    assert (kept.files, kept.labels, kept.captions) == (
        [tmp_path / "b.png", tmp_path / "c.png"],
        [0, 0],
        ["a dog", "another dog"],
    )
