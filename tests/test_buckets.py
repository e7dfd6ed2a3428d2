"""Aspect-ratio buckets: the bucket shapes, the plan (nearest aspect, small buckets merged), the bucket schedule
(one bucket per step, every image equally often, exact resume, any process split), and fit on a tiny PixArt
pipeline with mixed-aspect captioned images: no image dropped, every batch of one size, the counts printed,
a latent cache per bucket hit on the second run, exact resume; DiT keeps its square crop."""

from __future__ import annotations

import functools
import io
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from t2i_fixtures import make_mixed_aspect_data, make_tiny_pixart, record_batch_shapes, t2i_fit_config

from difffit.engine.data import latents as latents_module
from difffit.engine.data.batches import BucketOrder, DataOrder, Split
from difffit.engine.data.buckets import Bucket, BucketedLatents, bucket_sizes, plan_buckets
from difffit.engine.data.images import BadImage, center_crop, image_size, load_image, scan_image_folder
from difffit.engine.data.latents import cache_key
from difffit.engine.errors import DiffFitError
from difffit.engine.methods.adapter import read_adapter_meta
from difffit.engine.models.families import DIT, PIXART
from difffit.engine.progress import stderr_console
from difffit.engine.training import train
from difffit.engine.training.conditions import check_options
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit

# -- the buckets of a resolution ------------------------------------------------------------------------


@pytest.mark.parametrize("resolution, multiple, step", [(1024, 16, 64), (512, 16, 32), (256, 16, 16), (16, 8, 8)])
def test_bucket_shapes_have_about_the_squares_area(resolution, multiple, step):
    sizes = bucket_sizes(resolution, multiple)
    assert (resolution, resolution) in sizes
    assert set(sizes) == {(h, w) for w, h in sizes}  # every landscape bucket has its portrait twin
    assert [w / h for w, h in sizes] == sorted(w / h for w, h in sizes)
    for width, height in sizes:
        assert width % step == 0 and height % step == 0
        assert 1 / 4 <= width / height <= 4
        # never more pixels than the square (no batch needs more memory), and within one step of it
        assert resolution**2 - step * max(width, height) < width * height <= resolution**2


def test_1024_buckets_span_1_to_4_in_64_px_steps():
    sizes = bucket_sizes(1024, 16)
    assert sizes[0] == (512, 2048) and sizes[-1] == (2048, 512)
    assert len(sizes) == 17  # short sides 512, 576, ..., 1024: 9 landscape, 9 portrait, the square once


# -- the plan ---------------------------------------------------------------------------------------------


def test_a_models_largest_side_narrows_the_aspect_ratios():
    """SD3 at 2048 px: its 3072 px positional table keeps the 4:1 buckets (4096 px long) out, never the square;
    a 4:1 image goes to the widest bucket left."""
    every, capped = bucket_sizes(2048, 16), bucket_sizes(2048, 16, largest=3072)
    assert max(map(max, every)) > 3072 and set(capped) == {size for size in every if max(size) <= 3072}
    assert (2048, 2048) in capped
    buckets = plan_buckets([(4000, 1000), (1000, 1000)], 2048, 16, batch_size=1, largest=3072)
    assert [b.size for b in buckets] == [(2048, 2048), max(capped, key=lambda s: s[0] / s[1])]


def test_each_image_goes_to_the_nearest_aspect_ratio():
    sizes = [(1024, 512), (512, 512), (500, 1000), (300, 1200), (640, 480)]
    buckets = plan_buckets(sizes, 512, 16, batch_size=1)
    where = {i: bucket.size for bucket in buckets for i in bucket.members}
    shapes = bucket_sizes(512, 16)
    for i, (w, h) in enumerate(sizes):
        best = min(abs(math.log(w / h * sh / sw)) for sw, sh in shapes)
        assert abs(math.log(w / h * where[i][1] / where[i][0])) == best
    assert where[1] == (512, 512) and where[3] == (256, 1024) and where[0] == (736, 352)


def test_small_buckets_merge_into_their_nearest_neighbour_smallest_first():
    # At 512 px: 2:1 -> 736 x 352, 1:2 -> 352 x 736, 1:4 -> 256 x 1024. With a batch of 4, the 1:4 image joins
    # its neighbour 352 x 736 (2 + 1 = 3, still small), which then joins the square.
    sizes = [(1024, 512)] * 5 + [(512, 512)] * 5 + [(512, 1024)] * 2 + [(300, 1200)]
    buckets = plan_buckets(sizes, 512, 16, batch_size=4)
    assert [(b.size, len(b.members)) for b in buckets] == [((512, 512), 8), ((736, 352), 5)]
    assert buckets[0].merged == (((352, 736), 2), ((256, 1024), 1))
    assert sorted(i for b in buckets for i in b.members) == list(range(len(sizes)))  # none dropped
    # With a batch of 2 the lone 1:4 image joins 352 x 736, which then holds a batch and stays; data smaller
    # than one batch stays one bucket (fit refuses it).
    smaller = plan_buckets(sizes, 512, 16, batch_size=2)
    assert [(b.size, len(b.members)) for b in smaller] == [((352, 736), 3), ((512, 512), 5), ((736, 352), 5)]
    assert [len(b.members) for b in plan_buckets([(10, 10)] * 2 + [(40, 10)], 16, 8, 4)] == [3]


# -- the crop and the sizes --------------------------------------------------------------------------------


def test_a_bucket_crop_covers_the_bucket_and_cuts_its_centre():
    image = np.zeros((16, 64, 3), dtype=np.uint8)
    image[:, :32, 0] = 255  # left half red, right half blue
    image[:, 32:, 2] = 255
    crop = center_crop(Image.fromarray(image), 32, 16)  # 4:1 into a 2:1 bucket: the middle half of the width
    assert crop.shape == (16, 32, 3)
    assert (crop[:, :16, 0] == 255).all() and (crop[:, 16:, 2] == 255).all()
    # A large image is box-halved while both sides stay at least twice the bucket's, as ADM does for a square.
    big = Image.fromarray(np.full((400, 200, 3), 90, dtype=np.uint8))
    assert center_crop(big, 40, 100).shape == (100, 40, 3)


def test_image_sizes_come_from_the_header_with_exif_orientation(tmp_path):
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: a 30 x 10 file shows as 10 x 30
    Image.new("RGB", (30, 10), "red").save(path, exif=exif)
    assert image_size(path) == (10, 30) == load_image(path).size
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BadImage, match="not a readable image"):
        image_size(tmp_path / "broken.png")


def test_dataset_rows_read_their_size(tmp_path):
    import datasets

    from difffit.engine.data.hf_datasets import open_data

    buffer = io.BytesIO()
    Image.new("RGB", (24, 12)).save(buffer, format="PNG")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {"image": [{"bytes": buffer.getvalue(), "path": None}], "text": ["a"]}, features=features
    ).save_to_disk(str(tmp_path / "saved"))
    folder = open_data(str(tmp_path / "saved"))
    assert folder.size(folder.files[0]) == (24, 12) == folder.load(folder.files[0]).size


# -- the schedule -----------------------------------------------------------------------------------------

BUCKETS = [[0, 2, 5], [1, 3, 4, 6, 7, 8], [9, 10]]


def test_every_step_draws_one_bucket_and_a_round_draws_every_image_batch_times():
    order = BucketOrder(BUCKETS, [0] * 11, seed=3)
    split = Split(batch_size=2, grad_accum=1, rank=0, world=1)
    assert order.n == 11  # a round: as many steps as images
    drawn = Counter()
    for step in range(2 * order.n):
        batch = order.take_batch(split, step, 0).tolist()
        assert any(set(batch) <= set(bucket) for bucket in BUCKETS)
        drawn.update(batch)
    assert drawn == {i: 4 for i in range(11)}  # two rounds, each image twice a round whatever its bucket
    buckets = [
        next(b for b, items in enumerate(BUCKETS) if order.take_batch(split, s, 0)[0] in items) for s in range(order.n)
    ]
    assert buckets != sorted(buckets)  # the buckets take turns in a shuffled order, not one after another


def test_repeats_draw_an_image_that_many_times_more():
    order = BucketOrder(BUCKETS, [0] * 11, seed=0, repeats=[3] + [1] * 10)
    split = Split(batch_size=2, grad_accum=1, rank=0, world=1)
    drawn = Counter(i for s in range(order.n) for i in order.take_batch(split, s, 0).tolist())
    assert order.n == 13 and drawn == {0: 6, **{i: 2 for i in range(1, 11)}}


def test_the_schedule_is_a_function_of_seed_and_step_over_any_process_split():
    one = Split(batch_size=4, grad_accum=1, rank=0, world=1)
    walked = BucketOrder(BUCKETS, [0] * 11, seed=5)
    steps = [walked.take_batch(one, s, 0) for s in range(40)]  # across several rounds
    fresh = BucketOrder(BUCKETS, [0] * 11, seed=5)  # a resumed run starts here
    assert torch.equal(fresh.take_batch(one, 37, 0), steps[37])
    # 2 processes x 2 micro-steps take the slices of the same global batch, in order.
    for step in (0, 11, 37):
        parts = [
            BucketOrder(BUCKETS, [0] * 11, seed=5).take_batch(Split(4, 2, rank, 2), step, micro)
            for micro in range(2)
            for rank in range(2)
        ]
        assert torch.equal(torch.cat(parts), steps[step])
    assert not torch.equal(
        torch.stack(steps),
        torch.stack([BucketOrder(BUCKETS, [0] * 11, seed=6).take_batch(one, s, 0) for s in range(40)]),
    )


def test_bucketed_latents_draw_from_the_batchs_bucket_and_refuse_a_mixed_batch():
    class Part:
        def __init__(self, shape):
            self.cache_path, self._shape, self.calls = None, shape, []

        def shape(self, index):
            return self._shape

        def draw(self, index, flips, noise, device):
            self.calls.append(index.tolist())
            return noise

    parts = [Part((4, 8, 8)), Part((4, 4, 16))]
    latents = BucketedLatents([Bucket((16, 16), (0, 2)), Bucket((32, 8), (1, 3, 4))], parts)
    assert latents.shape(torch.tensor([4, 1])) == (4, 4, 16)
    latents.draw(torch.tensor([4, 1]), torch.zeros(2), torch.zeros(2, 4, 4, 16), "cpu")
    assert parts[1].calls == [[2, 0]]  # items 4 and 1 are places 2 and 0 of their bucket
    with pytest.raises(ValueError, match="each batch must be of one"):
        latents.draw(torch.tensor([0, 1]), torch.zeros(2), torch.zeros(2, 4, 8, 8), "cpu")


# -- fit on a tiny PixArt pipeline ------------------------------------------------------------------------

# The tiny pipeline makes 16 px images (VAE factor 2, patch 2: sides in multiples of 8 px): buckets 8 x 32,
# 16 x 16 and 32 x 8. With a batch of 4 the two 1:4 images are merged into the square bucket.
MIXED = {(40, 10): 4, (20, 20): 5, (10, 40): 2}
PLAN = [
    {"width": 16, "height": 16, "images": 7, "merged": [{"width": 8, "height": 32, "images": 2}]},
    {"width": 32, "height": 8, "images": 4, "merged": []},
]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return make_tiny_pixart(tmp_path_factory.mktemp("pixart") / "pipe")


@pytest.fixture
def data(tmp_path):
    return make_mixed_aspect_data(tmp_path / "data", MIXED)


@pytest.fixture
def conf(tmp_path, data, pipeline_dir):
    return functools.partial(t2i_fit_config, data, pipeline_dir, tmp_path, steps=8)


def test_mixed_aspect_data_trains_in_batches_of_one_bucket(conf, monkeypatch, capsys):
    shapes = record_batch_shapes(monkeypatch)
    result = fit(conf(), progress=False)  # buckets are the default for PixArt
    assert result.images == 11 and result.skipped == 0 and result.buckets == PLAN
    assert len(shapes) == 8 and set(shapes) == {(4, 4, 8, 8), (4, 4, 4, 16)}  # latents of 16 x 16 and 32 x 8 px
    err = capsys.readouterr().err
    assert "Aspect-ratio buckets (batch 4)" in err and "32 x 8" in err and "8 x 32 (2 images)" in err
    assert read_adapter_meta(result.adapter).training["buckets"] == PLAN


def test_the_1024_models_micro_conditions_are_each_batchs_bucket(conf, tmp_path, monkeypatch):
    """The α 1024-MS model reads the image size: each batch passes its bucket's (height, width) in pixels and
    height / width, as the pipeline does when it samples at that size."""
    from difffit.engine.models.families import pixart

    seen, conditions = [], pixart.micro_conditions

    def spy(model, x, base):
        out = conditions(model, x, base)
        seen.append((tuple(x.shape[-2:]), out["resolution"][0].tolist(), out["aspect_ratio"][0].item()))
        return out

    monkeypatch.setattr(pixart, "micro_conditions", spy)
    ms = make_tiny_pixart(
        tmp_path / "ms",
        num_attention_heads=3,
        attention_head_dim=16,
        cross_attention_dim=48,
        use_additional_conditions=True,
    )
    fit(conf(base=str(ms), steps=6), progress=False)
    assert {(latent, tuple(px), aspect) for latent, px, aspect in seen} == {
        ((8, 8), (16.0, 16.0), 1.0),
        ((4, 16), (8.0, 32.0), 0.25),
    }  # latents (h, w) -> pixels (h, w), h / w


def test_encoded_on_the_fly_per_bucket_without_a_cache(conf, tmp_path):
    result = fit(conf(steps=2, cache_latents=False), progress=False)
    assert result.buckets == PLAN and result.cache is None and not list(tmp_path.glob("cache/*/meta.json"))


def test_a_latent_cache_per_bucket_hit_on_the_second_run_and_apart_from_the_square(conf, tmp_path, monkeypatch):
    builds, build = [], latents_module._build_cache

    def counting(tmp, folder, size, *args):
        builds.append(size)
        return build(tmp, folder, size, *args)

    monkeypatch.setattr(latents_module, "_build_cache", counting)
    first = fit(conf(steps=1, out=str(tmp_path / "one")), progress=False)
    assert sorted(builds) == [(16, 16), (32, 8)]
    metas = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/meta.json")]
    assert sorted((m["size"], len(m["files"])) for m in metas) == [([16, 16], 7), ([32, 8], 4)]
    second = fit(conf(steps=1, out=str(tmp_path / "two")), progress=False)
    assert len(builds) == 2 and second.cache == first.cache == str(tmp_path / "cache")
    square = fit(conf(steps=1, buckets="none", out=str(tmp_path / "square")), progress=False)
    assert builds[2:] == [16] and square.buckets is None  # the square crop of all 11: a cache of its own
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 3
    folder = scan_image_folder(conf().data)
    assert cache_key(folder, 16, "v") != cache_key(folder, (16, 16), "v")  # a square bucket is not the square crop


def test_resume_with_buckets_equals_an_uninterrupted_run(conf, tmp_path):
    from safetensors.torch import load_file

    full = fit(conf(save_every=4, out=str(tmp_path / "full")), progress=False)
    fit(conf(steps=4, save_every=4, out=str(tmp_path / "half")), progress=False)
    resumed = fit(conf(save_every=4, out=str(tmp_path / "half"), resume=True), progress=False)
    assert resumed.start_step == 4 and resumed.step == 8 and resumed.buckets == full.buckets == PLAN
    a, b = load_file(str(full.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [
        [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
        for out in (full.out_dir, resumed.out_dir)
    ]
    assert logs[0] == logs[1]


def test_an_image_lost_while_caching_never_leaves_a_bucket_below_the_batch(conf, data, capsys, monkeypatch):
    monkeypatch.setattr(stderr_console, "width", 1000)  # Rich would wrap a long path mid-name
    broken = data / "40x10-0.png"
    broken.write_bytes(broken.read_bytes()[:60])  # the header reads (40 x 10), the pixels do not
    result = fit(conf(steps=1, buckets="auto"), progress=False)
    # 3 wide images are left, fewer than the batch: planned again, they join the square bucket.
    assert result.skipped == 1 and result.images == 10
    assert result.buckets == [
        {
            "width": 16,
            "height": 16,
            "images": 10,
            "merged": [{"width": 8, "height": 32, "images": 2}, {"width": 32, "height": 8, "images": 3}],
        }
    ]  # the smallest first
    assert f"skipped {broken}: not a readable image" in capsys.readouterr().err


def test_data_with_no_readable_image_is_one_sentence(conf, data):
    for image in data.glob("*.png"):
        image.write_bytes(b"not a png")
    with pytest.raises(DiffFitError, match="None of the 11 image files .* could be read"):
        fit(conf(steps=1), progress=False)


def test_what_buckets_cannot_do_is_refused_in_one_sentence(conf, tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
    with pytest.raises(DiffFitError, match="--class-balance cannot be used with aspect-ratio buckets"):
        check_options(conf(class_balance=True), PIXART)
    check_options(conf(class_balance=True, buckets="none"), PIXART)
    with pytest.raises(DiffFitError, match="Unknown --buckets 'square'"):
        conf(buckets="square").validate()
    dit = FitConfig(
        data=str(toy_data),
        base=str(tiny_base_file),
        vae=str(tiny_vae_dir),
        steps=1,
        buckets="auto",
        out=str(tmp_path / "dit"),
    )
    with pytest.raises(DiffFitError, match="--buckets auto needs a base that takes any image size"):
        fit(dit, progress=False)
    assert not (tmp_path / "dit").exists()


def test_a_dit_run_keeps_its_square_crop_and_data_order(tmp_path, toy_data, tiny_base_file, tiny_vae_dir, monkeypatch):
    seen, loop = {}, train.train_loop

    def spy(run, *args, **kwargs):
        seen.update(
            order=run.batches.order,
            x0=run.batches.micro_batch(3, 0, torch.Generator().manual_seed(0))[0],
            labels=run.folder.labels,
        )
        return loop(run, *args, **kwargs)

    monkeypatch.setattr(train, "train_loop", spy)
    result = fit(
        FitConfig(
            data=str(toy_data),
            base=str(tiny_base_file),
            vae=str(tiny_vae_dir),
            steps=1,
            batch_size=4,
            save_every=0,
            sample_every=0,
            num_workers=0,
            compile="off",
            cache_dir=str(tmp_path / "cache"),
            out=str(tmp_path / "run"),
        ),
        progress=False,
    )
    assert DIT.fixed_size and result.buckets is None
    assert type(seen["order"]) is DataOrder and seen["x0"].shape == (4, 4, 8, 8)  # 24 x 20 px images, 16 px squares
    assert torch.equal(seen["order"].take_batch(Split(4, 1, 0, 1), 3, 0), DataOrder(seen["labels"], 0).take(12, 4))
    assert result.cache == str(tmp_path / "cache" / cache_key(scan_image_folder(toy_data), 16, str(tiny_vae_dir)))
