"""Tests for jbn.train.datasets: CIFAR-100 and MNIST fixtures, checksums, the safe unpickler."""

from __future__ import annotations

import builtins
import functools
import gzip
import hashlib
import http.server
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
from conftest import idx_bytes, write_cifar10_dir, write_mnist_dir

from jbn.train import datasets
from jbn.train.datasets import cifar, files, mnist, safe_pickle

# --- CIFAR-100 -------------------------------------------------------------------------


def test_cifar100_reads_fine_labels_in_nhwc(cifar100_fixture_dir):
    ds = datasets.load("cifar100", cifar100_fixture_dir, download=False)
    assert ds.info.name == "cifar100" and ds.info.num_classes == 100
    assert ds.train_images.shape == (200, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (40, 32, 32, 3)
    assert ds.train_labels.dtype == np.int32
    with open(cifar100_fixture_dir / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(ds.train_labels, raw[b"fine_labels"])
    assert ds.train_labels.max() > 19  # Fine (0..99), not coarse (0..19) labels.
    row, y, x = 13, 4, 29
    for channel in range(3):
        assert ds.train_images[row, y, x, channel] == raw[b"data"][row, channel * 1024 + y * 32 + x]


def test_cifar100_resolves_its_own_folder(tmp_path):
    assert cifar.resolve_data_dir(tmp_path, cifar.CIFAR100) == tmp_path / "cifar-100-python"
    with pytest.raises(datasets.DataNotFoundError, match="CIFAR-100 not found") as info:
        datasets.load("cifar100", tmp_path, download=False)
    assert "train, test" in str(info.value) and "cifar-100-python.tar.gz" in str(info.value)


# --- MNIST -----------------------------------------------------------------------------


def test_mnist_reads_idx_files_gzipped_or_plain(mnist_fixture_dir, tmp_path):
    ds = datasets.load("mnist", mnist_fixture_dir, download=False)
    assert ds.info.name == "mnist" and not ds.info.augmentable
    assert ds.train_images.shape == (256, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (40, 28, 28, 1)
    assert ds.train_labels.dtype == np.int32 and ds.train_labels.shape == (256,)
    raw = gzip.decompress((mnist_fixture_dir / "train-images-idx3-ubyte.gz").read_bytes())
    # Header: magic 0x00000803, then 256, 28, 28 as big-endian uint32; pixel (7, 3, 20):
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert ds.train_images[7, 3, 20, 0] == raw[16 + 7 * 784 + 3 * 28 + 20]
    plain = write_mnist_dir(tmp_path / "plain", gzipped=False)
    again = datasets.load("mnist", plain, download=False)
    for a, b in zip(ds, again, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)


def test_mnist_finds_subfolders(tmp_path):
    write_mnist_dir(tmp_path / "MNIST" / "raw", 16, 8)  # torchvision's layout
    assert mnist.resolve_data_dir(tmp_path) == tmp_path / "MNIST" / "raw"
    assert datasets.load("mnist", tmp_path, download=False).train_images.shape[0] == 16
    assert mnist.resolve_data_dir(tmp_path / "empty") == tmp_path / "empty" / "mnist"


def test_mnist_missing_files_say_where_to_put_them(tmp_path):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(datasets.DataNotFoundError) as info:
        datasets.load("mnist", tmp_path, download=False)
    message = str(info.value)
    assert "MNIST not found" in message and str(tmp_path / "mnist") in message
    assert "t10k-labels-idx1-ubyte" in message and "train-images-idx3-ubyte," not in message


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x00\x00\x0d\x01" + np.asarray([2], ">u4").tobytes() + b"\x00" * 8, "unsigned bytes"),
        (idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5], "values follow"),
    ],
)
def test_mnist_rejects_malformed_idx(tmp_path, content, match):
    directory = write_mnist_dir(tmp_path, 4, 4, gzipped=False)
    (directory / "train-images-idx3-ubyte").write_bytes(content)
    with pytest.raises(datasets.DataFileError, match=match):
        datasets.load("mnist", directory, download=False)


def test_mnist_header_claiming_2_to_the_64_values_is_refused(tmp_path):
    # 65536**4 = 2**64 wraps to 0 in int64: np.prod matched an empty body.
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 4]) + np.asarray([65536] * 4, ">u4").tobytes())
    with pytest.raises(datasets.DataFileError, match=r"18446744073709551616 values"):
        mnist.read_idx(path)
    gzipped = tmp_path / "big.gz"  # More than a .gz of its size can hold: not inflated.
    gzipped.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 3), np.uint8))[:8] + b"\xff" * 4))
    with pytest.raises(datasets.DataFileError, match=r"more than .* can hold"):
        mnist.read_idx(gzipped)


def test_mnist_corrupt_gzip_is_a_data_file_error_naming_it(tmp_path):
    data = bytearray(gzip.compress(idx_bytes(np.arange(3000, dtype=np.uint8).reshape(3, 1000))))
    data[10] ^= 0xFF  # The deflate stream: zlib.error ("invalid stored block lengths").
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(datasets.DataFileError, match=f"{path}: unreadable"):
        mnist.read_idx(path)


def test_mnist_rejects_label_count_mismatch(tmp_path):
    directory = write_mnist_dir(tmp_path, 4, 4, gzipped=False)
    (directory / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(datasets.DataFileError, match="3,.*labels for the 4 images"):
        datasets.load("mnist", directory, download=False)


@pytest.fixture
def mnist_server(tmp_path):
    """Serves the four .gz files of a fixture on 127.0.0.1; yields (mirror URL, md5s)."""
    served = write_mnist_dir(tmp_path / "served", 8, 4)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", md5
    server.shutdown()
    server.server_close()
    thread.join()


def test_mnist_download_tries_mirrors_and_checks_md5(tmp_path, mnist_server, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    mirror, md5 = mnist_server
    monkeypatch.setattr(mnist, "MD5_GZ", md5)
    dead = "http://127.0.0.1:1/"  # Nothing listens: the next mirror is tried.
    ds = mnist.load_mnist(tmp_path / "data", mirrors=(dead, mirror))
    assert ds.train_images.shape == (8, 28, 28, 1)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["mnist"]

    monkeypatch.setattr(mnist, "MD5_GZ", {**md5, "t10k-images-idx3-ubyte.gz": "0" * 32})
    with pytest.raises(datasets.DataNotFoundError, match="download failed"):
        mnist.load_mnist(tmp_path / "other", mirrors=(mirror,))
    assert not (tmp_path / "other" / "mnist").exists()  # Nothing half-downloaded.


# --- checksums -------------------------------------------------------------------------


def test_copies_that_differ_warn_or_are_refused(cifar_fixture_dir):
    with pytest.warns(datasets.DataChecksumWarning, match="differ from the official") as record:
        datasets.load("cifar10", cifar_fixture_dir, download=False)
    (warning,) = record
    assert "data_batch_1" in str(warning.message) and "checksums=strict" in str(warning.message)

    with pytest.raises(datasets.DataFileError, match="Refusing them") as info:
        datasets.load("cifar10", cifar_fixture_dir, download=False, checksums="strict")
    assert "test_batch" in str(info.value) and str(cifar_fixture_dir) in str(info.value)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        datasets.load("cifar10", cifar_fixture_dir, download=False, checksums="off")


def test_official_checksums_pass_silently(tmp_path, monkeypatch):
    directory = write_cifar10_dir(tmp_path / "cifar-10-batches-py", 4, 4)
    for name in cifar.CIFAR10.md5:  # Pretend the fixture is the official release.
        monkeypatch.setitem(cifar.CIFAR10.md5, name, files.md5sum(directory / name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        datasets.load("cifar10", directory, download=False, checksums="strict")


def test_official_md5s_are_the_published_ones():
    # torchvision's values for the files of the official archives, spot-checked.
    assert cifar.CIFAR10.md5["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
    assert cifar.CIFAR100.md5["train"] == "16019d7e3df5f24257cddd939b257f8d"
    assert mnist.MD5_GZ["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"


# --- the restricted unpickler ----------------------------------------------------------


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_safe_pickle_reads_what_data_files_hold(protocol):
    entry = {
        b"data": np.arange(12, dtype=np.uint8).reshape(2, 6),
        b"labels": [3, 1],
        b"batch_label": b"training batch 1 of 5",
        "name": "str",
        "misc": (1.5, None, True, -7),
    }
    loaded = safe_pickle.loads(pickle.dumps(entry, protocol=protocol))
    np.testing.assert_array_equal(loaded[b"data"], entry[b"data"])
    assert loaded[b"data"].dtype == np.uint8
    assert {k: v for k, v in loaded.items() if k != b"data"} == {
        k: v for k, v in entry.items() if k != b"data"
    }


class _Payload:
    """Pickles as ``callable(*args)``: what a malicious data file does."""

    def __init__(self, callable_, *args):
        self.callable, self.args = callable_, args

    def __reduce__(self):
        return self.callable, self.args


def _payloads(marker: pathlib.Path) -> dict[str, _Payload]:
    touch = f"open({str(marker)!r}, 'w').write('pwned')"
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(builtins.exec, touch),
        "builtins.eval": _Payload(builtins.eval, touch),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
        "builtins.open": _Payload(builtins.open, str(marker), "w"),
        "builtins.__import__": _Payload(builtins.__import__, "os"),
    }


@pytest.mark.parametrize("name", list(_payloads(pathlib.Path("x"))))
def test_malicious_batch_file_is_refused_and_nothing_runs(tmp_path, name):
    directory = write_cifar10_dir(tmp_path / "cifar-10-batches-py", 4, 4)
    marker = tmp_path / "marker"
    entry = {
        b"data": np.zeros((4, 3072), np.uint8),
        b"labels": [0] * 4,
        b"x": _payloads(marker)[name],
    }
    with open(directory / "data_batch_3", "wb") as f:
        pickle.dump(entry, f, protocol=2)
    with pytest.raises(safe_pickle.UnsafePickleError) as info:
        datasets.load("cifar10", directory, download=False, checksums="off")
    message = str(info.value)
    assert str(directory / "data_batch_3") in message and "refused to load" in message
    assert not marker.exists(), "the payload ran"


def test_allowed_globals_refuse_tricks():
    # _codecs.encode is allowed only as Python 3 writes bytes (latin1).
    trick = pickle.dumps(_Payload(__import__("_codecs").encode, "text", "rot13"), protocol=2)
    with pytest.raises(datasets.DataFileError, match="not a readable data file"):
        safe_pickle.loads(trick, source="trick")
    # numpy's _reconstruct builds plain ndarrays only (here asked for a numpy.dtype).
    reconstruct = np.zeros(1).__reduce__()[0]
    other_type = pickle.dumps(_Payload(reconstruct, np.dtype, (0,), b"b"), protocol=2)
    with pytest.raises(datasets.DataFileError, match="array subclass"):
        safe_pickle.loads(other_type, source="other type")
    with pytest.raises(datasets.DataFileError, match="truncated"):
        safe_pickle.loads(pickle.dumps({b"a": 1})[:-3], source="cut")


# Forged NumPy types: an array whose element type gets an object field through
# the type's pickled state (BUILD), so the array is filled from raw bytes and
# freeing it decrefs an address the file chose (SIGSEGV before the fix).
_FORGED_ADDRESS = struct.pack("<Q", 0x4141414141414141)


class _Built(_Payload):
    """Pickles as ``callable(*args)`` followed by BUILD with ``state``."""

    def __init__(self, callable_, args, state):
        super().__init__(callable_, *args)
        self.state = state

    def __reduce__(self):
        return self.callable, self.args, self.state


def _forged_type(flags, base="V8", field_code="O"):
    fields = {"a": (np.dtype(field_code), 0)}
    return _Built(np.dtype, (base, False, True), (3, "|", None, ("a",), fields, 8, 1, flags))


def _forged_array(dtype):
    reconstruct = np.zeros(1).__reduce__()[0]
    state = (1, (1,), dtype, False, _FORGED_ADDRESS)
    return _Built(reconstruct, (np.ndarray, (0,), b"b"), state)


def _forged_payloads():
    payloads = {f"flags={f}": _forged_array(_forged_type(f)) for f in (0, 1, 9, 16, 17, 25)}
    # numpy.ndarray called through REDUCE: the forged type over a buffer.
    payloads["ndarray(buffer=)"] = _Payload(np.ndarray, (1,), _forged_type(1), _FORGED_ADDRESS)
    # An allowed type code whose state adds fields (here of an allowed type).
    payloads["u8 + fields"] = _forged_array(_forged_type(1, "u8", "u8"))
    return payloads


_LOAD_IN_A_CHILD = """
import gc, sys
from jbn.train import datasets
from jbn.train.datasets import safe_pickle
try:
    if sys.argv[1] == "cifar10":
        entry = datasets.load("cifar10", sys.argv[2], download=False, checksums="off")
    else:
        entry = safe_pickle.load(sys.argv[2])
except datasets.DataFileError as e:
    print("refused:", e)
else:
    del entry
    gc.collect()
    print("loaded")
"""


def _load_in_a_child(how, path):
    """Loads in a fresh interpreter: a crash (SIGSEGV) fails the test instead of the suite."""
    command = [sys.executable, "-c", _LOAD_IN_A_CHILD, how, str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"the load crashed ({result.returncode}): {result.stderr}"
    return result.stdout.strip()


@pytest.mark.parametrize("name", list(_forged_payloads()))
def test_forged_numpy_types_are_refused_without_a_crash(tmp_path, name):
    path = tmp_path / "data_batch_1"
    entry = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
    path.write_bytes(pickle.dumps({**entry, b"x": _forged_payloads()[name]}, protocol=2))
    assert _load_in_a_child("pickle", path).startswith(f"refused: {path}: refused to load")


def test_a_forged_entry_the_loader_never_reads_is_refused_too(tmp_path):
    directory = write_cifar10_dir(tmp_path / "cifar-10-batches-py", 4, 4)
    entry = safe_pickle.load(directory / "data_batch_2")
    entry[b"filenames"] = _forged_payloads()["flags=1"]
    (directory / "data_batch_2").write_bytes(pickle.dumps(entry, protocol=2))
    output = _load_in_a_child("cifar10", directory)
    assert output.startswith(f"refused: {directory / 'data_batch_2'}: refused to load"), output


def test_forged_type_flags_are_not_taken():
    # The state may set a plain type's byte order only; flags and sizes come from its code.
    forged = _Built(np.dtype, ("u8", False, True), (3, "<", None, None, None, 8, 8, 1))
    loaded = safe_pickle.loads(pickle.dumps(forged, protocol=2))
    assert loaded == np.dtype("<u8") and loaded.flags == 0 and not loaded.hasobject
    for value in (np.dtype(">i4"), np.arange(3, dtype=">i4"), np.asarray(["ab", "c"])):
        data = pickle.dumps(value, protocol=2)  # As numpy itself reads them.
        loaded, expected = safe_pickle.loads(data), pickle.loads(data)
        assert getattr(loaded, "dtype", loaded) == getattr(expected, "dtype", expected)
        assert np.asarray(loaded == expected).all()
    for code in ("O", "V8", "M8[ns]", "u1,u2", "(2,)u1"):
        with pytest.raises(safe_pickle.UnsafePickleError, match="refused to load"):
            safe_pickle.loads(pickle.dumps(np.dtype(code), protocol=2))
    with pytest.raises(safe_pickle.UnsafePickleError, match="kind 'O'"):
        safe_pickle.loads(pickle.dumps(np.array([1, None], dtype=object), protocol=2))


# --- the catalog -----------------------------------------------------------------------


def test_catalog_names_and_facts():
    assert datasets.names() == ("cifar10", "cifar100", "mnist")
    assert datasets.info("cifar10").image_shape == (32, 32, 3)
    assert datasets.info("mnist").image_shape == (28, 28, 1)
    assert len(datasets.info("mnist").mean) == 1
    with pytest.raises(KeyError, match="Unknown data set 'svhn'"):
        datasets.info("svhn")
