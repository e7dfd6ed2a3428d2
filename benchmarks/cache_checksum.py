"""What checking the latent cache costs, next to what building it costs: checksum time / encoding time.

    python benchmarks/cache_checksum.py                    # CPU: SD-VAE architecture, 256 px, batch 4
    python benchmarks/cache_checksum.py --device cuda --batch 64

The VAE is `AutoencoderKL` with stabilityai/sd-vae-ft-ema's architecture and random weights (the same
compute; nothing downloaded). Per image, the cache holds 2 (flips) x 2 (mean, std) x 4 x 32 x 32 fp16
values = 32 KiB at 256 px; the checksum reads that back when a run opens the cache. Encoding and
checksumming alternate over the repeats (benchmarks/_timing.py); prints one JSON object with medians,
min and max, and the ratio (the goal: under 5%).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _timing import emit, environment, interleave, paired_ratio, spread, timer

from difffit.engine.data.cache_files import file_checksum

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512),
    sample_size=256,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2000, help="cached images in the checksummed file")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from diffusers import AutoencoderKL

    device = torch.device(args.device)
    vae = AutoencoderKL(**SD_VAE).to(device).eval()
    images = torch.rand(args.batch * 2, 3, args.resolution, args.resolution, device=device) * 2 - 1  # + mirrors
    latent = args.resolution // 8
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "latents.npy"
        np.save(path, np.zeros((args.rows, 2, 2, 4, latent, latent), dtype=np.float16))
        times = interleave(
            {
                "encode": timer(lambda: vae.encode(images).latent_dist.sample(), device),
                "checksum": timer(lambda: file_checksum(path), device),
            },
            args.repeats,
        )
    encode = [t / args.batch for t in times["encode"]]
    checksum = [t / args.rows for t in times["checksum"]]
    emit(
        {
            **environment(device),
            "resolution": args.resolution,
            "batch": args.batch,
            "rows": args.rows,
            "encode_s_per_image": spread(encode, 7),
            "checksum_s_per_image": spread(checksum, 9),
            "checksum_over_encode": paired_ratio(checksum, encode, 9),
        }
    )


if __name__ == "__main__":
    main()
