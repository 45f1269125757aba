"""Registers the commands that live in their own modules (one import each)."""
from vitprune.cli import finetune  # noqa: F401
from vitprune.cli import cascade  # noqa: F401
from vitprune.cli import calibrate  # noqa: F401
from vitprune.cli import export  # noqa: F401
