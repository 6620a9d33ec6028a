"""The export commands, generated from the family registry: one command per :class:`~vlexport.registry.Family`.

A family's options and help text come from its ``command`` hook (a
:class:`~vlexport.export.command.FamilyCommand`), loaded only when its command runs or shows its
help: `vlexport --help` lists the families by their registry summaries without importing torch.
Each command is one call, :func:`vlexport.export.exporter.export_model`.
"""

from __future__ import annotations

from typing import Any

import click

from vlexport.cli.group import cli
from vlexport.cli.report import print_export_report
from vlexport.registry import Family, families

__all__ = ["FamilyExportCommand"]


class FamilyExportCommand(click.Command):
    """`vlexport FAMILY`: its parameters and help text load from the family's export module on first use."""

    def __init__(self, family: Family):
        self.family = family
        self._declared: Any = None
        self._params: list[click.Parameter] | None = None
        super().__init__(family.name, callback=self._export, short_help=family.summary)

    def _declaration(self) -> Any:
        if self._declared is None:
            try:
                self._declared = self.family.load("command")
            except ImportError as e:  # a runtime-only install: no torch, no onnx
                from vlexport.export.exporter import export_extra_missing

                raise export_extra_missing(e) from e
        return self._declared

    @property  # type: ignore[override]
    def params(self) -> list[click.Parameter]:
        if self._params is None:
            self._params = self._declaration().params()
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params = value or None  # click.Command.__init__ sets []: load lazily

    @property  # type: ignore[override]
    def help(self) -> str | None:
        return self._declaration().help

    @help.setter
    def help(self, value: str | None) -> None:
        pass  # the help text is the family's declaration

    def _export(self, **kw: Any) -> None:
        from vlexport.export.exporter import export_model

        options = self.family.load("options")(**kw)
        print_export_report(export_model(self.family, options))


for _family in families():
    cli.add_command(FamilyExportCommand(_family))

