"""Tests of converse_jax.data: sources, the tasks' degradations in batches, determinism of the loaders."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from converse_jax.data import (
    EmbeddedSource,
    FolderSource,
    TfdsSource,
    dead_leaves,
    make_train_loader,
    make_val_set,
    parse_source,
)
from converse_jax.degradations import blur
from converse_jax.tasks import SR, TASKS


def take(it, n):
    with it:
        return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=False):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def loader(task="denoise", source=None, **kw):
    args = dict(patch_size=16, batch_size=2, seed=7, channels=3)
    args.update(kw)
    return make_train_loader(task, source, **args)


@pytest.fixture
def image_folder(tmp_path):
    """A few tiny image files of several formats, one in a sub-folder."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8)).save(root / "b.png")
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(root / "sub" / "c.jpg")
    Image.fromarray(rng.integers(0, 256, (33, 35, 3), dtype=np.uint8)).save(root / "sub" / "d.BMP")
    (root / "notes.txt").write_text("not an image, ignored")
    return root


# ---------------------------------------------------------------------------- synthetic


def test_dead_leaves_shape_range_and_determinism():
    a = dead_leaves(40, seed=3, channels=3)
    assert a.shape == (40, 40, 3) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, dead_leaves(40, seed=3, channels=3))
    assert not np.array_equal(a, dead_leaves(40, seed=4, channels=3))
    g = dead_leaves((24, 30), seed=3, channels=1)
    assert g.shape == (24, 30, 1)
    # 8-bit grid, many grey levels, and not piecewise flat: most neighbouring pixels differ.
    np.testing.assert_allclose(a * 255, np.round(a * 255), atol=1e-4)
    assert len(np.unique(a)) > 100
    assert np.mean(np.abs(np.diff(a, axis=1)) > 0) > 0.5
    # colour images carry colour
    assert np.abs(a[..., 0] - a[..., 1]).mean() > 0.01


def test_dead_leaves_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        dead_leaves(16, seed=0, channels=2)
    with pytest.raises(ValueError, match="size"):
        dead_leaves(0, seed=0)


# ---------------------------------------------------------------------------- sources


def test_parse_source_forms(image_folder):
    assert isinstance(parse_source(None), EmbeddedSource)
    assert isinstance(parse_source("embedded"), EmbeddedSource)
    src = parse_source(f"folder:{image_folder}")
    assert isinstance(src, FolderSource)
    assert len(src) == 4  # .txt ignored, sub-folder and upper-case extension included
    assert src.files == tuple(sorted(src.files))
    assert parse_source(src) is src
    for bad in ("", "foo", str(image_folder), "folder:", "s3:bucket", "tfds:"):
        with pytest.raises(ValueError, match="folder:PATH"):
            parse_source(bad)


def test_folder_source_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        parse_source(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        parse_source(f"folder:{tmp_path / 'empty'}")
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(bad / "ok.png")
    (bad / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="broken.png"):
        parse_source(f"folder:{bad}")


def test_truncated_file_is_named_when_decoded(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "x.png")
    data = (root / "x.png").read_bytes()
    (root / "x.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    src = parse_source(f"folder:{root}")
    with pytest.raises(ValueError, match="x.png"):
        next(loader(source=src))


def test_folder_channels(image_folder):
    src = parse_source(f"folder:{image_folder}")
    gray_idx = [i for i, f in enumerate(src.files) if f.endswith("b.png")][0]
    rgb = src.load(gray_idx, 3)
    assert rgb.shape == (36, 36, 3) and rgb.dtype == np.float32
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    color_idx = [i for i, f in enumerate(src.files) if f.endswith("a.png")][0]
    y = src.load(color_idx, 1)
    assert y.shape == (40, 48, 1)
    ref = np.asarray(Image.open(src.files[color_idx]).convert("L"), np.float32) / 255
    np.testing.assert_allclose(y[..., 0], ref, atol=1.5 / 255)


def test_folder_loader_and_small_images(image_folder):
    src = parse_source(f"folder:{image_folder}")
    for channels in (1, 3):
        b = take(loader(source=src, channels=channels, patch_size=24, batch_size=3), 2)
        assert b[0]["target"].shape == (3, 24, 24, channels)
        assert b[0]["input"].shape == (3, 24, 24, channels)
    with pytest.raises(ValueError, match=r"smaller than the 34-pixel"):
        loader(source=src, patch_size=34)


def test_folder_epochs_visit_every_image(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for v in range(5):  # constant images: the patch value tells the file
        Image.fromarray(np.full((8, 8), 40 * v, np.uint8)).save(root / f"{v}.png")
    batches = take(loader(source=f"folder:{root}", patch_size=8, batch_size=5, sigma=0, channels=1), 2)
    for b in batches:
        seen = sorted(np.round(b["target"][:, 0, 0, 0] * 255).astype(int))
        assert seen == [0, 40, 80, 120, 160]


class _FakeTfds:
    """Stand-in for ``tfds.data_source``: records the call, returns in-memory records."""

    def __init__(self, n=3, fail=False):
        self.n, self.fail, self.calls = n, fail, []

    def __call__(self, name, *, split=None, data_dir=None, download=True, **kw):
        self.calls.append((name, split, download))
        if self.fail:
            raise FileNotFoundError(f"Dataset {name} not found in data_dir")
        rng = np.random.default_rng(len(self.calls))
        return [
            {"image": rng.integers(0, 256, (20, 22, 3), dtype=np.uint8), "label": i} for i in range(self.n)
        ]


def test_tfds_source(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    fake = _FakeTfds()
    monkeypatch.setattr(tfds, "data_source", fake)
    src = parse_source("tfds:mnist")
    assert isinstance(src, TfdsSource) and len(src) == 3 and src.key == "image"
    assert fake.calls[-1] == ("mnist", "train", False)  # never downloads
    parse_source("tfds:div2k/bicubic_x4:2.0.0:validation")
    assert fake.calls[-1][:2] == ("div2k/bicubic_x4:2.0.0", "validation")
    parse_source("tfds:mnist:train[:90%]")
    assert fake.calls[-1][:2] == ("mnist", "train[:90%]")
    img = src.load(1, 1)
    assert img.shape == (20, 22, 1) and img.dtype == np.float32
    # picklable for worker processes, the handle is reopened lazily
    clone = pickle.loads(pickle.dumps(src))
    assert clone._ds is None and clone.load(0, 3).shape == (20, 22, 3)
    b = take(loader(source=src, patch_size=16), 1)[0]
    assert b["target"].shape == (2, 16, 16, 3)


def test_tfds_mock_data_source():
    """The real ``tfds.data_source`` path, on tfds' own mocked records (no download, no TF)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        src = parse_source("tfds:mnist:test")
        assert len(src) == 3 and src.key == "image"
        b = take(loader(source=src, patch_size=16, channels=1), 1)[0]
    assert b["target"].shape == (2, 16, 16, 1)


def test_tfds_errors(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds, "data_source", _FakeTfds(fail=True))
    with pytest.raises(ValueError, match="tfds build"):
        parse_source("tfds:nothing_here")
    monkeypatch.setattr(tfds, "data_source", _FakeTfds(n=0))
    with pytest.raises(ValueError, match="empty"):
        parse_source("tfds:empty_set")


# ---------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("task", TASKS, ids=str)
@pytest.mark.parametrize("channels", [1, 3])
def test_batch_shapes(task, channels):
    b = take(loader(task, patch_size=16, batch_size=3, channels=channels), 1)[0]
    expected = {"input", "target"} | ({"kernel"} if task.takes_kernel else set())
    assert set(b) == expected
    h = 16 // 4 if task == SR else 16
    assert b["target"].shape == (3, 16, 16, channels)
    assert b["input"].shape == (3, h, h, channels)
    for v in b.values():
        assert v.dtype == np.float32 and np.all(np.isfinite(v))
    assert b["target"].min() >= 0 and b["target"].max() <= 1
    if "kernel" in b:
        assert b["kernel"].shape == (3, 7, 7) and b["kernel"].min() >= 0
        np.testing.assert_allclose(b["kernel"].sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_denoise_noise_level():
    b = take(loader("denoise", sigma=(50, 50), batch_size=4, patch_size=24), 1)[0]
    std = float((b["input"] - b["target"]).std())
    assert abs(std - 50 / 255) < 0.1 * 50 / 255
    b = take(loader("denoise", sigma=(0, 0)), 1)[0]
    np.testing.assert_array_equal(b["input"], b["target"])
    # a range gives different levels in one batch
    b = take(loader("denoise", sigma=(0, 75), batch_size=8, patch_size=24), 1)[0]
    stds = (b["input"] - b["target"]).std(axis=(1, 2, 3))
    assert stds.max() - stds.min() > 10 / 255


def test_sr_input_is_bicubic_of_target():
    from converse_jax.degradations import imresize

    b = take(loader("sr", patch_size=32, batch_size=2), 1)[0]
    for lr, hr in zip(b["input"], b["target"], strict=False):
        np.testing.assert_allclose(lr, imresize(hr, 0.25), atol=1e-6)


def test_deblur_input_is_circular_blur_of_target():
    b = take(loader("deblur_nonblind", blur_noise=(0, 0), batch_size=3), 1)[0]
    for x, y, k in zip(b["input"], b["target"], b["kernel"], strict=False):
        np.testing.assert_allclose(x, blur(y, k), atol=1e-6)
    # circular: a shifted image blurs to the shifted blur
    y, k = b["target"][0], b["kernel"][0]
    np.testing.assert_allclose(blur(np.roll(y, 5, 0), k), np.roll(blur(y, k), 5, 0), atol=1e-6)
    b = take(loader("deblur", blur_noise=(2.55, 2.55), batch_size=4, patch_size=24), 1)[0]
    assert "kernel" not in b
    # blind batches still use varied kernels: residual noise is small but present
    assert 0 < float(np.abs(b["input"] - b["target"]).mean()) < 0.5


def test_same_seed_same_batches_and_resume():
    ref = take(loader("deblur_nonblind", seed=11), 5)
    assert_batches_equal(ref, take(loader("deblur_nonblind", seed=11), 5))
    assert_batches_equal(ref[3:], take(loader("deblur_nonblind", seed=11, start_step=3), 2))
    other = take(loader("deblur_nonblind", seed=12), 1)[0]
    assert not np.array_equal(other["target"], ref[0]["target"])
    assert not np.array_equal(ref[0]["target"], ref[1]["target"])
    it = loader(start_step=4)
    with it:
        assert it.step == 4
        next(it)
        assert it.step == 5


def test_resume_with_folder_epochs(image_folder):
    src = parse_source(f"folder:{image_folder}")
    ref = take(loader("sr", src, patch_size=16, batch_size=3), 4)  # crosses epoch boundaries
    assert_batches_equal(ref[2:], take(loader("sr", src, patch_size=16, batch_size=3, start_step=2), 2))


def test_shards_partition_the_global_batch():
    whole = take(loader(batch_size=6, seed=5), 2)
    parts = [take(loader(batch_size=2, seed=5, shard_index=s, shard_count=3), 2) for s in range(3)]
    for i in range(2):
        for k in whole[i]:
            np.testing.assert_array_equal(np.concatenate([p[i][k] for p in parts]), whole[i][k])


def test_worker_processes_match_in_process(image_folder):
    src = parse_source(f"folder:{image_folder}")
    kw = dict(task="deblur_nonblind", source=src, patch_size=16, batch_size=2, seed=3)
    ref = take(loader(**kw), 4)
    got = take(loader(num_workers=2, start_step=1, **kw), 3)
    assert_batches_equal(ref[1:], got)
    for b in got:
        assert type(b["input"]) is np.ndarray


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(task="inpaint"), "unknown task"),
        (dict(channels=2), "channels"),
        (dict(task="sr", patch_size=18), "multiple of the scale"),
        (dict(shard_index=2, shard_count=2), "shard_index"),
        (dict(seed=-1), "seed"),
        (dict(batch_size=0), "batch_size"),
        (dict(sigma=(30, 10)), "sigma"),
        (dict(blur_noise=-1), "blur_noise"),
        (dict(num_workers=-1), "num_workers"),
        (dict(start_step=-2), "start_step"),
    ],
)
def test_loader_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        loader(**kw)


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("task", TASKS, ids=str)
def test_val_set_fixed_and_held_out(task):
    a = make_val_set(task, count=3, size=32, seed=0, channels=3)
    b = make_val_set(task, None, count=3, size=32, seed=0, channels=3)
    assert len(a) == 3
    assert_batches_equal(a, b)
    h = 8 if task == SR else 32
    for s in a:
        assert s["target"].shape == (32, 32, 3) and s["input"].shape == (h, h, 3)
        assert ("kernel" in s) == task.takes_kernel
    train = EmbeddedSource("train", size=32)
    for k, s in enumerate(a):  # held out: not the training images of the same index
        assert not np.array_equal(s["target"], train.load(k, 3))
    assert not np.array_equal(a[0]["target"], a[1]["target"])


def test_val_set_from_folder(image_folder):
    v = make_val_set("sr", f"folder:{image_folder}", count=10, size=34, channels=1)
    assert len(v) == 4  # only four images there
    for s in v:
        side = s["target"].shape[0]
        assert s["target"].shape == (side, side, 1) and side % 4 == 0 and side <= 34
        assert s["input"].shape == (side // 4, side // 4, 1)
    np.testing.assert_array_equal(v[0]["target"], make_val_set("sr", f"folder:{image_folder}", count=1,
                                                                size=34, channels=1)[0]["target"])
    with pytest.raises(ValueError, match="folder:PATH"):
        make_val_set("denoise", "nowhere")
