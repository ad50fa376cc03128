"""Tests for optax_multirate.data: builders, loader, split helpers and batching."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from optax_multirate import data
from optax_multirate.data import builders

EXPECTED = {
    # name: (train size, test size, input shape, raw dtype, raw max)
    "mnist_subset": (4000, 1000, (28, 28, 1), np.uint8, 255),
    "digits": (1437, 360, (8, 8, 1), np.uint8, 16),
    "mnist1d": (4000, 1000, (40,), np.float32, None),
}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """Two fresh data folders, each with all embedded data sets prepared once."""
    dirs = (tmp_path_factory.mktemp("data_a"), tmp_path_factory.mktemp("data_b"))
    for root in dirs:
        for name in data.EMBEDDED_DATASETS:
            data.prepare_dataset(name, data_dir=root)
    return dirs


@pytest.fixture(scope="module")
def digits(data_dirs: tuple[pathlib.Path, pathlib.Path]) -> data.Dataset:
    return data.load_dataset("digits", data_dir=data_dirs[0])


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any TFDS download or prepare call fail the test."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", fail)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", fail)


def _split(n: int, num_features: int = 3) -> data.Split:
    x = np.arange(n * num_features, dtype=np.float32).reshape(n, num_features)
    return data.Split(x=x, y=(np.arange(n) % 10).astype(np.int32))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_embedded_dataset_contents(name: str, data_dirs: tuple[pathlib.Path, pathlib.Path]) -> None:
    num_train, num_test, shape, _, _ = EXPECTED[name]
    ds = data.load_dataset(name, data_dir=data_dirs[0])
    assert ds.name == name
    assert ds.num_classes == 10
    assert ds.input_shape == shape
    for split, size in ((ds.train, num_train), (ds.test, num_test)):
        assert len(split) == size
        assert split.x.shape == (size, *shape)
        assert split.x.dtype == np.float32
        assert split.y.shape == (size,)
        assert split.y.dtype == np.int32
        assert split.y.min() == 0 and split.y.max() == 9
        assert np.all(np.isfinite(split.x))
        if name != "mnist1d":
            assert split.x.min() == 0.0 and split.x.max() == 1.0
    if name == "mnist1d":  # As generated: standardized over train and test together.
        both = np.concatenate([ds.train.x, ds.test.x])
        assert abs(both.mean()) < 1e-3 and abs(both.std() - 1.0) < 1e-3
    # All ten classes in both splits, and no example shared between them.
    assert set(np.unique(ds.test.y)) == set(range(10))
    train_rows = {row.tobytes() for row in ds.train.x}
    assert not any(row.tobytes() in train_rows for row in ds.test.x)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_embedded_array_record_files(
    name: str, data_dirs: tuple[pathlib.Path, pathlib.Path]
) -> None:
    num_train, num_test, shape, dtype, max_value = EXPECTED[name]
    version_dir = data_dirs[0] / name / "1.0.0"
    for split in ("train", "test"):
        assert (version_dir / f"{name}-{split}.array_record-00000-of-00001").is_file()
    info = json.loads((version_dir / "dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record"
    assert info["version"] == "1.0.0"
    assert info["description"] and info["citation"]
    assert {s["name"]: int(s["shardLengths"][0]) for s in info["splits"]} == {
        "train": num_train,
        "test": num_test,
    }
    # Raw stored records: dtype, shape and value range.
    builder = data.prepare_dataset(name, data_dir=data_dirs[0])
    key = "x" if name == "mnist1d" else "image"
    record = builder.as_data_source("train")[0]
    assert record[key].dtype == dtype and record[key].shape == shape
    if max_value is not None:
        test_x = np.stack([r[key] for r in builder.as_data_source("test")])
        assert test_x.max() == max_value
    # No leftover scratch folders.
    assert not list(data_dirs[0].glob(".*.incomplete"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builds_are_deterministic(name: str, data_dirs: tuple[pathlib.Path, pathlib.Path]) -> None:
    first, second = (data.load_dataset(name, data_dir=root) for root in data_dirs)
    for a, b in ((first.train, second.train), (first.test, second.test)):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
    for filename in ("dataset_info.json", "features.json"):
        paths = [root / name / "1.0.0" / filename for root in data_dirs]
        assert paths[0].read_bytes() == paths[1].read_bytes()


def test_documented_split_orders(data_dirs: tuple[pathlib.Path, pathlib.Path]) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    perm = np.random.default_rng(0).permutation(len(bunch.target))
    ds = data.load_dataset("digits", data_dir=data_dirs[0])
    np.testing.assert_array_equal(ds.train.y, bunch.target[perm[:1437]])
    np.testing.assert_array_equal(ds.test.y, bunch.target[perm[1437:]])
    np.testing.assert_allclose(ds.test.x.reshape(360, 64), bunch.data[perm[1437:]] / 16.0)


def test_mnist1d_build_keeps_global_random_state() -> None:
    state = np.random.get_state()[1].copy()
    builders._make_mnist1d()
    np.testing.assert_array_equal(np.random.get_state()[1], state)


def test_mnist1d_generate_keeps_random_states_and_needs_no_tfds() -> None:
    code = (
        "import random, sys, numpy as np\n"
        "from optax_multirate.data import mnist1d\n"
        "loaded = 'mnist1d' in sys.modules\n"
        "np.random.seed(5); random.seed(5)\n"
        "np_state, py_state = np.random.get_state()[1].copy(), random.getstate()\n"
        "a, b = mnist1d.generate(100, 3), mnist1d.generate(100, 3)\n"
        "kept = bool((np.random.get_state()[1] == np_state).all())\n"
        "kept = kept and random.getstate() == py_state\n"
        "same = all(np.array_equal(a[k], b[k]) for k in a)\n"
        "print(loaded, kept, same, 'tensorflow_datasets' in sys.modules, sorted(a),\n"
        "      a['x'].shape, a['x'].dtype, a['y'].dtype, a['x_test'].shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(maxsplit=4) == [
        "False", "True", "True", "False",
        "['x', 'x_test', 'y', 'y_test'] (80, 40) float32 int32 (20, 40)\n",
    ]


def test_data_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.delenv(data.DATA_DIR_ENV_VAR, raising=False)
    assert data.resolve_data_dir() == data.default_data_dir()
    expected = pathlib.Path.home() / ".cache" / "optax_multirate" / "tensorflow_datasets"
    assert data.default_data_dir() == expected
    monkeypatch.setenv(data.DATA_DIR_ENV_VAR, str(tmp_path / "env"))
    assert data.resolve_data_dir() == tmp_path / "env"
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_env_var_data_dir_is_used(
    monkeypatch: pytest.MonkeyPatch, data_dirs: tuple[pathlib.Path, pathlib.Path], no_download: None
) -> None:
    monkeypatch.setenv(data.DATA_DIR_ENV_VAR, str(data_dirs[1]))
    assert len(data.load_dataset("digits").test) == 360
    assert data.prepared_datasets() == sorted(data.EMBEDDED_DATASETS)


def test_concurrent_prepare(tmp_path: pathlib.Path) -> None:
    code = (
        "import sys; from optax_multirate.data import load_dataset; "
        "assert len(load_dataset('digits', data_dir=sys.argv[1]).train) == 1437"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(pathlib.Path(data.__file__).parents[2]), *sys.path]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]
    assert data.load_dataset("digits", data_dir=tmp_path).train.x.shape == (1437, 8, 8, 1)


def test_prepare_never_deletes_existing_folder(tmp_path: pathlib.Path) -> None:
    stale = tmp_path / "digits" / "1.0.0"
    stale.mkdir(parents=True)
    (stale / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="left untouched"):
        data.prepare_dataset("digits", data_dir=tmp_path)
    assert (stale / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*.incomplete"))


def test_build_in_hashed_order_is_refused(
    data_dirs: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    # A build whose dataset_info.json lacks disableShuffling (as a development version of the
    # builders wrote) stores the same examples in TFDS's hashed order: refuse it, keep it.
    shutil.copytree(data_dirs[0] / "digits", tmp_path / "digits")
    info_path = tmp_path / "digits" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    assert info.pop("disableShuffling") is True
    info_path.write_text(json.dumps(info))
    with pytest.raises(RuntimeError, match="not in the documented order.*remove that folder"):
        data.load_dataset("digits", data_dir=tmp_path)
    assert json.loads(info_path.read_text()) == info


def test_unknown_name_lists_embedded_and_prepared(
    data_dirs: tuple[pathlib.Path, pathlib.Path], no_download: None
) -> None:
    with pytest.raises(ValueError, match="unknown data set 'no_such_set'") as info:
        data.load_dataset("no_such_set", data_dir=data_dirs[0])
    message = str(info.value)
    for name in data.EMBEDDED_DATASETS:
        assert message.count(name) == 2  # Once as embedded, once as prepared.
    assert str(data_dirs[0]) in message
    with pytest.raises(ValueError, match="namespaced"):
        data.load_dataset("huggingface:mnist", data_dir=data_dirs[0])


def test_unprepared_tfds_dataset_is_not_downloaded(
    tmp_path: pathlib.Path, no_download: None
) -> None:
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    assert "not prepared" in message and str(tmp_path) in message
    assert "nothing is downloaded" in message
    assert f"tfds build mnist --data_dir {tmp_path}" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert list(tmp_path.iterdir()) == []


class _TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A PNG-encoded image data set standing in for a prepared TFDS ``mnist``."""

    name = "tiny_images"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(4, 4, 1)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        return {"train": self._generate_examples(12), "test": self._generate_examples(6)}

    def _generate_examples(self, n: int) -> Iterator[tuple[int, dict]]:
        for i in range(n):
            # PIL images: TFDS encodes numpy images with TensorFlow, which is not installed.
            image = PIL.Image.fromarray(np.full((4, 4), 17 * i, np.uint8), mode="L")
            yield i, {"image": image, "label": i % 3}


def test_prepared_tfds_dataset_is_read_without_download(tmp_path: pathlib.Path) -> None:
    _TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", pytest.fail)
        ds = data.load_dataset("tiny_images", data_dir=tmp_path)
    assert ds.num_classes == 3 and ds.input_shape == (4, 4, 1)
    assert ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int32
    index = np.round(ds.train.x[:, 0, 0, 0] * 255 / 17).astype(int)  # TFDS shuffled the order.
    np.testing.assert_array_equal(np.sort(index), np.arange(12))
    np.testing.assert_array_equal(ds.train.y, index % 3)
    np.testing.assert_allclose(ds.train.x[:, 1:, 1:, 0].max((1, 2)), 17 * index / 255, rtol=1e-6)


def test_batches_fixed_size_and_drop_remainder() -> None:
    split = _split(103)
    assert data.num_batches(split, 10) == 10
    got = list(data.batches(split, 10, seed=0))
    assert len(got) == 10
    for batch in got:
        assert batch["x"].shape == (10, 3) and batch["y"].shape == (10,)
    seen = np.concatenate([b["x"][:, 0] for b in got]) / 3
    assert len(set(seen.tolist())) == 100  # Each example at most once; 3 dropped.


def test_batches_deterministic_per_seed_and_epoch() -> None:
    split = _split(64)

    def firsts(**kwargs: int) -> np.ndarray:
        return np.concatenate([b["y"] for b in data.batches(split, 8, **kwargs)])

    np.testing.assert_array_equal(firsts(seed=3, epoch=2), firsts(seed=3, epoch=2))
    assert not np.array_equal(firsts(seed=3, epoch=2), firsts(seed=3, epoch=3))
    assert not np.array_equal(firsts(seed=3, epoch=2), firsts(seed=4, epoch=2))
    unshuffled = np.concatenate(
        [b["x"][:, 0] for b in data.batches(split, 8, seed=0, shuffle=False)]
    )
    np.testing.assert_array_equal(unshuffled, split.x[:, 0])
    # Resuming at a batch index gives the remaining batches of the same epoch.
    full = list(data.batches(split, 8, seed=1, epoch=5))
    resumed = list(data.batches(split, 8, seed=1, epoch=5, start_batch=3))
    assert len(resumed) == 5
    np.testing.assert_array_equal(resumed[0]["x"], full[3]["x"])


def test_epoch_arrays_match_batches() -> None:
    split = _split(50)
    stacked = data.epoch_arrays(split, 7, seed=2, epoch=1)
    assert stacked["x"].shape == (7, 7, 3) and stacked["y"].shape == (7, 7)
    for i, batch in enumerate(data.batches(split, 7, seed=2, epoch=1)):
        np.testing.assert_array_equal(stacked["x"][i], batch["x"])
        np.testing.assert_array_equal(stacked["y"][i], batch["y"])


@pytest.mark.parametrize("batch_size", [0, -1, 51])
def test_bad_batch_size(batch_size: int) -> None:
    split = _split(50)
    with pytest.raises(ValueError, match="batch_size"):
        data.num_batches(split, batch_size)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(split, batch_size, seed=0))
    with pytest.raises(ValueError, match="batch_size"):
        data.epoch_arrays(split, batch_size, seed=0)


def test_validation_split(digits: data.Dataset) -> None:
    train, val = data.validation_split(digits.train, 0.1, seed=0)
    assert (len(train), len(val)) == (1293, 144)
    again_train, again_val = data.validation_split(digits.train, 0.1, seed=0)
    np.testing.assert_array_equal(val.x, again_val.x)
    np.testing.assert_array_equal(train.y, again_train.y)
    _, other_val = data.validation_split(digits.train, 0.1, seed=1)
    assert not np.array_equal(val.x, other_val.x)
    # Disjoint and complete: track examples by index through a labelled copy.
    indexed = data.Split(x=np.arange(len(digits.train), dtype=np.float32), y=digits.train.y)
    tr, va = data.validation_split(indexed, 0.1, seed=0)
    assert set(tr.x.tolist()).isdisjoint(va.x.tolist())
    assert sorted([*tr.x.tolist(), *va.x.tolist()]) == list(range(len(digits.train)))
    np.testing.assert_array_equal(tr.y, digits.train.y[tr.x.astype(int)])
    for bad in (0.0, 1.0, 1e-6):
        with pytest.raises(ValueError):
            data.validation_split(digits.train, bad)


def test_filter_classes_and_transfer_split(digits: data.Dataset) -> None:
    kept = data.filter_classes(digits.train, (7, 3))
    mask = np.isin(digits.train.y, (7, 3))
    np.testing.assert_array_equal(kept.x, digits.train.x[mask])
    np.testing.assert_array_equal(kept.y, np.where(digits.train.y[mask] == 7, 0, 1))
    raw = data.filter_classes(digits.train, (7, 3), relabel=False)
    np.testing.assert_array_equal(raw.y, digits.train.y[mask])
    with pytest.raises(ValueError):
        data.filter_classes(digits.train, (1, 1))

    first, second = data.transfer_split(digits)
    assert (first.num_classes, second.num_classes) == (5, 5)
    assert first.name == "digits[0,1,2,3,4]" and second.input_shape == (8, 8, 1)
    assert len(first.train) + len(second.train) == len(digits.train)
    assert len(first.test) + len(second.test) == len(digits.test)
    np.testing.assert_array_equal(second.test.y, digits.test.y[digits.test.y >= 5] - 5)
    assert set(np.unique(first.train.y)) == set(range(5))
