"""The command line (drift.cli): help, and errors that name the culprit."""

import pytest

from drift.cli import main


def test_cli_errors_name_the_culprit(tmp_path, capsys):
    assert main(["run", "--set", "train.transfer.epochz=1", "--out", str(tmp_path)]) == 2
    assert "train.transfer.epochz" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in capsys.readouterr().err
    assert main(["summary", str(tmp_path / "missing.h5")]) == 2
    assert "missing.h5" in capsys.readouterr().err


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for cmd in ("run", "attribute", "metrics", "fisher", "report", "compare", "bench"):
        assert cmd in text


@pytest.fixture(scope="module", autouse=True)
def _torch_references(reference_kernels):
    """Every test here, module fixtures included, on the kernels' torch references (tests/conftest.py)."""
