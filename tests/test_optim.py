"""Orthogonalised optimisers and orthogonality regularisers: their maths against references,
their composition with every method, and what they do on digits."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose, run_inprocess
from ortho_run.optim.orthogonal import MUON_COEFFICIENTS, OrthogonalizedMomentum, newton_schulz
from ortho_run.regularizers.orthogonality import conv_orth, soft_orth, srip

SHAPES = [(8, 8), (5, 12), (12, 5), (3, 40), (40, 3)]


def polar(g):
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_approaches_the_polar_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    # the cubic iteration converges to the polar factor itself (slowly near small singular
    # values: 60 steps from a Frobenius-normalised start)
    exact = newton_schulz(g.double(), 60, (1.5, -0.5, 0.0), dtype=torch.float64)
    assert torch.allclose(exact, polar(g), atol=1e-6)
    # Muon's quintic, 5 steps in bf16: singular values in about [0.6, 1.25] (by design), the
    # same singular vectors
    muon = newton_schulz(g, 5, MUON_COEFFICIENTS).double()
    s = torch.linalg.svdvals(muon)
    assert s.min() > 0.55 and s.max() < 1.3, s
    assert F.cosine_similarity(muon.flatten(), polar(g).flatten(), dim=0) > 0.97


def _step(opt_fn, w0, grads):
    p = torch.nn.Parameter(w0.clone())
    opt = opt_fn([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_our_muon_step_equals_torch_optim_muon_on_matrices():
    torch.manual_seed(0)
    for shape in [(16, 8), (8, 16), (10, 10)]:
        w0 = torch.randn(*shape)
        grads = [torch.randn(*shape) for _ in range(4)]
        for nesterov, wd in ((True, 0.0), (False, 0.1)):
            ref = _step(lambda ps: torch.optim.Muon(ps, lr=0.02, momentum=0.95, nesterov=nesterov,
                                                    weight_decay=wd), w0, grads)
            ours = _step(lambda ps: OrthogonalizedMomentum(ps, lr=0.02, rule="muon",
                                                           nesterov=nesterov, weight_decay=wd),
                         w0, grads)
            assert torch.equal(ref, ours), (shape, nesterov, wd)


def test_muon_updates_convolutions_as_matrices():
    w0 = torch.randn(6, 3, 3, 3)
    g = torch.randn(6, 3, 3, 3)
    new = _step(lambda ps: OrthogonalizedMomentum(ps, lr=1.0, rule="muon", nesterov=False,
                                                  momentum=0.0), w0, [g])
    expected = w0 - newton_schulz(g.reshape(6, 27), 5).float().reshape(6, 3, 3, 3)
    assert torch.allclose(new, expected, atol=1e-6)


def _update(rule, g, **kw):
    """The step direction (before lr) of one step from zero momentum."""
    w0 = torch.zeros_like(g)
    opt_kw = dict(lr=1.0, rule=rule, momentum=0.0, nesterov=False, ns_dtype=torch.float32, **kw)
    return -_step(lambda ps: OrthogonalizedMomentum(ps, **opt_kw), w0, [g])


def test_normuon_normalises_rows_and_keeps_muons_norm():
    g = torch.randn(12, 7) * torch.logspace(-2, 1, 12)[:, None]  # rows of very unequal scale
    u = _update("normuon", g)
    muon = _update("muon", g)
    rows = u.norm(dim=1)
    assert torch.allclose(rows, rows.mean().expand(12), rtol=1e-4)  # equal normalised rows
    assert not torch.allclose(muon.norm(dim=1), muon.norm(dim=1).mean().expand(12), rtol=1e-2)
    assert u.norm().item() == pytest.approx(muon.norm().item(), rel=1e-5)  # Muon's Frobenius


def test_root_picks_coefficients_by_shape_and_orthogonalises_the_clipped_part():
    table = {"4x8": [2.0, -1.5, 0.5]}
    opt = OrthogonalizedMomentum([torch.nn.Parameter(torch.zeros(1, 1))], lr=1.0, rule="root",
                                 root_coefficients=table)
    assert opt.coefficients((4, 8)) == (2.0, -1.5, 0.5)
    assert opt.coefficients((8, 4)) == MUON_COEFFICIENTS
    muon = OrthogonalizedMomentum([torch.nn.Parameter(torch.zeros(1, 1))], lr=1.0)
    assert muon.coefficients((4, 8)) == MUON_COEFFICIENTS  # the table is ROOT's alone
    g = torch.randn(6, 10)
    g[0, 0] = 100.0  # an outlier
    u = _update("root", g, root_quantile=0.9)
    eps = g.abs().flatten().kthvalue(54).values  # the 0.9 quantile of 60 entries
    expected = newton_schulz(g.clamp(-eps, eps), 5, dtype=torch.float32) * 0.2 * math.sqrt(10)
    assert torch.allclose(u, expected, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_auon_update_is_bounded_in_spectral_norm(shape, scale):
    g = torch.randn(*shape) * scale
    g[0] *= 50  # spiky
    factor = math.sqrt(max(1.0, shape[0] / shape[1]))
    u = _update("auon", g) / factor
    assert torch.linalg.matrix_norm(u, ord=2) <= 1.0 + 1e-5
    x = g / g.norm()
    assert torch.allclose(u, x / torch.cosh(x).pow(2).mean().sqrt(), atol=1e-6)
    hybrid = _update("auon_hybrid", g, hybrid_ns_steps=1) / factor
    assert torch.allclose(hybrid, newton_schulz(u, 1, dtype=torch.float32), atol=1e-5)


# ------------------------------------------------------------------ regularisers
def _orthogonal(rows, cols, seed=0):
    q = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(seed)))[0]
    return q if rows >= cols else q.T


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4)])
def test_soft_orth_and_srip_are_zero_on_orthogonal_weights_and_positive_otherwise(shape):
    w = _orthogonal(*shape)
    assert soft_orth(w).item() < 1e-24 and srip(w).item() < 1e-24
    assert not torch.isnan(srip(w))  # the exactly orthogonal case has no NaN
    bent = w * 1.2
    assert soft_orth(bent).item() > 0.1 and srip(bent).item() > 0.1
    # SRIP is the top eigenvalue² of G − I: for 1.2·W that is (1.44 − 1)²
    assert srip(bent, 5).item() == pytest.approx(0.44 ** 2, rel=1e-6)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(soft_orth, (x,))
    assert torch.autograd.gradcheck(lambda t: srip(t, 3), (x,))


def test_conv_orth_is_zero_on_an_orthogonal_convolution_and_not_on_an_orthogonal_matrix():
    # the paper's construction at stride = kernel size: non-overlapping patches, so the
    # convolution is orthogonal iff the kernel, flattened to out × (in·k·k), has orthonormal rows
    k = _orthogonal(8, 3 * 2 * 2).reshape(8, 3, 2, 2)
    assert conv_orth(k, stride=2).item() < 1e-6
    assert conv_orth(k * 1.1, stride=2).item() > 0.1
    # the same flattening property at stride 1 with a 3×3 kernel is NOT an orthogonal
    # convolution (its shifted copies overlap): the regulariser sees it, a matrix test would not
    k3 = _orthogonal(6, 2 * 3 * 3).reshape(6, 2, 3, 3)
    assert soft_orth(k3).item() < 1e-20 and conv_orth(k3, stride=1).item() > 0.1
    # a 1×1 kernel with orthonormal rows: orthogonal at stride 1 too
    assert conv_orth(_orthogonal(4, 4).reshape(4, 4, 1, 1), stride=1).item() < 1e-6
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: conv_orth(t, 1), (x,))
    assert torch.autograd.gradcheck(lambda t: conv_orth(t, 2, squared=True), (x,))


def test_regularizer_layers_are_chosen_by_glob_and_logged_as_a_loss_part(tmp_path):
    from ortho_run.runner.run import build_job

    cfg = compose(["experiment=smoke", "regularizer=soft_orth", "regularizer.layers=[body.3]",
                   "logger.mode=disabled"])
    job = build_job(cfg, tmp_path / "x")
    assert job.regularizer.names == ["body.3"]
    s = run_inprocess(tmp_path, ["experiment=smoke", "regularizer=soft_orth",
                                 "regularizer.weight=0.01"])
    assert s["train/reg"] > 0 and s["geometry/layer_orth_err"] > 0
    assert "train/reg" not in run_inprocess(tmp_path, ["experiment=smoke"], name="none")


def test_hard_orthogonal_constraint_keeps_linear_layers_orthogonal(tmp_path):
    s = run_inprocess(tmp_path, ["experiment=smoke", "regularizer=orthogonal",
                                 "model.embed_dim=16", "regularizer.layers=[embed.*]"])
    assert s["status"] == "finished" and s["geometry/layer_orth_err"] < 1e-4


def test_gcr_keeps_its_riemannian_step_under_muon_and_roles_are_configurable(tmp_path):
    from ortho_run.runner.run import build_job

    job = build_job(compose(["experiment=smoke", "method=gcr", "optim=muon",
                             "logger.mode=disabled"]), tmp_path / "x")
    kinds = [type(o).__name__ for o in job.trainer.optimizers]
    assert kinds == ["OrthogonalizedMomentum", "AdamW", "GrassmannSGD"]
    assert [g["role"] for g in job.trainer.optimizers[0].param_groups] == ["hidden"]
    assert job.trainer.optimizers[1].param_groups[0]["role"] == "stem+backbone_1d"
    job = build_job(compose(["experiment=smoke", "optim=muon", "optim.roles=[hidden,stem]",
                             "optim.other=sgd", "logger.mode=disabled"]), tmp_path / "y")
    assert [type(o).__name__ for o in job.trainer.optimizers] == ["OrthogonalizedMomentum", "SGD"]
    assert job.trainer.optimizers[0].param_groups[0]["role"] == "stem+hidden"


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["muon", "normuon", "root", "auon", "auon_hybrid"])
@pytest.mark.parametrize("method", ["ce", "opl"])
def test_every_optimiser_learns_digits(tmp_path, optim, method):
    s = run_inprocess(tmp_path, [f"optim={optim}", f"method={method}", "trainer.max_epochs=12"])
    assert s["test/acc1"] >= 0.95, s["test/acc1"]


@pytest.mark.slow
@pytest.mark.parametrize("reg,weight,factor", [
    ("soft_orth", 0.01, 0.5),  # the error itself: measured 0.18 against 5.57 without
    ("srip", 0.1, 0.9),  # its top eigenvalue only: measured 4.20
    ("conv_orth", 0.1, 0.9),  # the convolution's orthogonality, not the matrix's: 4.69
])
def test_regularisers_reduce_their_layers_orthogonality_error(tmp_path, reg, weight, factor):
    args = ["trainer.max_epochs=8", "trainer.geometry=false"]
    base = run_inprocess(tmp_path, args, name="none")
    s = run_inprocess(tmp_path, [*args, f"regularizer={reg}", f"regularizer.weight={weight}"],
                      name=reg)
    assert s["geometry/layer_orth_err"] < factor * base["geometry/layer_orth_err"]
    assert s["test/acc1"] > 0.9


@pytest.mark.slow
def test_optim_study_preset_sweeps_optimisers_by_methods_and_the_report_groups_by_both(tmp_path):
    from conftest import cli
    from ortho_run.report import report

    r = cli(["experiment=optim_study", "optim=sgd,muon", "method=ce,opl", "trainer.max_epochs=1",
             "data.max_train_samples=128", "logger.mode=disabled",
             f"hydra.sweep.dir={tmp_path}/study"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 jobs" in r.stdout and "4 finished" in r.stdout
    table, problems, _, _ = report([tmp_path / "study"], plots=False)
    shared = "data.max_train_samples=128 experiment=optim_study"
    assert sorted(table) == [f"{shared} method={m} optim={o} trainer.max_epochs=1"
                             for m in ("ce", "opl") for o in ("muon", "sgd")]
    assert not problems
