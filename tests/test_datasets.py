"""Data sources, splits and both loader pipelines."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_NPZ, compose
from ortho_run.datasets import load_dataset
from ortho_run.datasets.base import Split
from ortho_run.datasets.cifar import write_cifar
from ortho_run.datasets.jpeg_archive import decode_jpeg_npz
from ortho_run.datasets.loaders import DeviceLoader, TorchLoader, smallest_train_batch
from ortho_run.errors import DataError


def data_cfg(*overrides):
    return compose(list(overrides)).data


def test_digits_is_a_fixed_stratified_split():
    a, b = load_dataset(data_cfg()), load_dataset(data_cfg("seed=5"))
    assert a.train.x.shape[1:] == (1, 8, 8) and a.train.x.dtype == torch.uint8
    assert len(a.train) + len(a.test) == 1797 and a.num_classes == 10
    assert torch.equal(a.test.y, b.test.y) and torch.equal(a.test.x, b.test.x)
    frac = torch.bincount(a.test.y) / torch.bincount(torch.cat([a.train.y, a.test.y]))
    assert frac.min() > 0.17 and frac.max() < 0.23


def test_synthetic_any_classes_seeded():
    cfg = data_cfg("data=synthetic", "data.num_classes=100", "data.image_size=16",
                   "data.train_per_class=3", "data.test_per_class=2")
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.num_classes == 100 and a.train.x.shape == (300, 3, 16, 16)
    assert torch.equal(a.train.x, b.train.x)
    assert sorted(torch.unique(a.test.y).tolist()) == list(range(100))


def test_class_subset_and_validation_split():
    ds = load_dataset(data_cfg("data.classes=first_half", "data.val_fraction=0.2"))
    assert ds.num_classes == 5 and ds.class_ids == [0, 1, 2, 3, 4]
    for s in (ds.train, ds.val, ds.test):
        assert int(s.y.max()) == 4
    assert abs(len(ds.val) / (len(ds.val) + len(ds.train)) - 0.2) < 0.02
    ds2 = load_dataset(data_cfg("data.classes=[7,3]"))
    assert ds2.num_classes == 2 and ds2.class_ids == [3, 7]
    assert set(ds2.test.y.tolist()) == {0, 1}


def _fake_cifar(root, name, n_train=20, n_test=10, k=10):
    g = np.random.default_rng(0)
    xtr = g.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    xte = g.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    ytr, yte = np.arange(n_train) % k, np.arange(n_test) % k
    write_cifar(str(root), name, xtr, ytr, xte, yte, [f"c{i}" for i in range(k)])
    return xtr, ytr, xte, yte


@pytest.mark.parametrize("name,k", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_pickle_format_roundtrip(tmp_path, name, k):
    xtr, ytr, xte, yte = _fake_cifar(tmp_path, name, n_train=2 * k, n_test=k, k=k)
    ds = load_dataset(data_cfg(f"data={name}", f"data.root={tmp_path}"))
    assert ds.num_classes == k and ds.class_names[1] == "c1"
    assert np.array_equal(ds.train.x.numpy(), xtr) and np.array_equal(ds.test.y.numpy(), yte)


def test_cifar_missing_and_truncated_files_are_explained(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset(data_cfg("data=cifar10", f"data.root={tmp_path}"))
    _fake_cifar(tmp_path, "cifar10")
    f = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3.*truncated"):
        load_dataset(data_cfg("data=cifar10", f"data.root={tmp_path}"))
    with open(f, "wb") as fh:
        pickle.dump({"data": np.zeros((3, 10), np.uint8), "labels": [0, 1, 2]}, fh)
    with pytest.raises(DataError, match="N×3072"):
        load_dataset(data_cfg("data=cifar10", f"data.root={tmp_path}"))


def test_cifar_download_offline_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as u

    def offline(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(u, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="download failed.*Network is unreachable"):
        load_dataset(data_cfg("data=cifar10", f"data.root={tmp_path}", "data.download=true"))


def _jpeg_archive(path, n_train=30, n_test=20, quality=95, **change):
    """An archive in the JPEG format (each image its own JPEG file's bytes), with ``change``
    replacing arrays; returns the images as written."""
    import io

    from PIL import Image

    g = np.random.default_rng(1)
    out, images = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        blobs = []
        for img in x:
            b = io.BytesIO()
            Image.fromarray(img).save(b, "JPEG", quality=quality)
            blobs.append(np.frombuffer(b.getvalue(), np.uint8))
        out[f"{split}_jpeg"] = np.concatenate(blobs)
        out[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        out[f"{split}_labels"] = np.arange(n, dtype=np.int64) * 10 // n  # sorted by class
        images[split] = blobs
    out["classes"] = np.array([f"class{i}" for i in range(10)])
    for k, v in change.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v(out) if callable(v) else v
    np.savez(path, **out)
    return out, images


def _pillow_decoded(blob):
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(blob.tobytes())).convert("RGB")).transpose(2, 0, 1)


def test_from_jpeg_writes_the_layout_data_cifar10_reads_image_for_image(tmp_path, capsys):
    from ortho_run.datasets.jpeg_archive import main

    arrays, blobs = _jpeg_archive(tmp_path / "a.npz")
    main(["from-jpeg", str(tmp_path / "a.npz"), str(tmp_path / "root")])
    assert "wrote 30 train / 20 test images" in capsys.readouterr().out
    ds = load_dataset(data_cfg("data=cifar10", f"data.root={tmp_path / 'root'}"))
    assert ds.class_names == [f"class{i}" for i in range(10)]
    for split, x in (("train", ds.train), ("test", ds.test)):
        want = np.stack([_pillow_decoded(b) for b in blobs[split]])
        assert np.array_equal(x.x.numpy(), want)
        assert x.y.tolist() == arrays[f"{split}_labels"].tolist()
    # --limit spreads over the rows, sorted by class as in the real archive: 0, 3, 6, ..., 29
    main(["from-jpeg", str(tmp_path / "a.npz"), str(tmp_path / "few"), "--limit", "11"])
    ds = load_dataset(data_cfg("data=cifar10", f"data.root={tmp_path / 'few'}"))
    assert np.array_equal(ds.train.x[1].numpy(), _pillow_decoded(blobs["train"][3]))
    assert len(ds.train) == 11 and len(torch.unique(ds.train.y)) == 10


_BAD_ARCHIVES = {
    "a key missing": (dict(train_offsets=None), "train_offsets missing"),
    "labels past the class names": (dict(test_labels=lambda a: a["test_labels"] + 3),
                                    "test_labels holds ids outside 0..9"),
    "float labels": (dict(train_labels=lambda a: a["train_labels"] + 0.5),
                     "train_labels must be a non-empty list of integer class ids"),
    "no images": (dict(test_labels=np.zeros(0, np.int64), test_offsets=np.zeros(1, np.int64),
                       test_jpeg=np.zeros(0, np.uint8)), "test_labels must be a non-empty"),
    "one offset short": (dict(train_offsets=lambda a: a["train_offsets"][:-1]),
                         "train_offsets holds 30 offsets for 30 labels"),
    "offsets past the bytes": (dict(train_offsets=lambda a: a["train_offsets"] + 7),
                               "train_offsets runs from 7 to"),
    "an empty image": (dict(train_offsets=lambda a: np.r_[0, 0, a["train_offsets"][2:]]),
                       "train_offsets does not increase at image 0"),
    "bytes not uint8": (dict(test_jpeg=lambda a: a["test_jpeg"].astype(np.int16)),
                        "test_jpeg must be 1-D uint8 bytes"),
    "five class names": (dict(classes=np.array(list("abcde"))), "classes names 5 classes"),
    "a name twice": (dict(classes=np.array(["x"] * 10)), "classes holds a name twice"),
    "a damaged image": (dict(train_jpeg=lambda a: np.r_[a["train_jpeg"][:600],
                                                        np.zeros(a["train_offsets"][1] - 600,
                                                                 np.uint8),
                                                        a["train_jpeg"][a["train_offsets"][1]:]
                                                        ].astype(np.uint8)),
                        "train image 0 (bytes 0.."),
}


@pytest.mark.parametrize("case", sorted(_BAD_ARCHIVES))
def test_from_jpeg_refuses_a_bad_archive_naming_the_part_and_writes_nothing(tmp_path, capsys,
                                                                             case):
    from ortho_run.datasets.jpeg_archive import main

    change, said = _BAD_ARCHIVES[case]
    _jpeg_archive(tmp_path / "a.npz", **change)
    _fake_cifar(tmp_path / "root", "cifar10")  # what ROOT held before: left as it was
    before = {p: p.read_bytes() for p in (tmp_path / "root").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        main(["from-jpeg", str(tmp_path / "a.npz"), str(tmp_path / "root"), "--overwrite"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and said in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in (tmp_path / "root").rglob("*") if p.is_file()} == before


def test_from_jpeg_keeps_an_existing_layout_and_replaces_it_only_when_told(tmp_path, capsys,
                                                                           monkeypatch):
    from ortho_run.datasets import jpeg_archive
    from ortho_run.datasets.jpeg_archive import main

    _jpeg_archive(tmp_path / "a.npz")
    for bad, said in ((tmp_path / "none.npz", "no such file"),
                      (tmp_path / "a.txt", "not a .npz archive")):
        if bad.suffix == ".txt":
            bad.write_text("not an archive")
        with pytest.raises(SystemExit):
            main(["from-jpeg", str(bad), str(tmp_path / "root")])
        assert said in capsys.readouterr().err and not (tmp_path / "root").exists()
    xtr = _fake_cifar(tmp_path / "root", "cifar10")[0]
    folder = tmp_path / "root" / "cifar-10-batches-py"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SystemExit) as e:
        main(["from-jpeg", str(tmp_path / "a.npz"), str(tmp_path / "root")])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    # a write that fails half way (a full disk, say) leaves the old layout and no temp folder
    def full(root, *a, **k):
        (Path(root) / "cifar-10-batches-py").mkdir(parents=True)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jpeg_archive, "write_cifar", full)
    with pytest.raises(SystemExit):
        main(["from-jpeg", str(tmp_path / "a.npz"), str(tmp_path / "root"), "--overwrite"])
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["cifar-10-batches-py"]
    monkeypatch.undo()
    assert np.array_equal(load_dataset(data_cfg("data=cifar10", f"data.root={tmp_path / 'root'}")
                                       ).train.x.numpy(), xtr)
    main(["from-jpeg", str(tmp_path / "a.npz"), str(tmp_path / "root"), "--overwrite"])
    assert len(load_dataset(data_cfg("data=cifar10", f"data.root={tmp_path / 'root'}")).train) == 30
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["cifar-10-batches-py"]


def test_from_jpeg_stopped_or_failing_at_the_swap_keeps_the_old_layout(tmp_path, capsys,
                                                                       monkeypatch):
    """SIGTERM (a scheduler's stop) as Ctrl-C: one line, exit 130, ROOT as it was (before, the
    process died and left its decoding processes running); the new folder failing to take the
    old one's place puts the old one back."""
    import os
    import signal
    import subprocess
    import sys

    from ortho_run.datasets import jpeg_archive
    from ortho_run.datasets.jpeg_archive import main

    _jpeg_archive(tmp_path / "a.npz")
    _fake_cifar(tmp_path / "root", "cifar10")
    folder = tmp_path / "root" / "cifar-10-batches-py"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    # in a process of its own: the stop arrives while the images decode
    driver = ("import os, signal, sys\n"
              "from ortho_run.datasets import jpeg_archive as j\n"
              "decode = j.decode_split\n"
              "def stopped(*a, **k):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return decode(*a, **k)\n"
              "j.decode_split = stopped\n"
              "j.main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", driver, "from-jpeg", str(tmp_path / "a.npz"),
                        str(tmp_path / "root"), "--overwrite"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 130, (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip() == f"stopped: nothing was written, {tmp_path / 'root'} is left as it was"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    previous = signal.getsignal(signal.SIGTERM)
    main(["from-jpeg", str(tmp_path / "a.npz"), str(tmp_path / "few"), "--limit", "3"])
    assert signal.getsignal(signal.SIGTERM) is previous  # the tool's handler is its own
    # fewer training images than the layout's five batches: empty batches, read back (they
    # were a reshape error)
    assert len(load_dataset(data_cfg("data=cifar10", f"data.root={tmp_path / 'few'}")).train) == 3

    replace = os.replace

    def second_fails(src, dst):
        if Path(src).name == "cifar-10-batches-py" and ".from-jpeg" in str(src):
            raise OSError(18, "Invalid cross-device link")
        return replace(src, dst)

    monkeypatch.setattr(jpeg_archive.os, "replace", second_fails)
    with pytest.raises(SystemExit) as e:
        main(["from-jpeg", str(tmp_path / "a.npz"), str(tmp_path / "root"), "--overwrite"])
    assert e.value.code == 2 and "Invalid cross-device link" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["cifar-10-batches-py"]


@pytest.mark.skipif(not SHARED_NPZ.is_file(), reason="shared CIFAR-10 JPEG archive absent")
def test_folder_built_from_shared_jpeg_archive_loads(tmp_path):
    xtr, ytr, names = decode_jpeg_npz(str(SHARED_NPZ), "train", limit=200)
    xte, yte, _ = decode_jpeg_npz(str(SHARED_NPZ), "test", limit=100)
    write_cifar(str(tmp_path), "cifar10", xtr, ytr, xte, yte, names)
    ds = load_dataset(data_cfg("data=cifar10", f"data.root={tmp_path}"))
    assert ds.train.x.shape == (200, 3, 32, 32) and ds.num_classes == 10
    assert len(torch.unique(ds.train.y)) == 10 and "airplane" in ds.class_names
    mean = ds.train.x.float().mean() / 255
    assert 0.35 < mean < 0.6  # natural images, not noise or zeros


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 24), color).save(d / f"{i}.png")
    ds = load_dataset(data_cfg("data=imagefolder", f"data.root={tmp_path}", "data.image_size=16"))
    assert ds.class_names == ["cat", "dog"] and len(ds.train) == 6
    ld = TorchLoader(ds.train, 4, "cpu", ds.mean, ds.std, train=True, augment="crop_flip",
                     image_size=16, num_workers=0)
    x, y = next(iter(ld))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64


def test_imagefolder_test_split_without_a_class_still_trains_it(tmp_path, caplog):
    from PIL import Image

    for split, classes in (("train", ("cat", "dog", "eel")), ("test", ("cat", "dog"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    cfg = data_cfg("data=imagefolder", f"data.root={tmp_path}", "data.image_size=8")
    with caplog.at_level("WARNING", logger="ortho_run"):
        ds = load_dataset(cfg)
    assert ds.num_classes == 3 and ds.class_names == ["cat", "dog", "eel"]
    assert sorted(ds.test.y.tolist()) == [0, 0, 1, 1] and len(ds.train) == 6
    assert "1 class(es) of train have no image in test (eel)" in caplog.text
    # a test split with none of the training classes measures nothing: refused, named
    for c in ("cat", "dog"):
        (tmp_path / "test" / c).rename(tmp_path / "test" / f"other_{c}")
    with pytest.raises(DataError, match="holds no image of the classes of .*train .cat, dog, eel"):
        load_dataset(cfg)


def _split(n=16, c=3, s=8):
    from ortho_run.datasets.base import Split

    g = torch.Generator().manual_seed(0)
    return Split(y=torch.arange(n) % 4, x=torch.randint(0, 256, (n, c, s, s), generator=g,
                                                        dtype=torch.uint8))


def test_device_loader_crops_are_windows_of_the_padded_image():
    sp = _split()
    ld = DeviceLoader(sp, 8, "cpu", (0, 0, 0), (1 / 255,) * 3, train=True, augment="crop_flip",
                      padding=2, seed=1)
    seen = set()
    for x, y in ld:
        for xi, yi in zip(x, y):
            # find the source image and check xi is one of its 25 crops (or their flips)
            ok = False
            for j in torch.nonzero(sp.y == yi).flatten().tolist():
                p = torch.nn.functional.pad(sp.x[j].float(), (2, 2, 2, 2))
                for dy in range(5):
                    for dx in range(5):
                        w = p[:, dy:dy + 8, dx:dx + 8]
                        if torch.equal(w, xi) or torch.equal(w.flip(2), xi):
                            ok = True
            assert ok
            seen.add(tuple(xi.flatten()[:5].tolist()))
    assert len(seen) > 1


def test_loaders_are_seeded_per_epoch_and_cover_the_data():
    sp = _split()
    ld = DeviceLoader(sp, 4, "cpu", (0.5,) * 3, (0.25,) * 3, train=True, augment="flip", seed=3)
    ld.set_epoch(2)
    a = [y.clone() for _, y in ld]
    ld.set_epoch(2)
    b = [y.clone() for _, y in ld]
    ld.set_epoch(3)
    c = [y.clone() for _, y in ld]
    assert all(torch.equal(i, j) for i, j in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == sorted(sp.y.tolist())
    assert not torch.equal(torch.cat(a), torch.cat(c))  # another epoch, another order
    ev = DeviceLoader(sp, 5, "cpu", (0,) * 3, (1 / 255,) * 3, train=False)
    xs = torch.cat([x for x, _ in ev])
    assert torch.equal(xs, sp.x.float())


@pytest.mark.parametrize("kind", ["device", "torch"])
def test_ranks_evaluate_every_image_once_and_each_trains_on_a_shard(kind):
    """Evaluation: over the ranks, each image once (no image left out, none repeated).
    Training: equal shards, and a shard smaller than a batch still trains one batch."""
    def loader(split, bs, train, rank, world):
        if kind == "device":
            return DeviceLoader(split, bs, "cpu", (0,) * 3, (1 / 255,) * 3, train=train,
                                rank=rank, world_size=world)
        return TorchLoader(split, bs, "cpu", (0,) * 3, (1 / 255,) * 3, train=train,
                           image_size=8, num_workers=0, rank=rank, world_size=world)

    n = 10
    sp = Split(x=torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone(),
               y=torch.arange(n))
    for world, bs in [(3, 3), (3, 1), (4, 2), (2, 5)]:
        seen = sorted(int(y) for r in range(world) for _, ys in loader(sp, bs, False, r, world)
                      for y in ys)
        assert seen == list(range(n)), (world, bs, seen)
        for r in range(world):
            ld = loader(sp, 8, True, r, world)  # a shard of n // world < 8 images
            got = [len(ys) for _, ys in ld]
            assert got == [n // world] == [smallest_train_batch(n, 8, r, world)], (world, got)
    got = [len(ys) for _, ys in loader(sp, 4, True, 0, 1)]
    assert got == [4, 4] and smallest_train_batch(n, 4) == 4  # the partial batch is dropped


def test_standard_and_device_pipelines_agree_without_augmentation():
    sp = _split()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    dev = torch.cat([x for x, _ in DeviceLoader(sp, 16, "cpu", mean, std, train=False)])
    std_ = torch.cat([x for x, _ in TorchLoader(sp, 16, "cpu", mean, std, train=False,
                                                 image_size=8, num_workers=0)])
    assert torch.allclose(dev, std_, atol=1e-5)


def test_the_loader_pipelines_augmented_batches_do_not_depend_on_its_workers():
    """Each image's random transform draws from a seed of its own (the epoch's and the
    image's): the same augmented batches with 0 or 2 workers, and a loader made afresh at
    epoch 1 (a resumed run) gives the epoch-1 batches of one that went on from epoch 0 with
    persistent workers. A new epoch draws other augmentations."""
    sp = _split(n=24, s=8)

    def loader(workers):
        return TorchLoader(sp, 8, "cpu", (0.5,) * 3, (0.25,) * 3, train=True,
                           augment="crop_flip", padding=2, image_size=8, num_workers=workers,
                           color_jitter=0.3)

    def epoch(ld, e):
        ld.set_epoch(e)
        return [b for b in ld]

    def same(a, b):
        return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))

    alone, pooled = loader(0), loader(2)
    try:
        e0, e0w = epoch(alone, 0), epoch(pooled, 0)
        e1, e1w = epoch(alone, 1), epoch(pooled, 1)
        fresh = loader(2)
        e1_fresh = epoch(fresh, 1)
    finally:
        pooled.close()
        fresh.close()
    assert len(e0) == 3 and same(e0, e0w) and same(e1, e1w) and same(e1, e1_fresh)
    # the same images in the same order as the index shuffle alone, augmented differently
    ys0 = torch.cat([y for _, y in e0])
    assert not same(e0, e1) and sorted(ys0.tolist()) == sorted(sp.y.tolist())
