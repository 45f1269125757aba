"""What several commands share: option types, parsing of lists, rendering. No torch here: the
CLI's front door (`vitprune --help`) stays light; the library loads when a command runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vitprune.errors import VitpruneError

console = Console(stderr=True)  # tables and progress on stderr keep stdout clean for --json

ModelArg = Annotated[str, typer.Argument(help="timm model name or alias (deit_small), a vitprune artifact folder / .safetensors, or a transformers ViT/DeiT/DINOv2 folder.")]
CheckpointOpt = Annotated[Path | None, typer.Option("--checkpoint", "-c", help="Local weights: .pth/.bin/.safetensors, a state_dict or one under 'model'/'state_dict'.")]
NoPretrainedOpt = Annotated[bool, typer.Option("--no-pretrained", help="Random weights (mechanics only).")]
ImgSizeOpt = Annotated[int | None, typer.Option("--img-size", help="Input resolution (timm resamples the position embedding).")]
DataOpt = Annotated[str | None, typer.Option("--data", "-d", help="Images: ImageFolder (wnid or index folders), a folder with labels.csv, plain images, or a dataset timm reads: hfds/NAME_OR_FOLDER, wds/SHARD_FOLDER (with --split), a .tar of images.")]
SplitOpt = Annotated[str | None, typer.Option("--split", help="hfds: the split (default train); wds: a split of the folder's _info.json, or shard names such as 'val-{000..009}.tar'.")]
LabelFieldOpt = Annotated[str | None, typer.Option("--label-field", help="hfds: the label column (default label; without it, unlabelled); wds: a field of each sample's .json (default: the .cls file).")]
ImageFieldOpt = Annotated[str | None, typer.Option("--image-field", help="hfds: the image column (default image); wds: the image extensions (default jpg;png;webp).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Use at most this many images (a fixed random subset).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Batch size for evaluation.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Image decoding workers.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Precision of evaluation and timing: float32, bfloat16 or float16 (autocast; float16 is slow on most CPUs).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the models for evaluation and --bench (compile time reported apart).")]
CompileModeOpt = Annotated[str, typer.Option("--compile-mode", help="torch.compile mode: default, reduce-overhead (CUDA graphs on a GPU) or max-autotune.")]
OutOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Write the artifact folder here.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]
# the methods themselves are listed when a command's --help is shown (`registry_help`): the registry loads torch
METHOD_HELP = ("The reduction: METHOD:NAME=VALUE,...@LAYERS (settings and layers optional), several joined by '+', with 'head-only' and "
               "SIZEpx terms, e.g. tome:r=13,protect=0.2@0-10 or tome:r=8@0-5+evit:keep=0.7@6,9; a report's plan "
               "line pastes back here. `vitprune methods` lists every parameter (an artifact carries its plan).")
MethodOpt = Annotated[str | None, typer.Option("--method", "-m", help=METHOD_HELP)]
KeepOpt = Annotated[float | None, typer.Option("--keep", "-k", help="Shorthand for --method METHOD:keep=VALUE (evit, ats, ...: the share kept, or ats' cap).")]
ROpt = Annotated[int | None, typer.Option("--r", help="Shorthand for --method METHOD:r=VALUE (tome, ppt: tokens removed per block).")]
ProtectOpt = Annotated[float | None, typer.Option("--protect", help="Shorthand for --method tome:protect=VALUE (the class token's attention against merging a token; 0.2 is a good start).")]
LayersOpt = Annotated[str | None, typer.Option("--layers", "-l", help="Blocks to reduce in, e.g. 3,6,9 or 3-11 (shorthand for --method METHOD@LAYERS; default: per method and depth).")]
NoFuseOpt = Annotated[bool, typer.Option("--no-fuse", help="Shorthand for --method evit:fuse=false (drop inattentive tokens instead of fusing them).")]
PlanOpt = Annotated[Path | None, typer.Option("--plan", help="A plan (vitprune.json from apply/calibrate) instead of --method.")]
HeadOnlyOpt = Annotated[bool, typer.Option("--head-only", help="The last block computes only the class token the head reads: exact with class-token pooling, about 7% fewer GMACs.")]
FeaturesOpt = Annotated[bool, typer.Option("--features", help="Use the classifier's pre-logits embedding (head removed): fidelity by cosine and nearest-neighbour retrieval agreement.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise VitpruneError(f"threads must be at least 1, got {threads}", param="threads")
        import torch  # torch loads only when a command runs: --help stays fast

        torch.set_num_threads(threads)


def parse_layers(text: str | None) -> list[int] | None:
    """'3,6,9' or '3-11' or a mix -> [3, 6, 9] (the plan grammar's LAYERS); None when not given."""
    if text is None:
        return None
    from vitprune.plan import parse_layers as read_layers  # torch loads only when a command runs

    return read_layers(text)


def registry_help(command, argv: list[str]) -> None:
    """Name the registered methods in the --method help of the command `argv` asks help for."""
    if not argv or not {"--help", "-h"} & set(argv):
        return
    sub = getattr(command, "commands", {}).get(argv[0])
    option = next((param for param in getattr(sub, "params", []) if param.name == "method"), None)
    if option is not None and option.help == METHOD_HELP:
        from vitprune import methods  # only for this help page: the registry loads torch

        option.help += " Methods: " + "; ".join(
            f"{name} ({', '.join(param.name for param in methods.get(name).params)})" for name in methods.names())


def parse_numbers(text: str | None, kind: type, name: str, example: str) -> tuple:
    """'1,32' -> (1, 32); () when not given."""
    if not text:
        return ()
    parts = [part.strip() for part in text.split(",")]
    try:
        if any(not part for part in parts):
            raise ValueError
        return tuple(kind(part) for part in parts)
    except ValueError:
        raise VitpruneError(f"cannot read {name} {text!r}: give comma-separated numbers, e.g. {example}",
                            param=name) from None


def parse_batches(text: str) -> tuple[int, ...]:
    batches = parse_numbers(text, int, "bench_batch", "1,32")
    if not batches or any(b < 1 for b in batches):
        raise VitpruneError(f"bench_batch must be positive whole numbers, got {text!r}", param="bench_batch")
    return batches


def report_table(report: dict, title: str) -> Table:
    """The report's figures table (vitprune.report.figures_table) for the terminal."""
    from vitprune.report import figures_table  # torch loads only when a command runs: --help stays fast

    table = figures_table(report).rich()
    table.title = title
    return table


def emit_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, allow_nan=False) + "\n")

