"""Every option that more than one command takes, declared once as an `Annotated` alias, and the engine's
defaults that the command signatures read.

A default is written once, in the engine's options dataclass, and a command's signature names it:
`steps: opt.FitSteps = opt.FIT.steps` (tests/test_single_source.py holds every command to this). Where two
commands share a flag but not its meaning (fit's --steps counts optimizer steps, sample's counts denoising
steps), each meaning gets its own alias and its own source, so a default never changes by accident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difffit.engine.evaluation.options import DEFAULT_CLIP_MODEL, FID_SAMPLING, SAMPLE_DEFAULTS, EvalConfig
from difffit.engine.methods.settings import MethodSettings
from difffit.engine.models.lora_names import DIT_LORA
from difffit.engine.training.options import FitFields

# Help text is Rich markup (the commands' examples use [bold] and [dim]): write a literal [word] as "\\[word]".
# Every command's output option is --out, or -o for short.
OUT = ("--out", "-o")

# The engine's defaults, by command (plain data: reading them imports no torch).
FIT = FitFields()  # fit and upscale-res
METHOD = MethodSettings()  # the method settings of fit, upscale-res and info
SAMPLE = SAMPLE_DEFAULTS  # sample
EVAL = EvalConfig()  # eval-fid
FID = FID_SAMPLING  # eval-fid's sampling of an adapter or a base

# -- everywhere -----------------------------------------------------------------------------------

Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Vae = Annotated[str | None, typer.Option(help="VAE spec (default: the base's / adapter's).")]
AdapterBase = Annotated[
    str | None,
    typer.Option(
        "--base",
        help="For an adapter: a base other than the one it names (its fingerprint is checked).",
        show_default=False,
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing output that difffit wrote (in a folder, only its own files: files you "
        "added stay; never an input).",
    ),
]
InceptionWeights = Annotated[
    str | None,
    typer.Option(
        help="FID Inception weights: a file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth), or random "
        "(a fixed random network that works offline, for tests: its FIDs only show that the pipeline runs); default: "
        "the torch hub cache, downloaded once.",
        show_default=False,
    ),
]
ClipModel = Annotated[
    str | None,
    typer.Option(
        help=f"CLIP model of the clip metric: hub id or local folder (default: {DEFAULT_CLIP_MODEL}).",
        show_default=False,
    ),
]
ForceBase = Annotated[
    bool,
    typer.Option(
        "--force-base/--no-force-base", help="Apply an adapter to a base whose fingerprint is not the adapter's."
    ),
]

# -- what a model is and what a method trains (fit, upscale-res, info) ----------------------------

Resolution = Annotated[
    int | None,
    typer.Option(
        help="Image size in pixels to train at (default: the base's). A DiT base moves there (see upscale-res); a "
        "text-to-image base trains at any multiple of its size step as it is; sets the size of a random: base.",
        show_default=False,
    ),
]
NumHeads = Annotated[
    int | None,
    typer.Option(
        help="Attention heads, for a base of non-standard width that does not record them.", show_default=False
    ),
]
GammaBlocks = Annotated[
    str | None,
    typer.Option(
        help="Blocks with scale factors: half (default), all, none or ranges like 0-5,20.", show_default=False
    ),
]
GammaPlacement = Annotated[
    str,
    typer.Option(help="difffit: scale factors on each branch (the paper's), or branch+attn (also on qkv and proj)."),
]
Rank = Annotated[int, typer.Option(help="lora: the rank (the paper's LoRA-R8 and -R16).")]
LoraAlpha = Annotated[float | None, typer.Option(help="lora: the scale alpha (default: the rank).", show_default=False)]
LoraTargets = Annotated[
    str | None,
    typer.Option(
        help=f"lora: comma-separated layers among {DIT_LORA.describe()} (default: {','.join(DIT_LORA.default)}).",
        show_default=False,
    ),
]
AdapterDim = Annotated[int, typer.Option(help="adapter-parallel / adapter-sequential: the bottleneck width.")]
PromptTokens = Annotated[int, typer.Option(help="vpt-deep: learned prompt tokens per block.")]

# -- sampling (sample, eval-fid) ------------------------------------------------------------------

NumImages = Annotated[int, typer.Option("-n", "--num-images", help="Images per source.")]
Classes = Annotated[
    list[str] | None,
    typer.Option(
        "--class", help="Class name or index; repeat to cycle (default: all classes in turn).", show_default=False
    ),
]
CfgScale = Annotated[float, typer.Option(help="Guidance: 4.0 to look at, 1.5 for FID (the paper's); 1 = none.")]
CfgChannels = Annotated[str, typer.Option(help="Guide '3' latent channels (reference) or 'all'.")]
Scheduler = Annotated[str, typer.Option(help="ddpm (reference), ddim or dpm-solver.")]
EvalCfgScale = Annotated[
    float | None,
    typer.Option(
        "--cfg-scale",
        help="Guidance of a model's samples (default: DiT 1.5, the paper's FID setting; a text-to-image "
        "base's pipeline's own); 1 = none.",
        show_default=False,
    ),
]
SampleCfgScale = Annotated[
    float | None,
    typer.Option(
        "--cfg-scale",
        help="Guidance (default: DiT 4.0, to look at; a text-to-image base's pipeline's own, PixArt 4.5); "
        "1.5 for DiT FIDs (the paper's); 1 = none.",
        show_default=False,
    ),
]
SampleScheduler = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="DiT: ddpm (reference, the default), ddim or dpm-solver. Text-to-image: the pipeline's own "
        "(the default; PixArt's is dpm-solver), dpm-solver, ddim, ddpm or euler.",
        show_default=False,
    ),
]
Prompts = Annotated[
    list[str] | None,
    typer.Option(
        "--prompt",
        help="Text-to-image: a prompt; repeat for more (image i gets prompt i mod their number).",
        show_default=False,
    ),
]
PromptsFile = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help="Text-to-image: a UTF-8 file of prompts, one per line (blank lines skipped).",
        show_default=False,
    ),
]
NegativePrompt = Annotated[str, typer.Option(help="Text-to-image: what guidance steers away from (default: none).")]
Width = Annotated[
    int | None, typer.Option(help="Text-to-image: width in pixels (default: the base's).", show_default=False)
]
Height = Annotated[
    int | None, typer.Option(help="Text-to-image: height in pixels (default: the base's).", show_default=False)
]
SamplingSteps = Annotated[
    int | None,
    typer.Option(
        "--steps",
        help="Sampling steps (default: DiT ddpm 250, ddim 50, dpm-solver 25; a pipeline's own, PixArt 20).",
        show_default=False,
    ),
]
SamplingSeed = Annotated[int, typer.Option("--seed", help="Image i depends only on (seed, i), not on the batch size.")]
SamplingBatchSize = Annotated[int, typer.Option("--batch-size", help="Images per forward pass (per process).")]
SamplingPrecision = Annotated[str, typer.Option("--mixed-precision", help="no (exact fp32), fp16 or bf16 autocast.")]

# -- fit's options (fit and upscale-res take every one of them) -----------------------------------

Data = Annotated[
    str | None,
    typer.Argument(
        metavar="DATA",
        help="Image folder (one sub-folder per class, or flat: one class), or a dataset: "
        "hf:OWNER/NAME[:split], a save_to_disk folder or parquet files.",
        show_default=False,
    ),
]
FitBase = Annotated[
    str | None,
    typer.Option("--base", help="Base model: alias (DiT-XL/2-256), hub id, local file or folder, or random:DiT-S/2."),
]
Method = Annotated[
    str,
    typer.Option(
        help="difffit, bitfit, full, lora, adapter-parallel, adapter-sequential or vpt-deep (README: Methods)."
    ),
]
Recipe = Annotated[
    str | None, typer.Option(help="TOML recipe (path or shipped name, e.g. food101); command-line options win.")
]
FitOut = Annotated[str | None, typer.Option(*OUT, help="Output folder (default: runs/<data>-<method>).")]
FitSteps = Annotated[int, typer.Option("--steps", help="Total optimizer steps (a resumed run trains up to it).")]
FitBatchSize = Annotated[
    int, typer.Option("--batch-size", help="Global batch per step (split over GPUs, --grad-accum).")
]
LearningRate = Annotated[float | None, typer.Option("--lr", help="Learning rate (default: 1e-3; 1e-4 for full).")]
FitSeed = Annotated[int, typer.Option("--seed", help="Seed of data order, noise and label dropout.")]
FitPrecision = Annotated[
    str,
    typer.Option(
        "--mixed-precision",
        help="auto (bf16 on CUDA, no on CPU), no, fp16, bf16, or fp8 (frozen matrices in float8; "
        "FP8 GPUs such as the H100).",
    ),
]
SaveEvery = Annotated[int, typer.Option(help="Checkpoint every N steps (0: only at the end).")]
SampleEvery = Annotated[int, typer.Option(help="Preview grid every N steps and at step 0 (0: no).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the newest checkpoint in --out.")]
Ema = Annotated[bool, typer.Option("--ema/--no-ema", help="Keep an EMA of the trained tensors; the adapter uses it.")]
EmaDecay = Annotated[float, typer.Option(help="EMA decay (warmed up as (1+s)/(10+s) early on).")]
CacheLatents = Annotated[
    bool, typer.Option("--cache-latents/--no-cache-latents", help="Encode each image once and reuse the latents.")
]
CacheDir = Annotated[str | None, typer.Option(help="Latent cache folder (default: <user cache>/latents).")]
GradCheckpointing = Annotated[
    bool, typer.Option("--grad-checkpointing", help="Recompute activations: less memory, slower.")
]
Compile = Annotated[
    str,
    typer.Option(help="torch.compile each DiT block: auto (on CUDA), on or off. Fixed shapes, so it compiles once."),
]
Keep = Annotated[int, typer.Option(help="Checkpoints to keep (the newest).")]
LogEvery = Annotated[int, typer.Option(help="Write log.jsonl every N steps.")]
Warmup = Annotated[int, typer.Option(help="Linear learning-rate warmup steps.")]
GradAccum = Annotated[int, typer.Option(help="Gradient accumulation micro-steps per step.")]
AdapterDtype = Annotated[str, typer.Option(help="fp16 (stored as differences) or fp32.")]
LogWith = Annotated[
    str | None,
    typer.Option(
        help="Also log scalars and preview grids to tensorboard or wandb (each needs its package; wandb logs offline "
        "without network).",
        show_default=False,
    ),
]
NumWorkers = Annotated[int | None, typer.Option(help="Image-loading processes (default: min(8, CPUs)).")]
ImageColumn = Annotated[
    str | None, typer.Option(help="A dataset's image column (default: its first Image feature).", show_default=False)
]
LabelColumn = Annotated[
    str | None,
    typer.Option(
        help="A dataset's label column (default: its first ClassLabel feature; none: one class).", show_default=False
    ),
]
CaptionColumn = Annotated[
    str | None,
    typer.Option(
        help="Text-to-image: the caption column of metadata.jsonl/.csv files or of a dataset (default: text, else "
        "caption; in metadata files, else the only text column).",
        show_default=False,
    ),
]
CaptionTemplate = Annotated[
    str | None,
    typer.Option(
        help="Text-to-image: caption images that have no caption of their own from their class folder, e.g. "
        '"a photo of {class}" (underscores in folder names read as spaces).',
        show_default=False,
    ),
]
CaptionDropout = Annotated[
    float | None,
    typer.Option(
        help="Text-to-image: train on the empty caption this often, for classifier-free guidance; 0 <= P < 1 "
        "(default: the family's, 0.1; FLUX 0: it samples without an unconditional branch).",
        show_default=False,
    ),
]
MaxTextTokens = Annotated[
    int | None,
    typer.Option(
        help="Text-to-image: caption tokens the text encoder sees (default: the base's; PixArt-alpha 120, "
        "PixArt-Sigma 300, SD3 256, FLUX.1-dev 512, FLUX.1-schnell 256).",
        show_default=False,
    ),
]
TimestepSampling = Annotated[
    str | None,
    typer.Option(
        help="SD3 and FLUX (rectified flow): where training draws its noise levels: logit_normal (default, the SD3 "
        "paper's), uniform or mode.",
        show_default=False,
    ),
]
ValidationPrompts = Annotated[
    list[str] | None,
    typer.Option(
        "--validation-prompt",
        help="Text-to-image: a prompt of the preview grids (fixed seeds, step 0 included); repeat "
        "for more (default: the data's first captions).",
        show_default=False,
    ),
]
Buckets = Annotated[
    str | None,
    typer.Option(
        help="auto: aspect-ratio buckets, each batch of one shape, images centre-cropped to their bucket (the default "
        "for text-to-image bases); none: the square centre crop (the default for DiT).",
        show_default=False,
    ),
]
ClassBalance = Annotated[
    bool, typer.Option("--class-balance", help="Draw every class equally often, whatever its image count.")
]
Repeats = Annotated[
    int, typer.Option(help="Each image N times per epoch (per class: a \\[repeats] table in a recipe).")
]
SnrGamma = Annotated[
    float | None,
    typer.Option(
        help="Min-SNR-gamma weighting of the MSE term, e.g. 5 (default: off, the reference loss; epsilon-prediction "
        "bases only).",
        show_default=False,
    ),
]
P2Gamma = Annotated[
    float | None,
    typer.Option(
        help="P2 weighting (k=1) of the MSE term, e.g. 1 (default: off; epsilon-prediction bases only).",
        show_default=False,
    ),
]
ValFraction = Annotated[
    float,
    typer.Option(
        help="Hold out this fraction of each class (text-to-image: of each class and aspect-ratio bucket), fixed by "
        "--seed, for validation."
    ),
]
ValData = Annotated[
    str | None,
    typer.Option(
        help="A separate validation folder or dataset, with the training classes (text-to-image: captioned).",
        show_default=False,
    ),
]
ValEvery = Annotated[int, typer.Option(help="Validation loss every N steps (0: at the end only).")]
EvalEvery = Annotated[int, typer.Option(help="FID/KID (and --eval-metrics clip) of samples every N steps (0: never).")]
EvalN = Annotated[
    int | None,
    typer.Option(
        help="Samples per in-training evaluation (default: DiT 1000, at DDIM 50 steps and cfg 1.5; text-to-image one "
        "per held-out caption or --eval-prompts line, at the preview settings).",
        show_default=False,
    ),
]
EvalReference = Annotated[
    str | None,
    typer.Option(
        help="In-training FID reference: an image folder or a statistics .npz (extracted once, cached); default: the "
        "held-out images.",
        show_default=False,
    ),
]
EvalMetrics = Annotated[
    str,
    typer.Option(
        help="In-training metrics, comma-separated: fid (with KID), clip (CLIP score of text-to-image samples against "
        "their prompts)."
    ),
]
EvalPrompts = Annotated[
    str | None,
    typer.Option(
        help="Text-to-image: a prompts file (one per line) that in-training evaluation samples (default: the held-out "
        "captions).",
        show_default=False,
    ),
]
KeepBest = Annotated[
    str | None, typer.Option(help="Keep best/adapter.safetensors by fid, clip or val_loss.", show_default=False)
]

# -- flags that mean something else in each command ----------------------------------------------

SampleOut = Annotated[
    Path | None,
    typer.Option(*OUT, help="Output folder (default samples/<source>; a sub-folder per source).", show_default=False),
]
MergeOut = Annotated[
    Path, typer.Option(*OUT, help="Output: a .safetensors file, or a folder for diffusers.", show_default=False)
]
EvalNumImages = Annotated[
    int | None,
    typer.Option(
        "-n",
        "--num-images",
        help="Generated images to use: the first N of a folder/npz (default all), "
        "or N samples from a model (default 50,000).",
        show_default=False,
    ),
]
EvalBatchSize = Annotated[int, typer.Option("--batch-size", help="Images per Inception (and sampling) batch.")]
MethodToDescribe = Annotated[
    str | None,
    typer.Option(
        "--method",
        help="Show what this method would train (any fit --method), next to the paper's count.",
        show_default=False,
    ),
]
PushOut = Annotated[
    Path | None, typer.Option(*OUT, help="With --dry-run: the new folder to write.", show_default=False)
]
# A str, not a Path: a trailing "/" (a folder to write report.html in) must survive parsing.
ReportOut = Annotated[
    str, typer.Option(*OUT, help="The HTML file to write (a folder, or a name ending in /: report.html in it).")
]
