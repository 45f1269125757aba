"""The commands as a library: one request dataclass and one `run_*` per command.

Each request holds a command's options (the CLI's Typer signature is checked against its
fields, `tests/test_cli_options.py`); `run_*` validates it before any model is built or image
read, then calls the features.
"""
