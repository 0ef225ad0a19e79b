"""The `sonoseg` command line: every command has --help, unfinished ones say so, db upgrade works."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from backend.db.migrate import head_revision
from cli.main import cli


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out.extend(_all_commands(cmd, (*prefix, name)))
    return out


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"SONOSEG_DATA_DIR": str(tmp_path / "data")}


def test_every_command_has_help(env: dict[str, str]) -> None:
    runner = CliRunner()
    commands = _all_commands(cli)
    for required in [
        ("db", "upgrade"),
        ("import",),
        ("export",),
        ("models", "list"),
        ("models", "promote"),
        ("models", "rollback"),
        ("status",),
        ("worker",),
        ("beat",),
        ("train",),
        ("evaluate",),
        ("predict",),
        ("serve",),
        ("sync",),
        ("model", "train"),
        ("model", "evaluate"),
        ("model", "predict"),
    ]:
        assert required in commands
    for path in [(), *commands]:
        result = runner.invoke(cli, [*path, "--help"], env=env)
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output


def test_db_upgrade_then_status(env: dict[str, str]) -> None:
    runner = CliRunner()
    before = runner.invoke(cli, ["status"], env=env)
    assert before.exit_code == 0 and "revision empty" in before.output
    refused = runner.invoke(cli, ["models", "list"], env=env)
    assert refused.exit_code == 1 and "sonoseg db upgrade" in refused.output
    head = head_revision()
    first = runner.invoke(cli, ["db", "upgrade"], env=env)
    assert first.exit_code == 0 and f"empty -> {head}" in first.output
    again = runner.invoke(cli, ["db", "upgrade"], env=env)
    assert again.exit_code == 0 and f"{head} -> {head}" in again.output
    status = runner.invoke(cli, ["status"], env=env)
    assert status.exit_code == 0 and "no projects yet" in status.output
    assert runner.invoke(cli, ["models", "list"], env=env).output.strip() == "no model versions yet"


def test_bad_settings_are_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["status"], env={"SONOSEG_PORT": "x", "SONOSEG_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 1 and "SONOSEG_PORT" in result.output
