"""Checkpoints: every epoch's state in `<output>.partial/`, so that a run can resume where it stopped.

A checkpoint is bound to the options it was made with (all but RESUMABLE_FIELDS): resuming with
other ones is refused, naming them.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.utils import ModelEmaV3
from torch import nn

from vitprune.errors import VitpruneError
from vitprune.finetune.report import History
from vitprune.finetune.train import Training
from vitprune.io import atomic_output_file, check_output_dir, claim, live_owner, write_error

CHECKPOINT_FILE = "checkpoint.pt"
OWNER_FILE = "owner"  # the host and pid of the run writing the work folder (`vitprune.io.claim`)
CHECKPOINT_FORMAT = 1
# Options that may change between a run and its resumption; every other one must match the checkpoint.
RESUMABLE_FIELDS = ("output", "force", "resume", "keep_checkpoint", "progress", "workers", "eval_batch_size", "device")


def bound_settings(options: dict) -> dict:
    """The options a checkpoint is bound to (all but RESUMABLE_FIELDS), as plain values."""
    out = {}
    for key, value in options.items():
        if key in RESUMABLE_FIELDS:
            continue
        out[key] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


def work_dir_for(output: Path) -> Path:
    """Where a run keeps its checkpoints until it finishes: `<output>.partial` beside the output."""
    return output.with_name(output.name + ".partial")


def check_work_dir(output: Path | None, *, force: bool, resume: bool, kept: tuple[str, ...] = ()) -> Path | None:
    """The work folder of a run writing to `output` (None: no output), checked before any work.

    One piece of advice whatever stopped the last run (an error, Ctrl-C, SIGKILL, a lost node): a
    folder whose run is still alive is refused; one without a checkpoint (nor any of the `kept` files
    a run fine-tuning another step's result writes at its start) holds nothing to resume and is
    removed; one with them is resumed (resume) or replaced (force), and neither is refused."""
    if output is None:
        return None
    check_output_dir(output, force)
    work = work_dir_for(output)
    if work.exists():
        owner = live_owner(work, OWNER_FILE)
        if owner is not None:
            raise VitpruneError(f"another run ({owner}) is writing {work}; wait for it or stop it first",
                                param="output")
    resumable = any((work / name).is_file() for name in (CHECKPOINT_FILE, *kept))
    if work.exists() and not resumable:  # stopped before its first epoch ended: nothing to resume
        shutil.rmtree(work, ignore_errors=True)
    if resume and not resumable:
        raise VitpruneError(f"resume: nothing to resume, no {CHECKPOINT_FILE} in {work}; run again without it",
                            param="resume")
    if resumable and not resume and not force:
        raise VitpruneError(f"pass resume to continue the unfinished run in {work}, or force to start over",
                            param=("resume", "force"))
    return work


def start_work_dir(work: Path) -> None:
    """A fresh, empty work folder (whatever an earlier run left there is removed), claimed by this run."""
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)  # missing parent folders are made, as for every output (io.check_output_dir)
        claim(work, OWNER_FILE)
    except OSError as error:
        raise write_error(work, error) from None


@dataclass
class WorkFolder:
    """Rank 0's `<output>.partial/` during a run (path None: no output, or another rank), and what
    a failure does with it: removed when it holds no checkpoint yet (so that the next run is not
    refused), kept with a hint to resume otherwise."""

    path: Path | None
    epochs: int  # the run's epochs
    saved: int = 0  # epochs done in its checkpoint (0: none yet)
    created: bool = False  # made by this run (a resumed run continues an existing one)
    kept_files: bool = False  # holds files a resumed run reads back (`write`): kept when no epoch is done

    def start(self) -> None:
        if self.path is not None:
            start_work_dir(self.path)
            self.created = True

    def write(self, files: dict[str, bytes]) -> None:
        """Files a resumed run reads back (each written atomically)."""
        if self.path is None:
            return
        for name, data in files.items():
            with atomic_output_file(self.path / name) as tmp:
                tmp.write_bytes(data)
        self.kept_files = self.kept_files or bool(files)

    def resume(self) -> None:
        """A resumed run: the folder is this run's from now on."""
        if self.path is not None:
            try:
                claim(self.path, OWNER_FILE)
            except OSError as error:
                raise write_error(self.path, error) from None

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Around a run: on any failure, remove or keep the folder; the error says how to resume."""
        try:
            yield
        except VitpruneError as error:
            self._tidy()
            raise self._with_hint(error) from None
        except OSError as error:
            self._tidy()
            if self.path is None:
                raise
            raise self._with_hint(write_error(Path(error.filename or self.path), error)) from None
        except BaseException:  # Ctrl-C, SIGTERM, a bug: the folder is tidied, the error is not ours to change
            self._tidy()
            raise

    def _tidy(self) -> None:
        if self.path is not None and self.created and self.saved == 0 and not self.kept_files:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.path is not None:  # kept to resume: this run no longer writes it
            (self.path / OWNER_FILE).unlink(missing_ok=True)

    def _with_hint(self, error: VitpruneError) -> VitpruneError:
        if self.path is not None and self.saved == 0 and self.kept_files:
            return VitpruneError(f"{error}; run again with resume to start training from what {self.path} keeps",
                                 param=error.param)
        if self.path is None or self.saved == 0:
            return error
        if self.saved >= self.epochs:
            hint = f"run again with resume to write the output ({self.epochs} of {self.epochs} epochs done)"
        else:
            hint = f"run again with resume to continue from epoch {self.saved + 1} ({self.saved} of {self.epochs} done)"
        return VitpruneError(f"{error}; {hint}", param=error.param)


@dataclass
class Checkpoint:
    """The state at the end of an epoch: weights, optimiser, EMA, loss scaler and the history so far."""

    epoch: int  # epochs done
    settings: dict  # see bound_settings
    model: dict
    optimizer: dict
    rows: list[dict]
    steps: list[tuple[float, float]]
    ema: dict | None = None
    scaler: dict | None = None

    @classmethod
    def capture(cls, training: Training, epoch: int, settings: dict, history: History) -> Checkpoint:
        """The state of `training` after `epoch` epochs."""
        trainer = training.trainer
        return cls(epoch=epoch, settings=settings, model=trainer.student.state_dict(),
                   optimizer=trainer.optimizer.state_dict(), rows=history.rows, steps=history.steps,
                   ema=training.ema.module.state_dict() if training.ema is not None else None,
                   scaler=trainer.scaler.state_dict() if trainer.scaler is not None else None)

    def save(self, path: Path) -> None:
        payload = {"format": CHECKPOINT_FORMAT, "epoch": self.epoch, "settings": self.settings, "model": self.model,
                   "optimizer": self.optimizer, "rows": self.rows, "steps": self.steps}
        for key in ("ema", "scaler"):
            if getattr(self, key) is not None:
                payload[key] = getattr(self, key)
        with atomic_output_file(path) as tmp, open(tmp, "wb") as handle:
            torch.save(payload, handle)  # through a Python file: a full disk is an OSError, not torch's RuntimeError

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a truncated or foreign file
            raise VitpruneError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise VitpruneError(f"{path} is not a vitprune finetune checkpoint")
        return cls(epoch=payload["epoch"], settings=payload["settings"], model=payload["model"],
                   optimizer=payload["optimizer"], rows=payload["rows"], steps=[tuple(s) for s in payload["steps"]],
                   ema=payload.get("ema"), scaler=payload.get("scaler"))

    @classmethod
    def resume(cls, work: Path, settings: dict) -> Checkpoint:
        """The checkpoint in `work`, refused when it was made with other settings."""
        checkpoint = cls.load(work / CHECKPOINT_FILE)
        keys = settings.keys() | checkpoint.settings.keys()
        changed = sorted(key for key in keys if checkpoint.settings.get(key) != settings.get(key))
        if changed:
            raise VitpruneError(f"other settings ({', '.join(changed)}) than the checkpoint in {work} was made with; "
                                "run with those, or start over (force without resume)",
                                param=(*changed, "force", "resume"))
        return checkpoint

    def restore(self, student: nn.Module, optimizer: torch.optim.Optimizer, ema: ModelEmaV3 | None,
                scaler: torch.amp.GradScaler | None) -> History:
        """Load the state into the run's parts; the history to continue."""
        student.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        if ema is not None:
            ema.module.load_state_dict(self.ema)
        if scaler is not None:
            scaler.load_state_dict(self.scaler)
        return History(self.rows, self.steps)
