"""Generate the bundled example data (licence-clean: every image is drawn by this script).

- examples/shapes/  the tiny base's domain: bright filled shapes on a light background, 4 classes
- examples/target/  the quickstart's target domain: glowing rings and diagonal stripes on a dark
                    background, 2 classes -- plainly different from the base's domain
- examples/target-t2i/  the text-to-image quickstart's target: captioned scenes (a coloured shape at a
                    place) drawn as neon outlines on a dark background, captions in metadata.jsonl; the
                    bundled tiny-t2i base was trained on the same scenes filled on a light background
                    (drawn by `write_scenes`, from examples/make_tiny_t2i_base.py)

    python examples/make_examples.py            # writes the three folders (deterministic)
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 32
HERE = Path(__file__).resolve().parent


def _shape(draw: ImageDraw.ImageDraw, kind: str, rng: random.Random) -> None:
    r = rng.uniform(6, 11)
    cx, cy = rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1)
    jitter = lambda c: tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in c)  # noqa: E731
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter((220, 40, 40)))
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=jitter((40, 170, 60)))
    elif kind == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        angles = [a + k * 2 * math.pi / 3 for k in range(3)]
        pts = [(cx + r * math.cos(b), cy + r * math.sin(b)) for b in angles]
        draw.polygon(pts, fill=jitter((40, 70, 220)))
    else:  # cross
        w = r / 2.5
        color = jitter((230, 190, 30))
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)


def shape_image(kind: str, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(200, 240) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    _shape(ImageDraw.Draw(img), kind, rng)
    return img


def target_image(kind: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (rng.randint(5, 25), rng.randint(5, 25), rng.randint(30, 60)))
    draw = ImageDraw.Draw(img)
    if kind == "rings":
        cx, cy = rng.uniform(10, 22), rng.uniform(10, 22)
        for r in range(rng.randint(4, 6), 30, rng.randint(5, 7)):
            color = (0, rng.randint(190, 255), rng.randint(190, 255))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=2)
    else:  # stripes
        period, offset = rng.randint(6, 9), rng.randint(0, 8)
        color = (rng.randint(200, 255), rng.randint(0, 60), rng.randint(180, 255))
        for k in range(-SIZE, 2 * SIZE, period):
            x = k + offset
            draw.line([(x, 0), (x + SIZE, SIZE)], fill=color, width=3)
    return img


# Captioned scenes: one shape of one colour at one of five places. The light style is the tiny-t2i base's
# domain; the neon style (an outline in a brighter shade on a dark background) is the quickstart's target.
SCENE_SHAPES = ("circle", "square", "triangle", "cross")
SCENE_COLOURS = {"red": (215, 45, 45), "green": (45, 165, 65), "blue": (45, 75, 215), "yellow": (230, 190, 35)}
NEON_COLOURS = {"red": (255, 70, 110), "green": (60, 255, 140), "blue": (70, 170, 255), "yellow": (255, 240, 80)}
SCENE_PLACES = {
    "top left": (9, 9),
    "top right": (23, 9),
    "bottom left": (9, 23),
    "bottom right": (23, 23),
    "centre": (16, 16),
}
SCENE_BACKGROUNDS = {"light": "on a light background", "neon": "as a neon outline on a dark background"}


def scene_outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The corners of a square, upright triangle or cross of radius `r` around (cx, cy); circles are ellipses."""
    if kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "triangle":  # a little larger than the rest: a triangle covers less of its circle
        return [
            (cx + 1.3 * r * math.cos(a), cy + 0.3 * r + 1.3 * r * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    w = r / 2.5  # cross: a plus sign, arms r long and 2w wide
    return [
        (cx - w, cy - r),
        (cx + w, cy - r),
        (cx + w, cy - w),
        (cx + r, cy - w),
        (cx + r, cy + w),
        (cx + w, cy + w),
        (cx + w, cy + r),
        (cx - w, cy + r),
        (cx - w, cy + w),
        (cx - r, cy + w),
        (cx - r, cy - w),
        (cx - w, cy - w),
    ]


def scene_image(rng: random.Random, style: str) -> tuple[Image.Image, str]:
    """A random scene in `style` ("light" or "neon") and its caption."""
    kind, colour, place = rng.choice(SCENE_SHAPES), rng.choice(list(SCENE_COLOURS)), rng.choice(list(SCENE_PLACES))
    jitter = lambda c, d: tuple(max(0, min(255, v + rng.randint(-d, d))) for v in c)  # noqa: E731
    if style == "light":
        img = Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(205, 240) for _ in range(3)))
        fill, outline = jitter(SCENE_COLOURS[colour], 20), None
    else:
        img = Image.new("RGB", (SIZE, SIZE), (rng.randint(5, 20), rng.randint(5, 20), rng.randint(25, 50)))
        fill, outline = None, jitter(NEON_COLOURS[colour], 15)
    x, y = SCENE_PLACES[place]
    cx, cy, r = x + rng.uniform(-1.5, 1.5), y + rng.uniform(-1.5, 1.5), rng.uniform(5, 6.5)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=2)
    else:
        corners = scene_outline(kind, cx, cy, r)
        draw.polygon(corners, fill=fill, outline=outline, width=2)
    return img, scene_caption(kind, colour, place, style)


def scene_caption(kind: str, colour: str, place: str, style: str) -> str:
    where = "in the centre" if place == "centre" else f"at the {place}"
    return f"a {colour} {kind} {where} {SCENE_BACKGROUNDS[style]}"


def write_scenes(folder: Path, count: int, style: str, seed: int) -> None:
    """`count` scenes as PNGs in `folder`, their captions in folder/metadata.jsonl (file_name, text)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image, caption = scene_image(rng, style)
        image.save(folder / f"{i:04d}.png", optimize=True)
        rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def write(folder: Path, classes: list[str], make, per_class: int, seed: int) -> None:
    rng = random.Random(seed)
    for kind in classes:
        out = folder / kind
        out.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make(kind, rng).save(out / f"{kind}_{i:04d}.png", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes-per-class", type=int, default=250)
    parser.add_argument("--target-per-class", type=int, default=64)
    parser.add_argument("--target-t2i", type=int, default=128, help="captioned images in examples/target-t2i")
    args = parser.parse_args()
    write(HERE / "shapes", ["circle", "cross", "square", "triangle"], shape_image, args.shapes_per_class, seed=0)
    write(HERE / "target", ["rings", "stripes"], target_image, args.target_per_class, seed=1)
    write_scenes(HERE / "target-t2i", args.target_t2i, "neon", seed=2)


if __name__ == "__main__":
    main()
