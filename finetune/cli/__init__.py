"""The command line (`finetune ...`): app.py holds the typer app, train_command.py and
commands.py parse options and call the library, output.py shows the results."""

from .app import app, main_entry
from . import train_command, commands  # importing them registers the commands (train first, as help lists them)

__all__ = ["app", "commands", "main_entry", "train_command"]
