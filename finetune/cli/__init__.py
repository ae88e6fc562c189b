"""The command line (`finetune ...`): commands.py parses and calls the library, output.py shows the results."""

from .commands import app

__all__ = ["app"]
