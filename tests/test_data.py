"""Tests for jbn.train.data: loading, download, batching, prefetch and augmentation."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pathlib
import pickle
import socket
import tarfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_cifar10_dir

from jbn.train import data
from jbn.train.datasets import cifar, files

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL_CIFAR_DIRS = [
    pathlib.Path("/work/shared/data/cifar-10-batches-py"),
    REPO_ROOT.parent / "shared" / "data" / "cifar-10-batches-py",
]
REAL_CIFAR_DIR = next((d for d in REAL_CIFAR_DIRS if (d / "test_batch").is_file()), None)


# --- loading ---------------------------------------------------------------------------


def test_load_reads_fixture_in_nhwc(cifar_fixture_dir):
    ds = data.load_cifar10(cifar_fixture_dir, download=False)
    assert ds.train_images.shape == (5 * 64, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8
    assert ds.train_labels.shape == (320,) and ds.train_labels.dtype == np.int32
    assert ds.test_images.shape == (50, 32, 32, 3)
    assert ds.test_labels.shape == (50,) and ds.test_labels.dtype == np.int32

    with open(cifar_fixture_dir / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    row, y, x = 7, 5, 11
    image = ds.train_images[64 + row]  # second batch starts at 64
    for channel in range(3):
        assert image[y, x, channel] == raw[b"data"][row, channel * 1024 + y * 32 + x]
    assert ds.train_labels[64 + row] == raw[b"labels"][row]


def test_load_rejects_bad_labels(tmp_path):
    directory = write_cifar10_dir(tmp_path / "cifar-10-batches-py", 4, 4)
    with open(directory / "test_batch", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    entry[b"labels"][0] = 10
    with open(directory / "test_batch", "wb") as f:
        pickle.dump(entry, f)
    with pytest.raises(ValueError, match="labels outside"):
        data.load_cifar10(directory, download=False)


def test_missing_files_without_download_names_them(tmp_path):
    with pytest.raises(data.CIFAR10NotFoundError, match="data_batch_1") as info:
        data.load_cifar10(tmp_path, download=False)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)
    assert "JBN_DATA_DIR" in str(info.value)


def test_resolve_data_dir_order(tmp_path, monkeypatch, cifar_fixture_dir):
    monkeypatch.setenv("JBN_DATA_DIR", str(tmp_path / "from_env"))
    assert data.resolve_data_dir() == tmp_path / "from_env" / "cifar-10-batches-py"
    assert data.resolve_data_dir(tmp_path / "explicit") == (
        tmp_path / "explicit" / "cifar-10-batches-py"
    )
    assert data.resolve_data_dir(cifar_fixture_dir) == cifar_fixture_dir
    monkeypatch.delenv("JBN_DATA_DIR")
    assert data.resolve_data_dir().name == "cifar-10-batches-py"
    assert "jbn" in str(data.resolve_data_dir())


@pytest.mark.skipif(REAL_CIFAR_DIR is None, reason="shared CIFAR-10 copy not present")
def test_real_cifar10_copy():
    ds = data.load_cifar10(REAL_CIFAR_DIR, download=False)
    assert ds.train_images.shape == (50000, 32, 32, 3)
    assert ds.test_images.shape == (10000, 32, 32, 3)
    for labels in (ds.train_labels, ds.test_labels):
        assert set(np.unique(labels)) == set(range(10))


# --- download --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive_server(tmp_path_factory):
    """Serves cifar-10-python.tar.gz (official layout) on 127.0.0.1; yields (url, sha256)."""
    root = tmp_path_factory.mktemp("archive")
    write_cifar10_dir(root / "cifar-10-batches-py", 8, 6, seed=1)
    archive = root / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(archive.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{archive.name}", sha256
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def test_download_verifies_and_loads(tmp_path, archive_server):
    url, sha256 = archive_server
    ds = data.load_cifar10(tmp_path, url=url, sha256=sha256)
    assert ds.train_images.shape == (40, 32, 32, 3)
    assert ds.test_images.shape == (6, 32, 32, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]
    # Second call reads from disk; a bogus URL proves nothing is fetched.
    again = data.load_cifar10(tmp_path, url="http://127.0.0.1:1/none", sha256=sha256)
    np.testing.assert_array_equal(again.train_images, ds.train_images)


def test_download_wrong_checksum_leaves_nothing(tmp_path, archive_server):
    url, _ = archive_server
    with pytest.raises(data.CIFAR10NotFoundError, match="checksum") as info:
        data.load_cifar10(tmp_path, url=url, sha256="0" * 64)
    assert "JBN_DATA_DIR" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_download_offline_fails_fast_with_instructions(tmp_path):
    with socket.socket() as sock:  # grab a free port, then close it: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(data.CIFAR10NotFoundError) as info:
        data.load_cifar10(tmp_path, url=f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "JBN_DATA_DIR" in message and "test_batch" in message
    assert list(tmp_path.iterdir()) == []


def test_concurrent_downloads_into_one_empty_directory_both_succeed(
    tmp_path, archive_server, monkeypatch
):
    # Two loaders (two processes of a run on one shared disk) both find the
    # files missing and download. Renames into the data directory wait for each
    # other, so both try to publish their copy at once: the loser must give way.
    url, sha256 = archive_server
    directory = tmp_path / "cifar-10-batches-py"
    both_ready = threading.Barrier(2, timeout=120)
    rename = pathlib.Path.rename

    def rename_together(self, target):
        if pathlib.Path(target) == directory:
            both_ready.wait()
        return rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename_together)
    results, errors = [], []

    def load():
        try:
            results.append(data.load_cifar10(tmp_path, url=url, sha256=sha256))
        except Exception as e:  # Reported below, with the thread's traceback lost.
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 2
    np.testing.assert_array_equal(results[0].train_images, results[1].train_images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))]
    )


def test_download_writes_only_the_archives_data_files(tmp_path, monkeypatch):
    # A tampered archive with a path out of the folder, a link and a subfolder:
    # only the plain files of cifar-10-batches-py/ are written, on any Python.
    source = write_cifar10_dir(tmp_path / "source" / "cifar-10-batches-py", 4, 4)
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
        escape = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
        escape.size = 4
        tar.addfile(escape, io.BytesIO(b"evil"))
        link = tarfile.TarInfo("cifar-10-batches-py/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        nested = tarfile.TarInfo("cifar-10-batches-py/sub/file")
        nested.size = 4
        tar.addfile(nested, io.BytesIO(b"evil"))
    monkeypatch.setattr(files, "_retrieve", lambda url, known_hash, path, fname: str(archive))
    ds = data.load_cifar10(tmp_path / "data", url="http://unused/x.tar.gz", sha256="0" * 64)
    assert ds.train_images.shape == (20, 32, 32, 3)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert [p for p in written if not p.startswith(("source", "served"))] == [
        "data",
        "data/cifar-10-batches-py",
        *(
            f"data/cifar-10-batches-py/{name}"
            for name in sorted(cifar.CIFAR10.files + ("batches.meta",))
        ),
    ]


# --- batching --------------------------------------------------------------------------


def _toy_arrays(n):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    return images, np.arange(n, dtype=np.int32)


def _labels_of(batches):
    return [batch["label"] for batch in batches]


def test_train_batches_deterministic_and_drop_remainder():
    images, labels = _toy_arrays(103)
    first = _labels_of(data.train_batches(images, labels, 10, seed=3, epoch=0))
    again = _labels_of(data.train_batches(images, labels, 10, seed=3, epoch=0))
    other_epoch = _labels_of(data.train_batches(images, labels, 10, seed=3, epoch=1))
    assert len(first) == data.num_train_steps(103, 10) == 10
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(np.stack(first), np.stack(other_epoch))
    seen = np.concatenate(first)
    assert len(np.unique(seen)) == 100
    batch = next(data.train_batches(images, labels, 10, seed=3, epoch=0))
    assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["label"])


def test_train_batches_process_shards_partition_global_batch():
    images, labels = _toy_arrays(50)
    whole = _labels_of(data.train_batches(images, labels, 12, seed=0, epoch=2))
    shards = [
        _labels_of(
            data.train_batches(
                images, labels, 12, seed=0, epoch=2, process_index=p, process_count=3
            )
        )
        for p in range(3)
    ]
    for step, global_labels in enumerate(whole):
        parts = [shard[step] for shard in shards]
        assert all(len(part) == 4 for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), global_labels)
    with pytest.raises(ValueError, match="divisible"):
        next(data.train_batches(images, labels, 10, seed=0, epoch=0, process_count=3))


def test_eval_batches_cover_every_example_once():
    images, labels = _toy_arrays(23)
    batches = list(data.eval_batches(images, labels, 8))
    assert len(batches) == data.num_eval_steps(23, 8) == 3
    assert all(b["image"].shape[0] == 8 and b["mask"].dtype == bool for b in batches)
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == 23
    real = np.concatenate([b["label"] for b in batches])[masks]
    np.testing.assert_array_equal(np.sort(real), labels)
    last = batches[-1]
    assert not last["mask"][7:].any() and (last["image"][~last["mask"]] == 0).all()


def test_eval_batches_multi_process_split():
    images, labels = _toy_arrays(23)
    per_process = [
        list(data.eval_batches(images, labels, 8, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 3
    seen = [b["label"][b["mask"]] for batches in per_process for b in batches]
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), labels)
    # Step 2 covers positions 16..23: process 0 gets 16..19, process 1 gets 20..22 + 1 pad.
    np.testing.assert_array_equal(per_process[0][2]["label"], [16, 17, 18, 19])
    np.testing.assert_array_equal(per_process[1][2]["mask"], [True, True, True, False])


# --- prefetch --------------------------------------------------------------------------


def test_prefetch_yields_everything_in_order():
    items = [np.full((2,), i) for i in range(7)]
    out = list(data.prefetch(iter(items), size=2))
    assert len(out) == 7
    for i, item in enumerate(out):
        assert isinstance(item, jax.Array)
        np.testing.assert_array_equal(item, items[i])


def test_prefetch_propagates_source_exception():
    def source():
        yield np.zeros(2)
        raise RuntimeError("boom in source")

    stream = data.prefetch(source(), put=lambda x: x)
    next(stream)
    with pytest.raises(RuntimeError, match="boom in source"):
        next(stream)


def test_prefetch_early_exit_does_not_hang():
    stream = data.prefetch(iter(range(1000)), size=1, put=lambda x: x)
    assert next(stream) == 0
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < 2


# --- device-side preprocessing ---------------------------------------------------------


def test_preprocess_normalises_channels():
    images = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
    out = data.preprocess(images)
    assert out.dtype == jnp.float32
    expected = (1.0 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)


@pytest.fixture(scope="module")
def random_images():
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), np.uint8))


def test_augment_keeps_shape_dtype_and_is_jittable(random_images):
    rng = jax.random.key(0)
    out = jax.jit(data.augment, static_argnames="pad")(rng, random_images, pad=4)
    assert out.shape == random_images.shape and out.dtype == random_images.dtype
    np.testing.assert_array_equal(out, data.augment(rng, random_images))
    floats = data.augment(rng, random_images.astype(jnp.float32))
    assert floats.dtype == jnp.float32


def test_augment_without_padding_only_flips(random_images):
    out = np.asarray(data.augment(jax.random.key(1), random_images, pad=0))
    images = np.asarray(random_images)
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_augment_matches_numpy_reference(random_images):
    rng, pad = jax.random.key(2), 4
    out = np.asarray(data.augment(rng, random_images, pad=pad))
    offsets, flips = map(np.asarray, data.sample_crop_flip(rng, len(random_images), pad))
    assert offsets.min() >= 0 and offsets.max() <= 2 * pad
    assert len(np.unique(offsets[:, 0])) > 1 and flips.any() and not flips.all()
    padded = np.pad(np.asarray(random_images), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for i, ((dy, dx), flip) in enumerate(zip(offsets, flips, strict=True)):
        expected = padded[i, dy : dy + 32, dx : dx + 32]
        if flip:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(out[i], expected)
