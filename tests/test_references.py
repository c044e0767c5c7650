"""Published numbers next to ours: the reference table, the verdicts, the setting differences,
the presets that name a reference and ortho-report's comparison."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, compose
from ortho_run import keys
from ortho_run.references import REFERENCES, Published, differences, get, verdict


def _produced_keys():
    """The summary keys our runs produce for what references compare: test accuracy and the
    compatibility matrix (computed here on random embeddings)."""
    from ortho_run.compat.evaluate import compat_matrix

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(20) % 4
    out = compat_matrix({"new": torch.randn(20, 6, generator=g)}, torch.randn(20, 6, generator=g),
                        labels)
    return {keys.TEST_ACC1, *out}


def test_every_reference_has_a_source_a_setting_and_keys_our_runs_produce():
    produced = _produced_keys()
    from ortho_run.methods import METHODS

    for r in REFERENCES.values():
        assert r.source and r.paper and r.table and r.setting, r.name
        assert r.rows, r.name
        for method, row in r.rows.items():
            assert method in METHODS, (r.name, method)
            for key, pub in row.items():
                assert key in produced, (r.name, key)
                assert 0 <= pub.value <= 100, (r.name, key)


@pytest.mark.parametrize("ours,pub,mark", [
    ([0.72, 0.73, 0.725], Published(72.4, spread=0.5), "✅"),  # inside the spread
    ([0.70, 0.70, 0.70], Published(72.4, spread=0.5), "❌"),  # outside it
    ([0.71, 0.73, 0.72], Published(72.4), "✅"),  # no spread: 2σ of ours (2 × 1.0)
    ([0.68, 0.681, 0.679], Published(72.4), "❌"),
    ([0.72, 0.73], Published(72.4), "n < 3"),
    ([], Published(72.4), "missing"),
    ([float("nan"), 0.72, 0.73], Published(72.4), "n < 3"),  # a NaN run does not count
])
def test_verdicts(ours, pub, mark):
    assert verdict(ours, pub)[0] == mark


def test_setting_differences_are_listed_from_the_runs_config():
    ref = get("opl_cifar100")
    same = OmegaConf.to_container(compose(["experiment=opl_cifar100"]), resolve=True)
    assert differences(ref, same) == []
    other = OmegaConf.to_container(compose(["experiment=opl_cifar100", "data=cifar10",
                                            "model=resnet20", "trainer.max_epochs=30"]),
                                   resolve=True)
    diffs = differences(ref, other)
    assert diffs == ["data.name=cifar10 (paper: CIFAR-100)", "model.name=resnet20 (paper: "
                     "ResNet-56)", "trainer.max_epochs=30 (paper: 200 epochs)"]


def test_an_unknown_reference_is_refused_in_the_pre_flight(tmp_path):
    from conftest import run_inprocess
    from ortho_run.errors import ConfigError

    with pytest.raises(ConfigError, match="reference=nope: no such published result"):
        run_inprocess(tmp_path, ["experiment=smoke", "reference=nope"])


@pytest.mark.parametrize("preset", ["opl_cifar100", "compat_cifar100", "airbench94"])
def test_a_paper_preset_names_its_table_and_sweeps_its_methods(preset):
    cfg = OmegaConf.load(REPO / "conf" / "experiment" / f"{preset}.yaml")
    ref = get(cfg.reference)
    params = cfg.hydra.sweeper.params
    methods = (set(str(params.method).split(",")) if "method" in params
               else {compose([f"experiment={preset}"]).method.name})
    assert methods == set(ref.rows), preset  # the whole table, no more
    assert "seed" in params


def test_the_reference_is_recorded_and_the_report_compares(tmp_path):
    from conftest import run_inprocess
    from ortho_run.report import report

    s = run_inprocess(tmp_path, ["experiment=opl_cifar100", "data=synthetic",
                                 "data.num_classes=100", "data.image_size=32",
                                 "data.train_per_class=2", "data.test_per_class=1",
                                 "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                                 "data.val_fraction=0.5", "data.batch_size=16"], name="real")
    assert s["reference"] == "opl_cifar100"
    assert json.loads((tmp_path / "real" / "summary.json").read_text())["reference"] == \
        "opl_cifar100"
    # hand-made runs of the same reference: three seeds of ce near the paper, two of opl
    cfg = OmegaConf.to_yaml(compose(["experiment=opl_cifar100", "data=cifar10"]))
    for i, (method, acc) in enumerate([("ce", 0.721), ("ce", 0.727), ("ce", 0.724),
                                       ("opl", 0.70), ("opl", 0.71)]):
        d = tmp_path / "sweep" / str(i)
        d.mkdir(parents=True)
        (d / "resolved_config.yaml").write_text(cfg)
        (d / "summary.json").write_text(json.dumps({
            "status": "finished", "method": method, "reference": "opl_cifar100",
            "overrides": [f"method={method}", f"seed={i}"], keys.TEST_ACC1: acc}))
    report([tmp_path / "sweep"], plots=False)
    md = (tmp_path / "sweep" / "report.md").read_text()
    section = md.split("## Against published results")[1]
    ce = next(l for l in section.splitlines() if l.startswith("| method=ce"))
    assert "| 72.40 ± 0.30 (n=3) | 72.40 | " in ce and "0.00 |" in ce and "✅" in ce
    assert "data.name=cifar10 (paper: CIFAR-100)" in ce
    opl = next(l for l in section.splitlines() if l.startswith("| method=opl"))
    assert "n < 3" in opl and "-3.02" in opl
    # any runs against a named reference
    report([tmp_path / "sweep"], plots=False, against="airbench94")
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "| airbench94 |" in md and "94.01 (n=200)" in md


def test_the_references_are_listed(capsys):
    from ortho_run.report import main

    main(["--references"])
    out = capsys.readouterr().out
    assert all(name in out for name in REFERENCES) and "YifeiZhou02/BT-2" in out
