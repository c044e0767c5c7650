"""timm backbones and Hugging Face / torchvision data sets, without network: small models
without pretrained weights, local weights files, data sets the tests write."""

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, compose, run_inprocess
from ortho_run.errors import CheckpointError, ConfigError, DataError

# the extras are imported where a test uses them: collecting the suite does not pay for them
pytestmark = pytest.mark.skipif(not (find_spec("timm") and find_spec("datasets")),
                                reason="needs the timm and datasets extras")

SYN = ["experiment=smoke", "data=synthetic", "data.image_size=32", "data.train_per_class=6",
       "data.test_per_class=2", "trainer.max_epochs=1", "data.batch_size=16"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
@pytest.mark.parametrize("method", ["ce", "opl"])
def test_a_timm_backbone_trains_a_smoke_epoch(tmp_path, arch, method):
    s = run_inprocess(tmp_path, [*SYN, "model=timm", f"model.arch={arch}", f"method={method}"])
    assert s["status"] == "finished" and s["model"] == "timm"
    st = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["net"]
    assert not any(k.startswith("backbone.body.head.") and "weight" in k and
                   st[k].shape[0] == 10 for k in st)  # timm's classifier is off (num_classes=0)


def test_model_checkpoint_loads_the_weights_that_are_then_used(tmp_path):
    import timm

    ref = timm.create_model("resnet18", num_classes=0, in_chans=3)
    torch.nn.init.normal_(ref.conv1.weight, std=0.5)  # recognisable weights
    f = tmp_path / "weights.pth"
    torch.save(ref.state_dict(), f)
    from ortho_run.runner.run import build_job
    from conftest import compose

    cfg = compose([*SYN, "model=timm", "model.arch=resnet18", f"model.checkpoint={f}",
                   "logger.mode=disabled"])
    job = build_job(cfg, tmp_path / "x")
    body = job.net.backbone.body
    assert torch.equal(body.conv1.weight, ref.conv1.weight)
    x = torch.randn(2, 3, 32, 32)
    body.eval(), ref.eval()
    assert torch.equal(body(x), ref(x))
    dc = body.ortho_data_config  # normalisation from the model's pretrained config, recorded
    assert dc["mean"] == pytest.approx([0.485, 0.456, 0.406]) and dc["input_size"][0] == 3
    assert job.ds.mean == tuple(dc["mean"])
    s = run_inprocess(tmp_path, [*SYN, "model=timm", "model.arch=resnet18",
                                 f"model.checkpoint={f}"], name="ck")
    assert s["model_data_config"]["std"] == pytest.approx([0.229, 0.224, 0.225])


@pytest.mark.parametrize("override,exc,needle", [
    (["model.arch=resnet_18"], ConfigError, "close names: resnet18"),
    (["model.pretrained=true"], ConfigError, "model.checkpoint=FILE"),
    (["model.checkpoint=/nonexistent/w.pth"], CheckpointError, "no such file"),
    (["model.nope=1"], Exception, "nope"),
])
def test_timm_mistakes_are_one_paragraph(tmp_path, monkeypatch, override, exc, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(exc, match=needle) as e:
        run_inprocess(tmp_path, [*SYN, "model=timm", *override])
    if isinstance(e.value, ConfigError):
        assert e.value.exit_code == 2


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    import timm

    f = tmp_path / "w.pth"
    torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), f)
    with pytest.raises(CheckpointError, match="does not fit model.arch"):
        run_inprocess(tmp_path, [*SYN, "model=timm", "model.arch=resnet18",
                                 f"model.checkpoint={f}"])
    (tmp_path / "empty.pth").write_bytes(b"")  # torch's EOFError has no message
    with pytest.raises(CheckpointError, match=r"empty.pth cannot be read \(EOFError\)"):
        run_inprocess(tmp_path, [*SYN, "model=timm", "model.arch=resnet18",
                                 f"model.checkpoint={tmp_path / 'empty.pth'}"], name="empty")


# ------------------------------------------------------------------ Hugging Face data sets
def _hf(root: Path, n_train=60, n_test=15, grey=False):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)

    def make(n):
        imgs, labels = [], []
        for i in range(n):
            a = (rng.random((10, 10, 3)) * 120).astype("uint8")
            a[..., i % 3] = 255  # the class is the bright channel
            img = Image.fromarray(a)
            imgs.append(img.convert("L") if grey else img)
            labels.append(i % 3)
        return {"image": imgs, "label": labels}

    feat = datasets.Features({"image": datasets.Image(),
                              "label": datasets.ClassLabel(names=["r", "g", "b"])})
    tr = datasets.Dataset.from_dict(make(n_train), features=feat)
    te = datasets.Dataset.from_dict(make(n_test), features=feat)
    datasets.DatasetDict(train=tr, test=te).save_to_disk(str(root / "disk"))
    tr.to_parquet(str(root / "train.parquet"))
    return root


HF = ["experiment=smoke", "data=hf", "trainer.max_epochs=3", "data.batch_size=8",
      "data.num_workers=0"]


def test_a_local_hf_data_set_trains_in_memory(tmp_path):
    _hf(tmp_path)
    s = run_inprocess(tmp_path, [*HF, f"data.path={tmp_path}/disk"], name="mem")
    assert s["status"] == "finished" and s["pipeline"] == "resident"
    assert (s["train_size"], s["test_size"], s["num_classes"]) == (60, 15, 3)
    assert s["test/acc1"] > 0.6  # learnable: the class is the bright channel


@pytest.mark.slow
def test_a_large_hf_data_set_is_read_lazily_through_the_loader(tmp_path):
    _hf(tmp_path)
    lazy = run_inprocess(tmp_path, [*HF, f"data.path={tmp_path}/disk", "trainer.max_epochs=1",
                                    "data.in_memory_mb=0.0001"], name="lazy")
    assert lazy["status"] == "finished" and lazy["pipeline"] == "loader"
    assert lazy["train_size"] == 60


def test_a_parquet_file_and_the_subset_and_validation_semantics(tmp_path):
    from conftest import compose
    from ortho_run.datasets import load_dataset

    _hf(tmp_path)
    s = run_inprocess(tmp_path, [*HF, f"data.path={tmp_path}/train.parquet"])
    assert (s["train_size"], s["test_size"]) == (48, 12)  # no test split: a 20% hold-out
    cfg = compose([*HF, f"data.path={tmp_path}/disk", "data.classes=[0,2]",
                   "data.val_fraction=0.25"]).data
    ds = load_dataset(cfg)
    # the same semantics as every source: classes renumbered 0..k-1, a stratified val split
    assert ds.num_classes == 2 and ds.class_names == ["r", "b"]
    assert sorted(torch.bincount(ds.val.y).tolist()) == [5, 5]
    assert len(ds.train) == 30 and set(ds.test.y.tolist()) == {0, 1}


def test_hf_mistakes_name_the_option(tmp_path):
    _hf(tmp_path)
    with pytest.raises(DataError, match="data.image_key=img: no such column"):
        run_inprocess(tmp_path, [*HF, f"data.path={tmp_path}/disk", "data.image_key=img"])
    with pytest.raises(DataError, match="data.train_split=training"):
        run_inprocess(tmp_path, [*HF, f"data.path={tmp_path}/disk", "data.train_split=training"])
    with pytest.raises(DataError, match="cannot load it"):
        run_inprocess(tmp_path, [*HF, "data.path=nobody/no-such-set-here"], name="hub")
    # a split name that is not there, while a test split is: no silent hold-out of train
    with pytest.raises(DataError, match="data.test_split=val: not a split .* its splits: "
                                        "train, test"):
        run_inprocess(tmp_path, [*HF, f"data.path={tmp_path}/disk", "data.test_split=val"])
    # a column that holds no images, a label column of scores: named, before any work
    with pytest.raises(DataError, match="data.image_key=label in .*holds int values such as 0, "
                                        "not images"):
        run_inprocess(tmp_path, [*HF, f"data.path={tmp_path}/disk", "data.image_key=label"])
    import datasets

    feat = datasets.Features({"image": datasets.Image(), "label": datasets.Value("float32"),
                              "path": datasets.Value("string")})
    rows = datasets.load_from_disk(str(tmp_path / "disk"))["train"]
    datasets.Dataset.from_dict({"image": rows["image"][:20],
                                "label": [i % 3 + 0.5 for i in range(20)],
                                "path": [f"{i}.png" for i in range(20)]},
                               features=feat).to_parquet(str(tmp_path / "scores.parquet"))
    with pytest.raises(DataError, match="data.label_key=label: labels must be class ids .* holds "
                                        "the number 0.5"):
        run_inprocess(tmp_path, [*HF, f"data.path={tmp_path}/scores.parquet"])
    with pytest.raises(DataError, match="data.image_key=path in .*holds str values such as "
                                        "'0.png', not images"):
        run_inprocess(tmp_path, [*HF, f"data.path={tmp_path}/scores.parquet", "data.image_key=path",
                                 "data.label_key=path"])
    assert not (tmp_path / "run").exists()


def test_a_grey_hf_data_set_has_one_channel(tmp_path):
    _hf(tmp_path, grey=True)
    s = run_inprocess(tmp_path, [*HF, f"data.path={tmp_path}/disk"])
    st = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert s["status"] == "finished" and st["shape"]["channels"] == 1


# ------------------------------------------------------------------ torchvision data sets
def test_a_torchvision_data_set_from_local_files(tmp_path):
    from test_adversarial import _imagefolder

    _imagefolder(tmp_path / "imgs")
    s = run_inprocess(tmp_path, ["experiment=smoke", "data=torchvision",
                                 "data.dataset=ImageFolder", f"data.root={tmp_path}/imgs",
                                 "trainer.max_epochs=2", "data.batch_size=4"])
    assert s["status"] == "finished" and (s["train_size"], s["num_classes"]) == (12, 2)
    with pytest.raises(ConfigError, match="close names: ImageFolder"):
        run_inprocess(tmp_path, ["experiment=smoke", "data=torchvision",
                                 "data.dataset=ImageFoldr", f"data.root={tmp_path}/imgs"],
                      name="bad")
    with pytest.raises(DataError, match="data.download=true"):
        run_inprocess(tmp_path, ["experiment=smoke", "data=torchvision", "data.dataset=SVHN",
                                 f"data.root={tmp_path}/nothing"], name="svhn")
    # classes not built from a root folder alone are refused by the pre-flight, named
    from ortho_run.validate import validate

    for cls, said in (("FakeData", "takes no root"), ("Kinetics", "also needs frames_per_clip")):
        cfg = compose(["data=torchvision", f"data.dataset={cls}"])
        with pytest.raises(ConfigError, match=f"data.dataset={cls}: .*{said}"):
            validate(cfg)
        with pytest.raises(ConfigError, match=said):
            run_inprocess(tmp_path, ["experiment=smoke", "data=torchvision",
                                     f"data.dataset={cls}"], name=cls)
        assert not (tmp_path / cls).exists()


@pytest.mark.slow
def test_cli_missing_extras_and_weights_exit_2(tmp_path):
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def fake(name, *a, **k):\n"
            "    if name.split('.')[0] in ('timm', 'datasets'): raise ImportError(name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = fake\n"
            "from ortho_run.cli import main; sys.argv = ['ortho-run'] + sys.argv[1:]; main()")
    import subprocess
    import sys

    for args, needle in ((["model=timm"], "pip install 'ortho-run[timm]'"),
                         (["data=hf", "data.path=x"], "pip install 'ortho-run[hf]'")):
        r = subprocess.run([sys.executable, "-c", code, "experiment=smoke", *args,
                            f"hydra.run.dir={tmp_path}/r"], capture_output=True, text=True,
                           env={**__import__("os").environ, "WANDB_MODE": "disabled"})
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli(["experiment=smoke", "model=timm", "model.pretrained=true",
             f"hydra.run.dir={tmp_path}/p"], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "model.checkpoint" in r.stderr and "Traceback" not in r.stderr

