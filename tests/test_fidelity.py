"""Fidelity to the official code: the compatibility losses against direct computations, the
official defaults (OCA's pseudo-classifier and head, BCT's class-means variant, the old-model
protocol), OPL's CIFAR recipe with colour jitter, and λ-orthogonality across dims."""

import pytest
import torch
import torch.nn.functional as F

from conftest import compose, run_inprocess
from ortho_run.compat import CompatArtifacts
from ortho_run.methods import METHODS, Batch, LinearHead, MethodContext

D, C, C_OLD = 6, 5, 3


def artifacts(d_old=D, unit_head=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(40, d_old, generator=g) * 3
    labels = torch.arange(40) % C
    raw = torch.stack([feats[labels == c].mean(0) for c in range(C)])
    unit = torch.stack([F.normalize(feats[labels == c], dim=1).mean(0) for c in range(C)])
    head = LinearHead(torch.randn(C_OLD, d_old, generator=g), torch.randn(C_OLD, generator=g),
                      unit_head)
    return CompatArtifacts(old_dim=d_old, num_old_classes=C_OLD, class_means=raw,
                           unit_class_means=unit, old_head=head)


def build(name, *overrides, feature_dim=D, art=None, smoothing=0.0):
    cfg = compose([f"method={name}", *overrides]).method
    ctx = MethodContext(feature_dim=feature_dim, num_classes=C, artifacts=art or artifacts(),
                        label_smoothing=smoothing)
    return METHODS.get(name)(cfg, ctx)


def batch(n=12, d=D, seed=1, old_dim=None):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=torch.float64).float().requires_grad_()
    y = torch.arange(n) % C
    old = torch.randn(n, old_dim, generator=g) if old_dim else None
    return Batch(inputs=f, targets=y, features=f, old=old)


def ce(logits, y, eps=0.0):
    """Cross-entropy written out: −Σ q log softmax, with label smoothing eps."""
    logp = logits.double().log_softmax(1)
    q = torch.full_like(logp, eps / logits.shape[1])
    q[torch.arange(len(y)), y] += 1 - eps
    return -(q * logp).sum(1).mean()


def check_value_and_grad(m, b, ref_fn):
    got = m.loss(m(b), b)
    ref = ref_fn(b.features)
    assert got["loss"].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    g1, = torch.autograd.grad(got["loss"], b.features, retain_graph=True)
    g2, = torch.autograd.grad(ref, b.features)
    assert torch.allclose(g1.double(), g2.double(), atol=1e-5), (g1.double() - g2.double()).abs().max()
    return got


# ------------------------------------------------------------------ BCT
def test_bct_paper_variant_against_a_direct_computation():
    art = artifacts()
    m = build("bct", art=art, smoothing=0.1)
    assert m.alpha == 1.0 and m.fc.bias is not None  # the paper: α = 1, CE head with bias
    w = torch.cat([art.old_head.weight, art.class_means[C_OLD:]])  # raw-mean new-class rows
    b0 = torch.cat([art.old_head.bias, torch.zeros(C - C_OLD)])

    def ref(f):
        return ce(m.fc(f), b.targets, 0.1) + ce(f.double() @ w.double().t() + b0.double(),
                                                b.targets, 0.1)

    b = batch()
    parts = check_value_and_grad(m, b, ref)
    assert {"ce", "bct_influence"} <= parts.keys()


def test_bct_scaled_unit_mean_rows_match_the_trained_rows_norm():
    art = artifacts()
    m = build("bct", "method.new_rows=scaled_unit_mean", art=art)
    rows = m.old_w[C_OLD:]
    assert torch.allclose(rows.norm(dim=1), art.old_head.weight.norm(dim=1).mean().expand(2))
    cos = F.cosine_similarity(rows, art.unit_class_means[C_OLD:], dim=1)
    assert torch.allclose(cos, torch.ones(2), atol=1e-6)
    raw = build("bct", art=art).old_w[C_OLD:]  # the paper's rows are the raw means
    assert torch.equal(raw, art.class_means[C_OLD:])


def test_bct_class_means_variant_is_the_bt2_code():
    """BT²'s BCT: bias-free head on unit features, influence norm(φ)Pᵀ with P the mean of old
    unit features (not renormalised), α = 10."""
    art = artifacts()
    m = build("bct", "method.influence=class_means", art=art)
    assert m.alpha == 10.0 and m.fc.bias is None and m.old_b is None
    assert torch.equal(m.old_w, art.unit_class_means)
    assert not torch.allclose(m.old_w.norm(dim=1), torch.ones(C))  # rows keep norm < 1

    def ref(f):
        u = F.normalize(f, dim=1).double()
        return ce(u @ m.fc.weight.double().t(), b.targets) + 10 * ce(
            u @ art.unit_class_means.double().t(), b.targets)

    b = batch()
    check_value_and_grad(m, b, ref)


def test_bct_old_head_of_a_norm_feature_old_model_scores_unit_features():
    art = artifacts(unit_head=True)
    m = build("bct", art=art)
    b = batch()
    w = torch.cat([art.old_head.weight, art.class_means[C_OLD:]])
    b0 = torch.cat([art.old_head.bias, torch.zeros(C - C_OLD)])
    check_value_and_grad(m, b, lambda f: ce(m.fc(f), b.targets) + ce(
        F.normalize(f, dim=1).double() @ w.double().t() + b0.double(), b.targets))


# ------------------------------------------------------------------ OCA
def test_oca_official_pseudo_classifier_and_bias_free_head():
    d_old, k = 4, 2
    art = artifacts(d_old=d_old)
    m = build("oca", f"method.extra_dims={k}", feature_dim=d_old + k, art=art, smoothing=0.1)
    assert m.fc.bias is None  # the official new classifier has no bias
    assert torch.equal(m.pseudo, art.unit_class_means)  # means of unit features, as they are
    p = art.unit_class_means.double()

    def ref(f):
        h = F.normalize(f.double(), dim=1)
        logits = (m.transform(h.float()) @ m.fc.weight.t()).double()
        h_old = F.normalize(h[:, :d_old], dim=1)
        cos = (h_old * F.normalize(p[b.targets], dim=1)).sum(1).mean()
        return 5 * ce(logits, b.targets, 0.1) + 10 * ce(h_old @ p.t(), b.targets, 0.1) + 5 * (1 - cos)

    b = batch(d=d_old + k)
    parts = check_value_and_grad(m, b, ref)
    assert {"ce", "align_ce", "align_cos"} <= parts.keys()
    renorm = build("oca", f"method.extra_dims={k}", "method.pseudo=renormalized",
                   feature_dim=d_old + k, art=art)
    assert torch.allclose(renorm.pseudo.norm(dim=1), torch.ones(C))


# ------------------------------------------------------------------ λ-orthogonality
@pytest.mark.parametrize("d_new,d_old", [(6, 6), (8, 5), (4, 7)])
def test_lambda_orth_total_loss_against_a_direct_computation(d_new, d_old):
    art = artifacts(d_old=d_old)
    m = build("lambda_orth", "method.lambda_=0.5", "method.alpha=3", feature_dim=d_new, art=art)
    with torch.no_grad():  # away from the identity start, so every term is active
        m.backward_adapter.weight.add_(0.3 * torch.randn_like(m.backward_adapter.weight))
    assert tuple(m.backward_adapter.weight.shape) == (d_old, d_new)
    assert tuple(m.forward_adapter.weight.shape) == (d_old, d_old)
    b = batch(d=d_new, old_dim=d_old)

    def supcon(a, o, y, t=0.1):
        a, o = F.normalize(a.double(), dim=1), F.normalize(o.double(), dim=1)
        total = 0
        for i in range(len(a)):
            logits = a[i] @ o.t() / t
            logp = logits - torch.logsumexp(logits, 0)
            pos = (y == y[i]).double()
            total = total - (pos * logp).sum() / pos.sum()
        return total / len(a)

    def ref(f):
        w, bias = m.backward_adapter.weight.double(), m.backward_adapter.bias.double()
        h_new = F.normalize(f.double(), dim=1)
        h_old = F.normalize(b.old.double(), dim=1)
        bb = h_new @ w.t() + bias
        ff = h_old @ m.forward_adapter.weight.double().t() + m.forward_adapter.bias.double()
        gram = w @ w.t() if d_old <= d_new else w.t() @ w
        dev = torch.linalg.matrix_norm(gram - torch.eye(len(gram), dtype=torch.float64))
        l_lam = torch.sigmoid(3 * (dev - 0.5)) * dev
        return ((ff - bb) ** 2).sum(1).mean() + ((bb - h_old) ** 2).sum(1).mean() \
            + 0.1 * (supcon(ff, bb, b.targets) + supcon(ff, h_old, b.targets)) + l_lam

    check_value_and_grad(m, b, ref)


@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (5, 5)])
def test_orth_deviation_is_zero_on_orthonormal_rectangular_maps(shape):
    from ortho_run.orthogonality import gram_error as orth_deviation

    q = torch.linalg.qr(torch.randn(max(shape), min(shape), dtype=torch.float64))[0]
    w = q if shape[0] >= shape[1] else q.t()
    assert tuple(w.shape) == shape
    assert orth_deviation(w).item() < 1e-12
    assert orth_deviation(1.1 * w).item() > 0.1


def test_lambda_orth_trains_between_models_of_different_dims(tmp_path):
    s = run_inprocess(tmp_path, ["experiment=compat_smoke", "method=lambda_orth",
                                 "trainer.max_epochs=3", 'compat.old_overrides=["model.embed_dim=16"]',
                                 f"cache_dir={tmp_path}/cache"])
    assert s["status"] == "finished" and s["compat/new_old/cmc1"] > 0.3
    st = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["net"]
    w = st["method.backward_adapter.weight"]
    assert tuple(w.shape) == (16, 32)  # new (32-d) -> old (16-d)
    dev = torch.linalg.matrix_norm(w @ w.t() - torch.eye(16)).item()
    assert s["geometry/b_orth_dev"] == pytest.approx(dev, rel=1e-5)


# ------------------------------------------------------------------ the old-model protocol
def test_old_model_protocol_follows_bt2_with_normalised_features(tmp_path):
    from ortho_run.compat import old_config
    from ortho_run.roles import INDEPENDENT

    cfg = compose(["experiment=compat_smoke", "method=oca", f"cache_dir={tmp_path}"])
    assert cfg.compat.old_norm_feature is True  # the presets follow the BT²/OCA recipe
    old = old_config(cfg, "first_half", "ce", norm_feature=True)
    assert old.method.norm_feature is True and old.method.bias is None
    m = METHODS.get("ce")(old.method, MethodContext(feature_dim=4, num_classes=3))
    assert m.fc.bias is None and m.classifier().unit_features
    x = torch.randn(2, 4)
    assert torch.allclose(m(Batch(x, features=x)).logits, F.normalize(x, dim=1) @ m.fc.weight.t())
    independent = old_config(cfg, None, "ce", role=INDEPENDENT)  # the new side stays plain CE
    assert independent.method.norm_feature is False


# ------------------------------------------------------------------ OPL's CIFAR recipe
def test_opl_cifar100_preset_is_the_official_recipe():
    cfg = compose(["experiment=opl_cifar100"])
    assert cfg.optim.warmup_epochs == 1 and cfg.data.color_jitter == 0.4
    assert cfg.data.val_fraction == 0.1 and str(cfg.data.augment) == "crop_flip"
    assert list(cfg.optim.milestones) == [60, 120, 160] and cfg.optim.gamma == 0.2


def test_resident_color_jitter_matches_torchvision_functional_ops():
    import torchvision.transforms.functional as TF

    from ortho_run.datasets.loaders import color_jitter

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 6, 6), generator=g).float()
    f = torch.tensor([[0.7, 1.3, 0.6], [1.2, 0.8, 1.4], [1.0, 1.0, 1.0], [0.6, 0.6, 0.6]])
    got = color_jitter(x, f)
    for i in range(4):
        ref = TF.adjust_brightness(x[i] / 255, float(f[i, 0]))
        ref = TF.adjust_contrast(ref, float(f[i, 1]))
        ref = TF.adjust_saturation(ref, float(f[i, 2]))
        assert torch.allclose(got[i] / 255, ref, atol=1e-5), i
    assert torch.equal(color_jitter(x, torch.ones(4, 3)), x)  # factor 1: the identity


def test_color_jitter_reaches_both_pipelines_and_only_training():
    from ortho_run.datasets import load_dataset
    from ortho_run.datasets.loaders import DeviceLoader, build_loader

    cfg = compose(["data=synthetic", "data.color_jitter=0.4", "data.augment=none",
                   "data.train_per_class=4"]).data
    ds = load_dataset(cfg)
    plain = compose(["data=synthetic", "data.augment=none", "data.train_per_class=4"]).data
    dev = torch.device("cpu")
    a = next(iter(build_loader(ds, ds.train, cfg, dev, True, 0, "resident")))[0]
    b = next(iter(build_loader(ds, ds.train, plain, dev, True, 0, "resident")))[0]
    assert not torch.allclose(a, b)
    test = build_loader(ds, ds.test, cfg, dev, False, 0, "resident")
    assert isinstance(test, DeviceLoader) and test.jitter == 0.0
    loader = build_loader(ds, ds.train, cfg, dev, True, 0, "loader")
    names = [type(t).__name__ for t in loader.dl.dataset.transform.transforms]
    assert "ColorJitter" in names
