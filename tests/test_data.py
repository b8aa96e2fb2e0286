"""CIFAR-10 sources, caching, resolution order and error messages (docs/usage.md, "Data")."""
import tarfile
import warnings

import numpy as np
import pytest

from rable_nb.data import images as data


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RABLE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake(tmp_path):
    return data.write_fake_cifar(tmp_path / "fake", n_train=6, n_test=3)


def test_image_folder_layout_is_decoded_class_sorted_and_cached(fake, cache):
    cifar = data.load_cifar10(fake)
    assert cifar.train_x.shape == (60, 32, 32, 3) and cifar.train_x.dtype == np.uint8
    assert cifar.test_x.shape == (30, 32, 32, 3)
    assert cifar.classes == data.CLASSES
    assert (np.diff(cifar.train_y) >= 0).all()
    assert len(list(cache.glob("cifar10-*.npz"))) == 1
    again = data.load_cifar10(fake)
    assert np.array_equal(again.train_x, cifar.train_x)


def test_greyscale_folder_keeps_its_size_and_one_channel(cache, tmp_path):
    """A Fashion-MNIST-like folder (28×28 greyscale PNGs written with PIL) loads as
    N×28×28×1; a colour file among them makes every image RGB; the most common size wins."""
    from PIL import Image
    grey = data.write_fake_cifar(tmp_path / "grey", n_train=5, n_test=2, size=28, channels=1)
    cifar = data.load_cifar10(grey)
    assert cifar.train_x.shape == (50, 28, 28, 1) and cifar.test_x.shape == (20, 28, 28, 1)
    assert cifar.image_shape == (28, 28, 1)
    first = sorted((grey / "train" / "airplane").iterdir())[0]
    assert (cifar.train_x[0, ..., 0] == np.asarray(Image.open(first))).all()  # lossless
    Image.new("I;16", (28, 28), 65535).save(grey / "train" / "cat" / "wide.png")  # 16 bits
    Image.new("L", (14, 14), 7).save(grey / "train" / "dog" / "small.png")  # other size
    wide = data.load_cifar10(grey)
    assert wide.train_x.shape == (52, 28, 28, 1) and wide.train_x.max() == 255
    assert (wide.train_x == 7).all(axis=(1, 2, 3)).sum() == 1  # resized to 28×28, kept
    Image.new("RGB", (28, 28), (255, 0, 0)).save(grey / "test" / "cat" / "red.png")
    Image.new("RGB", (28, 28), (255, 0, 0)).save(grey / "train" / "cat" / "red.png")
    mixed = data.load_cifar10(grey)
    assert mixed.train_x.shape == (53, 28, 28, 3) and mixed.test_x.shape == (21, 28, 28, 3)
    assert (mixed.train_x[..., 0] == mixed.train_x[..., 2]).all(axis=(1, 2)).sum() == 52


def test_archive_layout_matches_folder_layout(fake, cache, tmp_path):
    arch = tmp_path / "archives"
    arch.mkdir()
    for split in ("train", "test"):
        with tarfile.open(arch / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(fake / split, arcname=f"cifar10/{split}")
    assert data.detect_layout(arch) == "archives"
    a, b = data.load_cifar10(arch), data.load_cifar10(fake)
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)


def test_corrupt_image_is_skipped_with_a_counted_warning(fake, cache):
    bad = fake / "train" / "cat" / "0001.png"
    bad.write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match=r"skipped 1 corrupt image file\(s\).*0001.png"):
        cifar = data.load_cifar10(fake)
    assert len(cifar.train_y) == 59
    assert (cifar.train_y == data.CLASSES.index("cat")).sum() == 5


def test_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("RABLE_DATA", str(tmp_path / "env"))
    assert data.resolve_data_dir("explicit") .name == "explicit"
    assert data.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("RABLE_DATA")
    monkeypatch.setattr(data, "SHARED_COPY", tmp_path / "missing")
    assert data.resolve_data_dir(None) == data.DOWNLOAD_DIR


def test_missing_data_dir_says_what_to_do(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*train.tar.gz"):
        data.load_cifar10(tmp_path / "nowhere")


def test_empty_data_dir_without_network_names_where_it_looked(cache, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr("torchvision.datasets.CIFAR10.download", offline)
    with pytest.raises(FileNotFoundError, match="(?s)No CIFAR-10 found.*RABLE_DATA"):
        data.load_cifar10(empty)
    assert not list(cache.glob("*.npz"))


def test_empty_class_folders_fail_clearly(cache, tmp_path):
    for split in ("train", "test"):
        (tmp_path / "d" / split / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no readable images"):
        data.load_cifar10(tmp_path / "d")


@pytest.mark.skipif(not data.SHARED_COPY.is_dir(), reason="shared CIFAR-10 copy not present")
def test_real_cifar10_copy():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shared copy has no corrupt files
        cifar = data.load_cifar10(data.SHARED_COPY)
    assert cifar.train_x.shape == (50000, 32, 32, 3) and cifar.test_x.shape == (10000, 32, 32, 3)
    assert np.bincount(cifar.train_y).tolist() == [5000] * 10
    assert np.bincount(cifar.test_y).tolist() == [1000] * 10


# -- a decode cache that notices change; class lists agree across splits -------------------
def _edit_image(path, colour):
    from PIL import Image
    Image.new("RGB", (32, 32), colour).save(path)


def test_cache_notices_added_deleted_and_edited_images(fake, cache):
    first = data.load_cifar10(fake)
    _edit_image(fake / "train" / "cat" / "0100.png", (1, 2, 3))           # added
    added = data.load_cifar10(fake)
    assert len(added.train_y) == len(first.train_y) + 1
    (fake / "test" / "dog" / "0000.png").unlink()                          # deleted
    assert len(data.load_cifar10(fake).test_y) == len(first.test_y) - 1
    edited = fake / "train" / "airplane" / "0000.png"
    _edit_image(edited, (7, 7, 7))                                         # same name, new pixels
    again = data.load_cifar10(fake)
    assert (again.train_x == 7).all(axis=(1, 2, 3)).sum() == 1
    assert again.identity["sha256"] != added.identity["sha256"]
    assert len(list(cache.glob("cifar10-*.npz"))) == 4  # one decode per state of the folder


def test_torchvision_layout_key_covers_its_files(tmp_path, cache):
    batches = tmp_path / "tv" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(b"x" * 10)
    before = data._source_key(tmp_path / "tv", "torchvision")
    (batches / "data_batch_1").write_bytes(b"y" * 11)
    assert data._source_key(tmp_path / "tv", "torchvision") != before


def test_corrupt_file_warning_repeats_when_loading_from_cache(fake, cache):
    (fake / "train" / "cat" / "0001.png").write_bytes(b"not an image at all")
    for _ in range(2):  # the second load reads the cache
        with pytest.warns(UserWarning, match=r"skipped 1 corrupt image file\(s\).*0001.png"):
            data.load_cifar10(fake)
    assert len(list(cache.glob("cifar10-*.npz"))) == 1


@pytest.mark.parametrize("change, named", [("missing", "airplane"), ("extra", "zebra")])
def test_test_split_classes_must_match_the_training_split_by_name(fake, cache, change, named):
    import shutil
    if change == "missing":  # today every test label would shift by one
        shutil.rmtree(fake / "test" / "airplane")
    else:
        shutil.copytree(fake / "test" / "cat", fake / "test" / "zebra")
    with pytest.raises(ValueError, match=rf"(?s)test.*{change}: \['{named}'\]"):
        data.load_cifar10(fake)


def test_archive_split_classes_must_match(fake, cache, tmp_path):
    import shutil
    shutil.rmtree(fake / "test" / "truck")
    arch = tmp_path / "archives"
    arch.mkdir()
    for split in ("train", "test"):
        with tarfile.open(arch / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(fake / split, arcname=f"cifar10/{split}")
    with pytest.raises(ValueError, match=r"test.tar.gz.*missing: \['truck'\]"):
        data.load_cifar10(arch)
