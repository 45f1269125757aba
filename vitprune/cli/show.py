"""`vitprune show`: token maps of a reduced model on images, or where a cascade's images exit, as a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitprune.cli.app import app
from vitprune.cli.common import (
    DATA_PANEL,
    OUTPUT_PANEL,
    REDUCTION_RULES,
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
    set_threads,
)
from vitprune.cli.options import Alias, make_request
from vitprune.errors import VitpruneError


@app.command()
def show(
    model: Annotated[str, typer.Argument(help="timm model name or alias with --method, a vitprune artifact folder / .safetensors, or a cascade folder.")],
    images: Annotated[Path | None, typer.Option("--data", "-d", help="An image file, or a folder of images (ImageFolder, labels.csv or plain).", rich_help_panel=DATA_PANEL)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The PNG file to write.", rich_help_panel=OUTPUT_PANEL)] = None,
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
    limit: Annotated[int, typer.Option("--limit", help="Draw at most this many images of a folder (a fixed random subset).", rich_help_panel=DATA_PANEL)] = 8,
    workers: WorkersOpt = 2,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.", rich_help_panel=OUTPUT_PANEL)] = False,
    old_images: Annotated[Path | None, typer.Option("--images", "-i", hidden=True)] = None,
) -> None:
    """Draw which tokens each reducing block keeps, drops and merges; for a cascade, where each image exits."""
    from vitprune.commands.show import (  # torch loads only when the command runs: --help stays fast
        ShowRequest,
        describe_result,
        run_show,
    )

    request = make_request(ShowRequest, locals(), aliases=(Alias("old_images", "images"),), derive=REDUCTION_RULES)
    for name in ("images", "output"):
        if getattr(request, name) is None:
            raise VitpruneError(f"give {'--data/-d' if name == 'images' else '--output/-o'}: "
                                f"{'the image or folder to draw' if name == 'images' else 'the PNG file to write'}")
    set_threads(threads)
    result = run_show(request)
    console.print(f"wrote [bold]{result.output}[/]: {describe_result(result)}")
