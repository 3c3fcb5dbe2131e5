"""--help readable at 80 columns, and docs/cli.md written from the same declarations."""

from __future__ import annotations

import pytest
import typer
from conftest import run_cli as run

from easier_export.cli.app import app
from easier_export.cli.reference import DOC, REGENERATE, WIDTH, reference

COMMANDS = list(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)], ids=["root", *COMMANDS])
def test_help_at_80_columns_truncates_nothing(capsys, monkeypatch, command) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, text = run(capsys, *command, "--help")
    assert code == 0, text
    assert max(map(len, text.splitlines())) <= 80, text
    assert "…" not in text, text
    assert "<bool>" not in text, text


def test_compress_help_groups_its_options_in_panels(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, text = run(capsys, "compress", "--help")
    panels = [line.split("─ ")[1].split(" ─")[0] for line in text.splitlines() if line.startswith("╭─ ")]
    assert code == 0 and panels == ["Arguments", "Options", "Model", "Data", "Loop", "Fold", "Export", "Bench"]


def test_every_choice_is_shown_in_full(capsys, monkeypatch) -> None:
    """A choice list too wide for the type column is spelled out in the help text."""
    monkeypatch.setenv("COLUMNS", "80")
    params = {p.name: p for p in typer.main.get_command(app).commands["compress"].params}
    for param in params.values():
        choices = getattr(param.type_descriptor, "choices", None)
        if choices:
            shown = param.metavar if param.metavar != "NAME" else param.help
            assert all(c in shown for c in choices), param.name


def test_cli_reference_is_up_to_date() -> None:
    assert DOC.read_text() == reference(), f"docs/cli.md is out of date: run `{REGENERATE}`"


def test_cli_reference_lists_every_option_within_the_line_width() -> None:
    text = reference()
    assert max(map(len, text.splitlines())) <= WIDTH
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        section = text.split(f"\n## {name}\n")[1].split("\n## ")[0]
        for param in command.params:
            spelling = param.metavar if param.param_type_name == "argument" else param.opts[0]
            assert f"`{spelling}" in section, (name, spelling)
