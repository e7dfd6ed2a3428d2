"""DiffFit training loss with fp8 frozen weights against bf16: same base, data, seeds and steps.

    python benchmarks/fp8_loss.py --device cuda --config DiT-XL/2 --latent 32 --batch 32 --steps 300
    DIFFFIT_BENCH_SMALL=1 python benchmarks/fp8_loss.py --fp8-anywhere        # CPU smoke run

Both runs see the same latents (a fixed set of `--images` random latents, the batch order, timesteps
and noise all drawn per step from (seed, step)), so the losses differ only by the precision. The
goal (issue 13): the mean loss over the run within 2% of bf16's. Random base weights (the GPU
machine has no network), adaLN-Zero perturbed so the blocks do real work. Prints one JSON object.
"""

from __future__ import annotations

import argparse

import torch
from _timing import emit, environment, small_mode

from difffit.engine.devices import require_fp8
from difffit.engine.methods.trainable import cast_frozen_matrices, prepare_model, trainable_parameters
from difffit.engine.models.diffusion import GaussianDiffusion
from difffit.engine.models.dit import DiT, config_for
from difffit.engine.models.fp8 import quantize_frozen_linears
from difffit.engine.models.speed import compile_blocks, make_optimizer
from difffit.engine.training.step import LossMeter, step_generator


def train(args: argparse.Namespace, precision: str, device: torch.device) -> list[float]:
    """Per-window mean losses (windows of `--log-every` steps) of one run."""
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 675M values init in seconds on a GPU
        model = DiT(config_for(args.config, input_size=args.latent, num_classes=1000))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed" and not p.any():
                p.normal_(std=0.02)
    prepare_model(model, "difffit")
    if precision == "fp8":
        quantize_frozen_linears(model, kernel=device.type == "cuda")
    cast_frozen_matrices(model, torch.bfloat16)
    model.to(device).train()
    if args.compile == "on":
        compile_blocks(model)
    optimizer = make_optimizer(trainable_parameters(model).values(), 1e-3, device)
    data_g = torch.Generator().manual_seed(1)
    latents = torch.randn((args.images, 4, args.latent, args.latent), generator=data_g).to(device)
    labels = torch.randint(0, 1000, (args.images,), generator=data_g).to(device)
    diffusion, meter, windows = GaussianDiffusion(), LossMeter(device, args.log_every), []
    for step in range(args.steps):
        torch.manual_seed(step)  # label dropout
        g = step_generator(device, 0, step)
        index = torch.randint(0, args.images, (args.batch,), generator=g, device=device)
        t, noise = diffusion.draw(g, args.batch, tuple(latents.shape[1:]))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            losses = diffusion.training_losses(
                lambda xt, ts, y=labels[index]: model(xt, ts, y).float(), latents[index], t, noise
            )
        loss = losses["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.add(loss, losses["mse"].mean(), losses["vb"].mean())
        if meter.due(step + 1, args.steps):
            windows.append(meter.read()["loss"])
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small = small_mode()
    parser.add_argument("--config", default="DiT-S/2")
    parser.add_argument("--latent", type=int, default=8 if small else 32)
    parser.add_argument("--batch", type=int, default=4 if small else 32)
    parser.add_argument("--steps", type=int, default=20 if small else 300)
    parser.add_argument("--images", type=int, default=16 if small else 1024)
    parser.add_argument("--log-every", type=int, default=5 if small else 50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", default="off", choices=("off", "on"))
    parser.add_argument("--fp8-anywhere", action="store_true", help="fp8 without tensor cores (CPU smoke runs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not args.fp8_anywhere:
        require_fp8(device)
    runs = {precision: train(args, precision, device) for precision in ("bf16", "fp8")}
    mean = {p: sum(w) / len(w) for p, w in runs.items()}
    emit(
        {
            "benchmark": "fp8_loss",
            **environment(device),
            "config": args.config,
            "latent": args.latent,
            "batch": args.batch,
            "steps": args.steps,
            "images": args.images,
            "compile": args.compile,
            "loss_windows": {p: [round(v, 5) for v in w] for p, w in runs.items()},
            "mean_loss": {p: round(v, 5) for p, v in mean.items()},
            "fp8/bf16 mean loss": round(mean["fp8"] / mean["bf16"], 4),
            "goal": "within 2% (0.98..1.02)",
        }
    )


if __name__ == "__main__":
    main()
