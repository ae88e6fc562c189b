"""The command line (`finetune ...`): app.py holds the typer app, train_command.py and
commands.py parse options and call the library, output.py shows the results."""

from .app import app
from . import train_command, commands  # importing them registers the commands (train first, as help lists them)

from .app import main_entry

__all__ = ["app", "commands", "main_entry", "train_command"]
