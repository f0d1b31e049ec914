"""The command surface: entry points, version, help, usage errors, --debug."""

import subprocess
import sys

from neftune_cli import __version__


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"neftune-cli {__version__}"


def test_help_lists_the_commands(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for command in ("validate", "train", "merge", "data"):
        assert command in out


def test_unknown_command_is_usage_error(cli):
    code, _, err = cli("trian")
    assert code == 2 and "trian" in err


def test_python_dash_m_works(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "neftune_cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_debug_shows_the_traceback(cli, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- a\n")
    _, _, plain = cli("validate", str(path))
    _, _, debug = cli("--debug", "validate", str(path))
    assert "Traceback" not in plain
    assert "Traceback" in debug and "not a list" in debug
