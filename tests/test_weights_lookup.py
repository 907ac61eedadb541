"""The one lookup of weight files (converse_jax.weights.pretrained.find_weights) shared by
load_pretrained, training's --init-from=pretrained and the command lines: its order, its checksums,
training workdirs, and the line that says which file was used. No network: the release URL of the
fake model is a file:// URL."""

from __future__ import annotations

import hashlib

import pytest

from conftest import require_asset
from converse_jax.models.spec import Release
from converse_jax.weights import ChecksumMismatchError, WeightsUnavailableError
from converse_jax.weights import pretrained as pretrained_mod
from converse_jax.weights.pretrained import WeightsFile, find_weights


class _FakeSpec:
    def __init__(self, release):
        self.release = release


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """A fake model 'toy' released at a file:// URL; empty assets folder and cache.
    Returns (released bytes, assets weights folder, cache folder)."""
    blob = b"released weights " * 100
    served = tmp_path / "server" / "toy.pth"
    served.parent.mkdir()
    served.write_bytes(blob)
    release = Release("toy.pth", hashlib.sha256(blob).hexdigest(), served.as_uri())
    monkeypatch.setattr(pretrained_mod, "_spec", lambda name: _FakeSpec(release))
    monkeypatch.setenv("CONVERSE_ASSETS", str(tmp_path / "assets"))
    monkeypatch.setenv("CONVERSE_JAX_CACHE", str(tmp_path / "cache"))
    return blob, tmp_path / "assets" / "weights", tmp_path / "cache"


def test_lookup_order_is_path_then_assets_then_cache_then_download(toy, tmp_path, capsys):
    blob, shared, cache = toy
    found = find_weights("toy", progress=False)  # nothing anywhere: downloaded into the cache
    assert found == WeightsFile(cache / "toy.pth", "downloaded") and found.path.read_bytes() == blob
    assert "downloading" in capsys.readouterr().err
    assert str(found) == f"weights: {cache / 'toy.pth'} (downloaded)"
    assert find_weights("toy") == WeightsFile(cache / "toy.pth", "cache")
    shared.mkdir(parents=True)
    (shared / "toy.pth").write_bytes(blob)
    assert find_weights("toy") == WeightsFile(shared / "toy.pth", "assets folder")
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"anything: a given path is not checked against the release")
    assert find_weights("toy", mine) == WeightsFile(mine, "given path")
    (shared / "toy.pth").unlink()
    with pytest.raises(WeightsUnavailableError, match="not in the cache"):
        find_weights("toy", cache=tmp_path / "empty", download=False)


def test_a_missing_given_path_is_named(toy, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        find_weights("toy", tmp_path / "nope.pth")


def test_a_release_file_with_the_wrong_hash_is_refused(toy):
    blob, shared, cache = toy
    shared.mkdir(parents=True)
    (shared / "toy.pth").write_bytes(blob[:-1] + b"X")
    with pytest.raises(ChecksumMismatchError, match="toy.pth"):
        find_weights("toy")
    # the right bytes, but a SHA256SUMS beside them that lists another hash: refused as well
    (shared / "toy.pth").write_bytes(blob)
    (shared / "SHA256SUMS").write_text(f"{'0' * 64}  toy.pth\n{'1' * 64}  other.pth\n")
    with pytest.raises(ChecksumMismatchError, match="0000"):
        find_weights("toy")
    (shared / "SHA256SUMS").write_text(f"{hashlib.sha256(blob).hexdigest()}  toy.pth\n")
    assert find_weights("toy").source == "assets folder"
    assert not cache.exists()  # nothing was downloaded on the way


def _fake_checkpoint(path):
    (path / "params").mkdir(parents=True)
    (path / "metadata").mkdir()


def test_a_training_workdir_means_its_latest_complete_checkpoint(toy, tmp_path):
    work = tmp_path / "run"
    for step in ("2", "10"):
        _fake_checkpoint(work / "checkpoints" / step)
    (work / "checkpoints" / "12.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save
    assert find_weights("toy", work) == WeightsFile(work / "checkpoints" / "10", "given path")
    assert find_weights("toy", work / "checkpoints" / "2").path == work / "checkpoints" / "2"
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_weights("toy", empty)


def test_load_pretrained_says_which_file_it_used(monkeypatch, tmp_path, capsys):
    from converse_jax.weights import load_pretrained

    path = require_asset("weights", "conversenet.pth")
    monkeypatch.setenv("CONVERSE_ASSETS", str(path.parent.parent))
    monkeypatch.setenv("CONVERSE_JAX_CACHE", str(tmp_path / "cache"))
    load_pretrained("conversenet")
    assert capsys.readouterr().err.strip().splitlines() == [f"weights: {path} (assets folder)"]
    load_pretrained("conversenet", path, report=False)
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "cache").exists()
