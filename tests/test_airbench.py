"""The airbench94 protocol: its network, whitening, Muon form, augmentation, schedule, loss,
test-time augmentation and timing, each against a direct computation; a run on real images."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import official_updates as official
from conftest import SHARED_NPZ, compose, run_inprocess
from ortho_run.models.airbench import Airbench94, whitening_filters
from ortho_run.optim.orthogonal import OrthogonalizedMomentum, hyper_from_config

SMALL = ["experiment=airbench94", "data=synthetic", "data.num_classes=10", "data.image_size=32",
         "data.train_per_class=12", "data.test_per_class=2", "data.batch_size=40",
         "data.eval_batch_size=40", "trainer.compile=false", "trainer.warmup_steps=0",
         "model.init_images=60", "model.widths=[8,16,16]", "logger.mode=disabled",
         "trainer.progress=off"]


def _patches_by_hand(x, k):
    """Every k×k patch at stride 1, flattened channel-major, by explicit loops."""
    n, c, h, w = x.shape
    out = [x[i, :, r:r + k, s:s + k].reshape(-1) for i in range(n) for r in range(h - k + 1)
           for s in range(w - k + 1)]
    return torch.stack(out).double()


def test_whitening_filters_are_the_eigenvectors_of_the_patch_covariance():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 7, 7, generator=gen) * torch.tensor([1.0, 0.3, 2.0]).view(1, 3, 1, 1)
    w = whitening_filters(x, 2, 5e-4).double()
    assert w.shape == (24, 3, 2, 2)
    p = _patches_by_hand(x, 2)
    cov = p.T @ p / len(p)  # uncentred, as airbench
    lam, vec = np.linalg.eigh(cov.numpy())
    half = w[:12].reshape(12, -1)
    # each filter is an eigenvector scaled by 1/sqrt(λ + ε) (up to its sign), in ascending order
    for i in range(12):
        v = torch.from_numpy(vec[:, i])
        assert abs(float(half[i] @ v) * np.sqrt(lam[i] + 5e-4)) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(w[12:], -w[:12])
    # the first half whitens the patches: output covariance diag(λ / (λ + ε))
    out_cov = half @ cov @ half.T
    assert torch.allclose(out_cov, torch.diag(torch.from_numpy(lam / (lam + 5e-4))), atol=1e-5)


def test_net_shapes_frozen_parts_and_initialisation():
    cfg = compose(["model=airbench94"]).model
    torch.manual_seed(0)
    net = Airbench94(cfg)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    assert not net.whiten.weight.requires_grad and net.whiten.bias.requires_grad
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6 and all(not m.weight.requires_grad for m in norms)
    assert all(m.momentum == pytest.approx(0.4) and m.eps == 1e-12 for m in norms)
    conv = net.layers[1].conv1  # 24 -> 64: a Dirac on its first 24 filters
    w = conv.weight.detach()
    eye = torch.zeros(24, 24, 3, 3)
    eye[range(24), range(24), 1, 1] = 1
    assert torch.equal(w[:24], eye) and w[24:].abs().sum() > 0
    groups = net.param_groups()
    assert [g.role for g in groups] == ["hidden", "backbone_1d", "backbone_1d"]
    assert len(groups[0].params) == 6 and all(p.ndim == 4 for p in groups[0].params)
    assert groups[2].params == [net.whiten.bias] and groups[2].schedule_epochs == 3.0


def test_the_runner_whitens_from_training_images_and_the_head_is_airbenchs(tmp_path):
    from ortho_run.runner.run import build_job

    job = build_job(compose(SMALL), tmp_path / "x")
    tr = job.trainer
    assert tr.init_images.shape == (60, 3, 32, 32)
    # normalised as the loaders normalise (per-channel mean 0 over the training set)
    assert tr.init_images.mean().abs() < 0.2
    tr.net.backbone.init_from_data(tr.init_images)
    assert torch.allclose(tr.net.backbone.body.whiten.weight,
                          whitening_filters(tr.init_images, 2, 5e-4), atol=1e-6)
    head = tr.net.method
    assert head.fc.bias is None and head.logit_divisor == 16
    assert head.fc.weight.std().item() == pytest.approx(1.0, rel=1e-5)
    kinds = [type(o).__name__ for o in tr.optimizers]
    assert kinds == ["OrthogonalizedMomentum", "SGD"]
    sgd = tr.optimizers[1]
    by_role = {g["role"]: g for g in sgd.param_groups}
    assert by_role["backbone_1d"]["lr"] == pytest.approx(0.053)
    assert by_role["head"]["lr"] == pytest.approx(0.67)
    assert by_role["head"]["lr"] * by_role["head"]["weight_decay"] == pytest.approx(0.004)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.85


def test_muon_in_airbench_form_equals_airbench_muon():
    gen = torch.Generator().manual_seed(1)
    shapes = [(16, 8, 3, 3), (16, 16, 3, 3), (16, 16, 3, 3), (32, 16, 3, 3)]
    ws = [torch.randn(*s, generator=gen) for s in shapes]
    gs = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(4)]
    cfg = compose(["experiment=airbench94", "optim.ns_dtype=fp32"]).optim
    from omegaconf import OmegaConf

    plain = OmegaConf.to_object(cfg)
    ps = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = OrthogonalizedMomentum(ps, lr=cfg.lr, rule="muon", momentum=cfg.momentum,
                                 nesterov=cfg.nesterov, hyper=hyper_from_config("muon", plain))
    for step in gs:
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()
    ref = official.airbench_muon_step(ws, gs)
    assert max(float((p.detach() - r).abs().max()) for p, r in zip(ps, ref)) <= 1e-6


def _shift_by_hand(x, dy, dx):
    """The image moved by (dy, dx) pixels with reflected borders, via numpy."""
    a = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    h, w = x.shape[-2:]
    return torch.from_numpy(a[:, :, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w].copy())


def test_tta_level_two_is_airbenchs_weighting():
    from ortho_run.runner.evaluate import tta_logits

    torch.manual_seed(0)
    lin = torch.nn.Linear(3 * 8 * 8, 5)

    class Net(torch.nn.Module):
        def forward(self, x):
            return None, type("Out", (), {"logits": lin(x.flatten(1))})()

    net, x = Net(), torch.randn(4, 3, 8, 8)
    f = lambda t: lin(t.flatten(1))  # noqa: E731
    mirror = lambda t: 0.5 * f(t) + 0.5 * f(t.flip(-1))  # noqa: E731
    # padded[:, :, 0:h, 0:w] shows the image moved down-right by one, [2:, 2:] up-left
    want = 0.5 * mirror(x) + 0.5 * (mirror(_shift_by_hand(x, 1, 1))
                                    + mirror(_shift_by_hand(x, -1, -1))) / 2
    got = tta_logits(net, x, f(x), flip=True, translate=True)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(tta_logits(net, x, f(x), flip=True, translate=False), mirror(x),
                          atol=1e-6)


def test_alternating_flips_and_reflect_translations():
    from ortho_run.datasets.base import Split
    from ortho_run.datasets.loaders import DeviceLoader

    n = 64
    x = torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8)
    x[:, :, :, :3] = 0  # left half dark, right half bright: a flip is visible
    x[:, :, :, 3:] = 200
    split = Split(y=torch.arange(n), x=x)
    dl = DeviceLoader(split, n, "cpu", [0.0], [1 / 255], train=True, augment="flip",
                      flip_mode="alternating", seed=3)
    seen = []
    for epoch in range(4):
        dl.set_epoch(epoch)
        xb, yb = next(iter(dl))
        flipped = xb[:, 0, 0, 0] > 100  # bright on the left: mirrored
        seen.append(torch.zeros(n, dtype=torch.bool).index_put_((yb,), flipped))
    assert 0.3 < seen[0].float().mean() < 0.7  # a random half in even epochs
    assert torch.equal(seen[1], ~seen[0]) and torch.equal(seen[2], seen[0])  # then alternating
    dl = DeviceLoader(split, n, "cpu", [0.0], [1 / 255], train=True, augment="crop_flip", padding=2,
                      pad_mode="reflect", seed=0)
    padded = F.pad(x.float(), (2, 2, 2, 2), mode="reflect")
    xb, yb = next(iter(dl))
    for img, label in zip(xb, yb):  # each crop is a window of the reflect-padded image
        win = padded[label]
        windows = [win[:, r:r + 6, s:s + 6] for r in range(5) for s in range(5)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(img, w) for w in windows)


def test_linear_schedules_and_the_whitening_bias_stops_after_its_epochs(tmp_path):
    from ortho_run.runner.run import build_job

    tr = build_job(compose(SMALL), tmp_path / "x").trainer
    spe = len(tr.train_loader)
    total = 8 * spe
    sgd, sched = tr.optimizers[1], tr.schedulers[1]
    roles = [g["role"] for g in sgd.param_groups]
    whiten = next(i for i, g in enumerate(sgd.param_groups) if g["schedule_epochs"] == 3.0)
    factors = []
    for s in range(total):
        factors.append([g["lr"] / g0 for g, g0 in zip(sgd.param_groups, sched.base_lrs)])
        sched.step()
    for s, f in enumerate(factors):
        for i, v in enumerate(f):
            horizon = 3 * spe if i == whiten else total
            want = max(0.0, 1 - s / horizon) if s < horizon else 0.0
            assert v == pytest.approx(want, abs=1e-12), (s, roles[i])


def test_summed_loss_scales_the_gradient_by_the_batch(tmp_path):
    from ortho_run.runner.run import build_job

    grads = {}
    for mode in ("mean", "sum"):
        torch.manual_seed(0)
        tr = build_job(compose(SMALL + [f"trainer.loss_reduction={mode}"]), tmp_path / mode).trainer
        for o in tr.optimizers:
            o.step = lambda *a, **k: None  # keep the gradients, change nothing
        x, y = next(iter(tr.train_loader))
        parts = tr.step(x, y)
        grads[mode] = (tr.net.method.fc.weight.grad.clone(), parts["loss"].item())
    assert grads["sum"][1] == pytest.approx(grads["mean"][1])  # the logged part: a mean
    # float32 backward passes of the two losses round apart by ~1e-7 of the largest entry:
    # the tolerance is relative to the gradient's scale, not to each (possibly tiny) entry
    want = 40 * grads["mean"][0]
    torch.testing.assert_close(grads["sum"][0], want, rtol=1e-5,
                               atol=1e-5 * want.abs().max().item())


def test_warm_up_steps_are_undone_exactly(tmp_path):
    base = SMALL + ["trainer.max_epochs=2", "trainer.deterministic=true"]
    a = run_inprocess(tmp_path, base, name="a")
    b = run_inprocess(tmp_path, base + ["trainer.warmup_steps=3"], name="b")
    wa = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=False)["net"]
    wb = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["net"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["test/acc1"] == b["test/acc1"] and b["step"] == a["step"]
    assert 0 < b["time/train_s"] <= b["time/total_s"]


@pytest.mark.slow
def test_airbench94_learns_shared_cifar10_on_a_cpu(tmp_path):
    """Two epochs of the protocol on 10,000 real CIFAR-10 training images (batch 500)."""
    if not SHARED_NPZ.is_file():
        pytest.skip("the shared CIFAR-10 archive is not on this machine")
    root = tmp_path / "cifar"
    r = subprocess.run([sys.executable, "-m", "ortho_run.datasets", "from-jpeg", str(SHARED_NPZ),
                        str(root), "--limit", "10000"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    s = run_inprocess(tmp_path, ["experiment=airbench94", f"data.root={root}",
                                 "data.batch_size=500", "trainer.max_epochs=2",
                                 "trainer.compile=false", "trainer.warmup_steps=0",
                                 "trainer.tta_translate=false"])
    assert s["status"] == "finished"
    assert s["test/acc1"] > 0.35, s["test/acc1"]  # chance: 0.10
    print(json.dumps({k: s[k] for k in ("test/acc1", "time/train_s", "time/total_s")}))
