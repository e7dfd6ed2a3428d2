"""Sampling speed: our sampler against diffusers' DiTPipeline on the same weights, and adapter swap time.

Both run the same DiT-S/2 weights (16x16 latents, 1000 classes; converted with
bases.original_to_diffusers for diffusers), the same tiny 2-level VAE, batch, step count and
guidance (scale 4 on all 4 channels, the way DiTPipeline guides), with DDIM and with DPM-Solver++.
Swap time: applying and restoring an adapter on a loaded base (DiT-S/2 from a real adapter file,
and DiT-XL/2 shapes with a 101-class adapter). Prints one JSON object.

    python benchmarks/sample.py [--latent 16] [--batch 4] [--steps 25] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    ).eval()


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sampling(args, workdir: Path) -> dict:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    from difffit.engine.evaluation.sample import SamplingOptions, generate
    from difffit.engine.models.bases import Base, state_dict_fingerprint
    from difffit.engine.models.diffusers_layout import original_to_diffusers
    from difffit.engine.models.dit import DiT, config_for

    # 1000 classes: DiTPipeline hard-codes the null class as 1000.
    config = config_for("DiT-S/2", input_size=args.latent, num_classes=1000)
    model = DiT(config).eval()
    with torch.no_grad():  # reference init zeroes the output layers; give every weight a value
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * 0.02)
    vae = tiny_vae()
    vae.save_pretrained(workdir / "vae")
    fingerprint = state_dict_fingerprint(model.state_dict())
    base = Base(model, "random:DiT-S/2", "random", fingerprint, str(workdir / "vae"), vae_factor=2)

    state, kwargs = original_to_diffusers(model.state_dict(), config)
    transformer = DiTTransformer2DModel(**kwargs).eval()
    transformer.load_state_dict(state)
    linear = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
    schedulers = {
        "ddim": DDIMScheduler(**linear, clip_sample=False),
        "dpm-solver": DPMSolverMultistepScheduler(**linear),
    }
    labels = [(7 * i) % 1000 for i in range(args.batch)]
    out = {}
    for ours_name, scheduler in schedulers.items():
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)

        def run_pipe(pipe=pipe):
            with torch.inference_mode():
                pipe(
                    class_labels=labels,
                    guidance_scale=4.0,
                    num_inference_steps=args.steps,
                    generator=torch.manual_seed(0),
                    output_type="np",
                )

        def run_ours(name=ours_name):
            options = SamplingOptions(
                cfg_scale=4.0, cfg_channels="all", scheduler=name, steps=args.steps, batch_size=args.batch, device="cpu"
            )
            generate(base, args.batch, options, classes=labels, progress=False)

        run_ours(), run_pipe()  # warm-up (first-call allocations, lazy imports)
        ours, theirs = best_of(args.repeats, run_ours), best_of(args.repeats, run_pipe)
        out[ours_name] = {
            "ours_images_per_s": round(args.batch / ours, 3),
            "dit_pipeline_images_per_s": round(args.batch / theirs, 3),
            "ratio": round(theirs / ours, 3),
        }
    return out


def swap_ms(base, tensors, meta, repeats: int = 20) -> dict:
    from difffit.engine.methods.adapter import AdapterSwapper

    swapper = AdapterSwapper(base)
    apply = best_of(repeats, lambda: (swapper.apply(tensors, meta), swapper.restore()))
    return {"apply_and_restore_ms": round(apply * 1000, 3)}


def swapping(workdir: Path) -> dict:
    from difffit.engine.methods.adapter import AdapterMeta, expected_shapes, make_meta, read_adapter, save_adapter
    from difffit.engine.methods.trainable import prepare_model, trainable_parameters
    from difffit.engine.models.bases import Base
    from difffit.engine.models.dit import DiT, config_for
    from difffit.engine.models.families import load_base

    # DiT-S/2 through the real file path: save an adapter, read it, swap it in and out.
    base = load_base("random:DiT-S/2", resolution=256, num_classes=1000, vae="identity")
    model = copy.deepcopy(base.model)
    prepare_model(model, "difffit", num_classes=101)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.01)
    meta = make_meta(base, model, "difffit", new_class_table=True, class_names=[str(i) for i in range(101)])
    save_adapter(workdir / "s.safetensors", model, base.model.state_dict(), meta)
    start = time.perf_counter()
    tensors, meta = read_adapter(workdir / "s.safetensors")
    read_ms = (time.perf_counter() - start) * 1000
    out = {"DiT-S/2": {"read_ms": round(read_ms, 3), **swap_ms(base, tensors, meta)}}

    # DiT-XL/2 shapes (uninitialised memory: the swap cost does not depend on the values).
    xl = config_for("DiT-XL/2", input_size=32)
    with torch.device("meta"):
        model = DiT(xl)
    model.to_empty(device="cpu")
    xl_base = Base(model.eval(), "xl", "random", "0" * 16, "identity")
    meta = AdapterMeta(
        method="difffit",
        gamma_blocks=list(range(14)),
        base_spec="xl",
        base_fingerprint="0" * 16,
        base_config=xl.to_dict(),
        config={**xl.to_dict(), "num_classes": 101},
        vae_spec="identity",
        new_class_table=True,
        class_names=[str(i) for i in range(101)],
    )
    tensors = {name: torch.zeros(shape, dtype=torch.float16) for name, shape in expected_shapes(meta).items()}
    out["DiT-XL/2"] = swap_ms(xl_base, tensors, meta)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "setup": {
                "model": "DiT-S/2",
                "latent": args.latent,
                "batch": args.batch,
                "steps": args.steps,
                "cfg_scale": 4.0,
                "cfg_channels": "all",
            },
            "sampling": sampling(args, Path(tmp)),
            "adapter_swap": swapping(Path(tmp)),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
