"""`vitprune show`: token maps of a reduced model on images, or where a cascade's images exit, as a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitprune.cli.app import app
from vitprune.cli.common import (
    CheckpointOpt,
    DeviceOpt,
    HeadOnlyOpt,
    ImgSizeOpt,
    KeepOpt,
    LayersOpt,
    MethodOpt,
    NoFuseOpt,
    NoPretrainedOpt,
    PlanOpt,
    ProtectOpt,
    ROpt,
    ThreadsOpt,
    WorkersOpt,
    console,
    parse_layers,
    set_threads,
)


@app.command()
def show(
    model: Annotated[str, typer.Argument(help="timm model name or alias with --method, a vitprune artifact folder / .safetensors, or a cascade folder.")],
    images: Annotated[Path, typer.Option("--images", "-i", help="An image file, or a folder of images (ImageFolder, labels.csv or plain).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The PNG file to write.")],
    method: MethodOpt = None,
    keep: KeepOpt = None,
    r: ROpt = None,
    protect: ProtectOpt = None,
    layers: LayersOpt = None,
    no_fuse: NoFuseOpt = False,
    head_only: HeadOnlyOpt = False,
    plan_file: PlanOpt = None,
    checkpoint: CheckpointOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    img_size: ImgSizeOpt = None,
    limit: Annotated[int, typer.Option("--limit", help="Draw at most this many images of a folder (a fixed random subset).")] = 8,
    workers: WorkersOpt = 2,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Draw which tokens each reducing block keeps, drops and merges; for a cascade, where each image exits."""
    from vitprune.commands.show import (  # torch loads only when the command runs: --help stays fast
        ShowRequest,
        describe_result,
        run_show,
    )

    request = ShowRequest(
        model=model, images=images, output=output, method=method, keep=keep, r=r, protect=protect,
        layers=parse_layers(layers), fuse=False if no_fuse else None, head_only=head_only, plan_file=plan_file,
        checkpoint=checkpoint, no_pretrained=no_pretrained, img_size=img_size, limit=limit, workers=workers,
        device=device, force=force,
    )
    set_threads(threads)
    result = run_show(request)
    console.print(f"wrote [bold]{result.output}[/]: {describe_result(result)}")
