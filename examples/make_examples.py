"""Generate the bundled example data (licence-clean: every image is drawn by this script).

- examples/shapes/  the tiny base's domain: bright filled shapes on a light background, 4 classes
- examples/target/  the quickstart's target domain: glowing rings and diagonal stripes on a dark
                    background, 2 classes -- plainly different from the base's domain

    python examples/make_examples.py            # writes both folders (deterministic)
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    write(HERE / "shapes", ["circle", "cross", "square", "triangle"], shape_image, args.shapes_per_class, seed=0)
    write(HERE / "target", ["rings", "stripes"], target_image, args.target_per_class, seed=1)


if __name__ == "__main__":
    main()
