"""What the text-embedding cache saves per training step: encoding a batch of captions with T5 against
taking it from the cache (memory-mapped, on disk), and the memory each needs.

    python benchmarks/text_cache.py                          # CPU: a scaled-down T5 (512 wide, 4 layers)
    python benchmarks/text_cache.py --device cuda --t5 xxl   # PixArt's T5-XXL encoder (4.8B), random weights

The encoder is transformers' T5EncoderModel with random weights (the same compute; nothing downloaded),
fed token ids drawn from a hash of each caption (tokenizing costs microseconds next to T5). The cache
stores prompt_embeds in bf16 and the attention mask, as a caller picking bf16 does. Encoding and taking
alternate over the repeats (benchmarks/_timing.py); prints one JSON object: seconds per batch (median,
min, max), their ratio, the encoder's weight bytes and the cache's bytes per caption.
"""

from __future__ import annotations

import argparse
import tempfile
import zlib

import torch
from _timing import emit, environment, interleave, paired_ratio, small_mode, spread, timer

from difffit.engine.data.text_cache import text_embeddings

T5 = {  # T5 v1.1 shapes: "xxl" is PixArt's text encoder (google/t5-v1_1-xxl)
    "xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    "cpu": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=4, num_heads=8),
    "small": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--t5", choices=sorted(T5), default="small" if small_mode() else "cpu")
    parser.add_argument("--tokens", type=int, default=120, help="PixArt-alpha 120, PixArt-Sigma 300")
    parser.add_argument("--batch", type=int, default=8 if small_mode() else 32)
    parser.add_argument("--captions", type=int, default=64 if small_mode() else 512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from transformers import T5Config, T5EncoderModel

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", dropout_rate=0.0, **T5[args.t5])
    encoder = T5EncoderModel(config).to(device, dtype).eval()

    @torch.no_grad()
    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.stack(
            [
                torch.randint(3, 32128, (args.tokens,), generator=torch.Generator().manual_seed(zlib.crc32(c.encode())))
                for c in captions
            ]
        ).to(device)
        mask = torch.ones_like(ids)
        return {"prompt_embeds": encoder(ids, attention_mask=mask)[0], "prompt_attention_mask": mask}

    captions = [f"caption number {i}" for i in range(args.captions)]
    batch = captions[: args.batch]
    with tempfile.TemporaryDirectory() as tmp:
        cached = text_embeddings(
            captions,
            encode,
            key=f"t5-{args.t5}/{args.tokens}",
            cache_dir=tmp,
            batch_size=args.batch,
            dtype=torch.bfloat16,
            progress=False,
        )
        indices = torch.randperm(args.captions)[: args.batch]
        times = interleave(
            {
                "encode": timer(lambda: encode(batch), device),
                "cache": timer(lambda: {k: v.to(device) for k, v in cached.take(indices).items()}, device),
            },
            args.repeats,
        )
        per_caption = sum(a.itemsize * a[0].size for a in cached.shards[0].arrays.values())
    emit(
        {
            **environment(device),
            "t5": args.t5,
            "tokens": args.tokens,
            "batch": args.batch,
            "encode_s_per_batch": spread(times["encode"], 6),
            "cache_s_per_batch": spread(times["cache"], 6),
            "encode_over_cache": paired_ratio(times["encode"], times["cache"], 1),
            "encoder_weight_bytes": sum(p.numel() * p.element_size() for p in encoder.parameters()),
            "cache_bytes_per_caption": per_caption,
        }
    )


if __name__ == "__main__":
    main()
