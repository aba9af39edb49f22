"""The `family` command: every subcommand documents itself, and errors are one readable line."""

from __future__ import annotations

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from family.cli import _register, app

_register()
COMMANDS = sorted(get_command(app).commands)


def test_all_commands_are_there():
    assert {"fetch-base", "build", "trawl", "register", "verify", "eval", "profile", "show", "plot", "worker", "serve"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_prints_its_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--help" in result.output


def test_a_bad_family_folder_is_one_line_and_a_non_zero_exit(tmp_path, capfd):
    from family.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["show", "--family", str(tmp_path / "nowhere")])
    assert exit_info.value.code != 0
    err = capfd.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, says", [
    (["--engine", "torch", "--compiled"], "--compiled/--eager is for the vLLM engine"),
    (["--engine", "torch", "--eager"], "--compiled/--eager is for the vLLM engine"),
    (["--engine", "vllm", "--dtype", "auto"], "--dtype auto is for the torch engine"),
    (["--engine", "vllm", "--threads", "2"], "--threads is for the torch engine"),
])
def test_a_worker_flag_for_the_other_engine_is_one_line_before_anything_loads(tmp_path, capfd, flags, says):
    from family.cli import main

    (tmp_path / "config.json").write_text("{}")  # a folder that looks like a model; nothing is loaded
    with pytest.raises(SystemExit) as exit_info:
        main(["worker", "--member-dir", str(tmp_path), "--name", "m", *flags])
    assert exit_info.value.code != 0
    err = capfd.readouterr().err.strip()
    assert err.startswith("error:") and says in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv, says", [
    (["serve", "--dtype", "int8"], "--dtype must be float32, bfloat16 or float16"),
    (["profile", "--device-class", "cpu", "--dtype", "auto"], "--dtype must be float32, bfloat16 or float16"),
    (["eval", "--dtype", "auto"], "--dtype must be float32, bfloat16 or float16"),
])
def test_a_serving_dtype_the_registry_cannot_record_is_one_line_before_anything_loads(tmp_path, capfd, argv, says):
    """Accuracy and profiles are recorded per dtype, so each command takes only the dtypes the others read."""
    from family.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--family", str(tmp_path / "nowhere")])
    assert exit_info.value.code != 0
    err = capfd.readouterr().err.strip()
    assert err.startswith("error:") and says in err and len(err.splitlines()) == 1
