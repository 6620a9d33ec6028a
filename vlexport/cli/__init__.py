"""The `vlexport` command line. Every command is one call into the library.

:mod:`group` holds the click group; :mod:`export` adds one export command per registered family
(:mod:`vlexport.registry`); :mod:`train`, :mod:`bundle`, :mod:`run` and
:mod:`serve_repo` (`vlexport triton`) add the others. Importing
this package imports neither torch nor an export module (they load when a family's command runs).
"""

from __future__ import annotations

from vlexport.cli import bundle, export, run, serve_cmd, serve_repo, train
from vlexport.cli.group import cli

#: Each of these modules adds its commands to `cli` when imported.
COMMAND_MODULES = (export, train, bundle, run, serve_repo, serve_cmd)

__all__ = ["cli", "main"]


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="vlexport")
