"""Each method against hand computations and its invariants."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose
from ortho_run.errors import ConfigError
from ortho_run.methods import METHODS, Batch, MethodContext
from ortho_run.methods.ebv import cached_ebv, generate_ebv, max_abs_cos, welch_bound
from ortho_run.optim import build_optimizers
from ortho_run.optim.grassmann import geodesic_step
from ortho_run.methods.opl import opl_terms, opl_terms_reference


def build(name, feature_dim=6, num_classes=4, *overrides, **ctx):
    cfg = compose([f"method={name}", *overrides]).method
    return METHODS.get(name)(cfg, MethodContext(feature_dim=feature_dim, num_classes=num_classes,
                                                **ctx))


def fb(features, targets=None):
    """A batch whose inputs are already the features (method-level tests)."""
    return Batch(inputs=features, targets=targets, features=features)


# ---------------------------------------------------------------------------- OPL
@pytest.mark.parametrize("opl_terms", [opl_terms, opl_terms_reference])
def test_opl_matches_hand_computation(opl_terms):
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    # cosines: c01 = 1/√2, c23 = 0 (same class); c02 = 0, c03 = -1, c12 = 1/√2, c13 = -1/√2
    s_ref = (2 * (1 / math.sqrt(2)) + 2 * 0.0) / 4
    d_ref = 2 * (0 + 1 + 1 / math.sqrt(2) + 1 / math.sqrt(2)) / 8
    t = opl_terms(f, y, "per_element", eps=0.0)
    assert t["s"].item() == pytest.approx(s_ref, abs=1e-6)
    assert t["d"].item() == pytest.approx(d_ref, abs=1e-6)
    d_agg = abs(2 * (0 - 1 + 1 / math.sqrt(2) - 1 / math.sqrt(2))) / 8
    assert opl_terms(f, y, "aggregate", 0.0)["d"].item() == pytest.approx(d_agg, abs=1e-6)
    assert opl_terms(f, y, "none", 0.0)["d"].item() == pytest.approx(-d_agg, abs=1e-6)

    m = build("opl", 2, 2, "method.gamma=0.5", "method.lambda_=2.0")
    out = m(fb(f))
    parts = m.loss(out, fb(f, y))
    ce = F.cross_entropy(out.logits, y)
    opl_ref = (1 - s_ref) + 0.5 * d_ref
    assert parts["opl"].item() == pytest.approx(opl_ref, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(ce.item() + 2.0 * opl_ref, rel=1e-5)
    assert {"ce", "opl", "opl_s", "opl_d"} <= parts.keys()


@pytest.mark.parametrize("mode", ["per_element", "aggregate", "none"])
def test_fused_opl_gradients_match_autograd_and_finite_differences(mode):
    g = torch.Generator().manual_seed(3)
    f = torch.randn(24, 6, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 4, (24,), generator=g)
    w = torch.randn(2, dtype=torch.float64, generator=g)

    def scalar(fn, x):
        t = fn(x, y, mode)
        return w[0] * t["s"] + w[1] * t["d"]

    (g_fused,) = torch.autograd.grad(scalar(opl_terms, f), f)
    (g_ref,) = torch.autograd.grad(scalar(opl_terms_reference, f), f)
    assert torch.allclose(g_fused, g_ref, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: scalar(opl_terms, x), (f,))
    # bf16 features (autocast) come back as a bf16 gradient
    fb = f.detach().bfloat16().requires_grad_()
    scalar(opl_terms, fb).backward()
    assert fb.grad.dtype == torch.bfloat16 and torch.isfinite(fb.grad.float()).all()


def test_opl_edge_cases_have_no_nan():
    f = torch.randn(5, 3, requires_grad=True)
    same = opl_terms(f, torch.zeros(5, dtype=torch.long))
    assert same["d"].item() == 0.0 and torch.isfinite(same["s"])
    diff = opl_terms(f, torch.arange(5))
    assert diff["s"].item() == 0.0 and torch.isfinite(diff["d"])
    (same["s"] + diff["d"]).backward()
    assert torch.isfinite(f.grad).all()
    one = opl_terms(torch.randn(1, 3), torch.zeros(1, dtype=torch.long))
    assert one["s"].item() == 0.0 and one["d"].item() == 0.0


def test_abs_modes_agree_for_nonnegative_features():
    f, y = torch.rand(12, 5), torch.randint(0, 3, (12,))
    a = opl_terms(f, y, "per_element")["d"]
    assert torch.allclose(a, opl_terms(f, y, "aggregate")["d"])
    assert torch.allclose(a, opl_terms(f, y, "none")["d"])


# ---------------------------------------------------------------------------- GCR
def _orth_err(s):
    k = s.shape[-1]
    return torch.linalg.matrix_norm(s.transpose(-1, -2) @ s - torch.eye(k)).max().item()


@pytest.mark.parametrize("retraction,reorth,tol", [
    ("geodesic", 5, 1e-4), ("qr", 5, 1e-4), ("qr", 0, 1e-4),
    ("geodesic", 0, 1e-3),  # fp32 drift of the bare geodesic: why reorth_every exists
])
def test_gcr_bases_stay_orthonormal_after_200_steps(retraction, reorth, tol):
    torch.manual_seed(0)
    m = build("gcr", 16, 5, "method.k=3", f"method.retraction={retraction}",
              f"method.reorth_every={reorth}")
    group, = m.param_groups()  # its own optimiser, no weight decay: not the configured one
    assert (group.role, group.optimizer, group.weight_decay) == ("method", "grassmann_sgd", 0.0)
    opt, = build_optimizers([group], compose().optim, torch.device("cpu"))
    x, y = torch.randn(64, 16), torch.randint(0, 5, (64,))
    first = None
    for step in range(200):
        parts = m.loss(m(fb(x)), fb(x, y))
        first = first if first is not None else parts["loss"].item()
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
    assert _orth_err(m.bases.detach()) < tol
    assert parts["loss"].item() < 0.5 * first  # and it learns


def test_gcr_k1_equals_scaled_abs_cosine():
    m = build("gcr", 6, 4, "method.k=1", "method.scale=25")
    x = torch.randn(7, 6)
    w = m.bases.detach()[:, :, 0]
    ref = 25 * (F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()).abs()
    assert torch.allclose(m(fb(x)).logits, ref, atol=1e-5)


def test_geodesic_step_matches_svd_formula_and_stays_on_manifold():
    torch.manual_seed(1)
    s = torch.linalg.qr(torch.randn(3, 10, 4, dtype=torch.float64))[0]
    m = torch.randn(3, 10, 4, dtype=torch.float64)
    g = m - s @ (s.transpose(-1, -2) @ m)
    lr = 0.3
    g = g * 4  # angles up to a few radians
    u, sig, vh = torch.linalg.svd(g, full_matrices=False)
    v = vh.transpose(-1, -2)
    ref = (s @ v * torch.cos(lr * sig)[:, None, :] - u * torch.sin(lr * sig)[:, None, :]) @ vh
    new = geodesic_step(s, g, lr)
    assert torch.allclose(new, ref, atol=1e-10)
    assert _orth_err(new.float()) < 1e-5
    # a rank-deficient direction (a zero singular value) is handled exactly
    g[:, :, 0] = 0
    assert torch.isfinite(geodesic_step(s, g, lr)).all()


def test_gcr_logits_invariant_to_basis_rotation():
    m = build("gcr", 8, 3, "method.k=4")
    x = torch.randn(5, 8)
    a = m(fb(x)).logits
    q = torch.linalg.qr(torch.randn(4, 4))[0]
    with torch.no_grad():
        m.bases.copy_(m.bases @ q)
    assert torch.allclose(a, m(fb(x)).logits, atol=1e-4)


# ---------------------------------------------------------------------------- EBV
def test_ebv_reaches_alpha_for_n_le_d():
    w = generate_ebv(20, 24, alpha=0.002, lr=1e-3, steps=20_000, tol=0.0, seed=0)
    assert w.shape == (20, 24) and w.dtype == torch.float32 and w.device.type == "cpu"
    assert torch.allclose(w.norm(dim=1), torch.ones(20), atol=1e-5)
    assert max_abs_cos(w) <= 0.002 + 1e-6


def test_ebv_welch_bound_is_checked_not_looped():
    assert welch_bound(100, 64) == pytest.approx(math.sqrt(36 / (64 * 99)))
    assert welch_bound(100, 64) > 0.075
    with pytest.raises(ConfigError, match="Welch bound 0.0754.*method.alpha"):
        build("ebv", 8, 100, "method.dim=64")
    m = build("ebv", 8, 12, "method.dim=6", "method.below_welch=use_bound",
              "method.gen_steps=3000")
    assert m.alpha == pytest.approx(welch_bound(12, 6) * 1.05)


def test_ebv_cache_returns_identical_matrix(tmp_path):
    a = cached_ebv(10, 12, 0.01, 1e-3, 5000, 0.0, 3, str(tmp_path))
    files = list((tmp_path / "ebv").glob("*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = cached_ebv(10, 12, 0.01, 1e-3, 5000, 0.0, 3, str(tmp_path))
    assert torch.equal(a, b) and files[0].stat().st_mtime_ns == mtime
    obj = torch.load(files[0], weights_only=True)
    assert obj["W"].device.type == "cpu"
    c = cached_ebv(10, 12, 0.01, 1e-3, 5000, 0.0, 4, str(tmp_path))
    assert not torch.equal(a, c)


def test_ebv_basis_is_a_buffer_and_logits_are_cos_over_tau(tmp_path):
    m = build("ebv", 5, 4, cache_dir=str(tmp_path))
    assert "basis" not in dict(m.named_parameters()) and "basis" in dict(m.named_buffers())
    x = torch.randn(3, 5)
    h = m.proj(x)
    ref = F.normalize(h, dim=1) @ m.basis.t() / 0.07
    assert torch.allclose(m(fb(x)).logits, ref, atol=1e-5)


# ---------------------------------------------------------------------------- ce / cosine
def test_cosine_logits_are_scaled_cosines():
    m = build("cosine", 5, 3, "method.scale=10")
    x = torch.randn(4, 5)
    ref = 10 * F.normalize(x, dim=1) @ F.normalize(m.weight, dim=1).t()
    assert torch.allclose(m(fb(x)).logits, ref, atol=1e-5)
    assert (m(fb(x)).logits.abs() <= 10 + 1e-5).all()


def test_registry_has_every_method_and_schema_names_match():
    assert {"ce", "cosine", "opl", "gcr", "ebv"} <= set(METHODS.names())
