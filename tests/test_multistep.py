"""BT² (against its official forward and loss, re-typed) and the multi-step update protocol:
step class sets, the T×T matrices, AC/AM, the per-(step, method) model cache."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import compose, run_inprocess
from ortho_run.methods.base import CompatArtifacts, CompatShape
from ortho_run.errors import ConfigError
from ortho_run.methods import METHODS, Batch, MethodContext
from ortho_run.orthogonality import gram_error
from ortho_run.retrieval import multistep_scores
from ortho_run.store import load_option
from test_compat import brute_force


def make(name, feature_dim, n=5, d_old=6, tmp=None, **over):
    """A method built on a placeholder old model of ``d_old`` dims (random unit class means)."""
    cfg = OmegaConf.merge(load_option("method", name), over)
    art = CompatArtifacts.placeholder(CompatShape(old_dim=d_old, num_old_classes=3,
                                                  old_head_bias=True), n)
    g = torch.Generator().manual_seed(0)
    art.class_means = torch.randn(n, d_old, generator=g)
    art.unit_class_means = F.normalize(art.class_means, dim=1) * 0.7
    torch.manual_seed(0)
    ctx = MethodContext(feature_dim=feature_dim, num_classes=n, artifacts=art,
                        cache_dir=str(tmp or "/nonexistent"))
    return METHODS.get(name)(cfg, ctx)


def official_bt2(m, h, phi_old, phi_new, y):
    """``ResNet_ortho.forward`` and ``TransferTrainer.train`` of YifeiZhou02/BT-2, re-typed on
    the method's own parameters (norm_feature=True, C=2, lambda_1/2/3 = 1/10/5)."""
    d, d_old, k = m.d, m.d_old, m.k
    old_feature = F.linear(F.relu(h), m.fc3.weight, m.fc3.bias)  # fc3: a 1×1 conv with bias
    feature = h[:, :d]
    old_feature, feature = F.normalize(old_feature), F.normalize(feature)
    new_feature = torch.cat([F.normalize(old_feature[:, :k]),
                             F.linear(2 * feature, m.o_p.weight)], dim=1)
    bct_feature = F.linear(new_feature[:, :d_old], m.o_2.weight)
    to_add = new_feature[:, -(d + k - d_old):]
    embedding = torch.cat([bct_feature, to_add], dim=1)
    output = F.linear(feature, m.fc.weight)
    b, f = F.normalize(bct_feature, dim=1), F.normalize(feature, dim=1)
    cosine = 5 * (1 - (phi_old * b).sum(1).mean()) + 1 * (1 - (phi_new * f).sum(1).mean())
    loss = F.cross_entropy(output, y) + 10 * F.cross_entropy(b @ m.pseudo.t(), y) + cosine
    return embedding, output, loss


@pytest.mark.parametrize("d,d_old,k", [(6, 6, 2), (5, 4, 3), (3, 4, 2)])
def test_bt2_matches_the_official_forward_and_loss(d, d_old, k):
    m = make("bt2", d + d_old, d_old=d_old, extra_dims=k)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(7, d + d_old, generator=g)
    y = torch.randint(0, 5, (7,), generator=g)
    old = F.normalize(torch.randn(7, d_old, generator=g), dim=1)
    new = F.normalize(torch.randn(7, d, generator=g), dim=1)
    batch = Batch(h, targets=y, features=h, old=old, independent=new)
    out = m(batch)
    parts = m.loss(out, batch)
    emb, logits, loss = official_bt2(m, h, old, new, y)
    assert out.embedding.shape[1] == m.embedding_dim() == d + k
    assert torch.allclose(out.embedding, emb, atol=1e-6)
    assert torch.allclose(out.logits, logits, atol=1e-6)
    assert parts["loss"].item() == pytest.approx(loss.item(), rel=1e-6)


def test_bt2_basis_transformation_stays_orthonormal_while_training():
    m = make("bt2", 16, d_old=8, extra_dims=4)
    start = (m.o_p.weight.detach().clone(), m.o_2.weight.detach().clone())
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    for _ in range(60):
        h = torch.randn(32, 16, generator=g)
        batch = Batch(h, targets=torch.randint(0, 5, (32,), generator=g), features=h,
                      old=torch.randn(32, 8, generator=g), independent=torch.randn(32, 8, generator=g))
        opt.zero_grad()
        m.loss(m(batch), batch)["loss"].backward()
        opt.step()
    for w, w0 in zip((m.o_p.weight.detach(), m.o_2.weight.detach()), start):
        assert not torch.allclose(w, w0, atol=1e-3)  # it learned a rotation
        assert torch.linalg.matrix_norm(w @ w.t() - torch.eye(len(w))).item() < 1e-4
    d = m.diagnostics()
    assert d["o_p_orth_err"] < 1e-4 and d["o_2_orth_err"] < 1e-4


def test_bt2_dimensions_are_checked():
    cfg = load_option("method", "bt2")
    from ortho_run.validate import validate

    with pytest.raises(ConfigError, match="set model.embed_dim"):  # before any model trains
        validate(compose(["experiment=compat_smoke", "method=bt2", "model.embed_dim=null"]))
    validate(compose(["experiment=compat_smoke", "method=bt2"]))
    assert METHODS.get("bt2").feature_dim(cfg, 32, 16) == 48  # widened to D + D_old
    with pytest.raises(ConfigError, match="extra_dims=8 must be at most the old dim 6"):
        make("bt2", 12, d_old=6, extra_dims=8)
    with pytest.raises(ConfigError, match="the old dim at most"):
        make("bt2", 4 + 10, d_old=10, extra_dims=2)  # D + k = 6 < D_old
    # a later step of a multi-step update: D_old = D + k, b spans z and nothing is added
    m = make("bt2", 6 + 8, d_old=8, extra_dims=2)
    h = torch.randn(3, 14)
    assert m(Batch(h, features=h)).embedding.shape[1] == m.embedding_dim() == 8


@pytest.mark.parametrize("name", METHODS.names())
def test_embedding_dim_is_the_dim_of_the_new_embedding(name, tmp_path):
    """What a later step reads as the old dim is the retrieval embedding's, not the backbone's."""
    over = {"ebv": {"gen_steps": 50}, "bt2": {"extra_dims": 2}}.get(name, {})
    embed = 6 if name == "bct" else 10  # bct scores new features with the old head: equal dims
    feature_dim = METHODS.get(name).feature_dim(load_option("method", name), 6, embed) or embed
    m = make(name, feature_dim, tmp=tmp_path, **over)
    h = torch.randn(4, feature_dim)
    batch = Batch(h, targets=torch.arange(4), features=h, old=torch.randn(4, 6),
                  independent=torch.randn(4, 10))
    emb = m.embeddings(m(batch), batch)["new"]
    assert emb.shape[1] == m.embedding_dim(), name


# ------------------------------------------------------------------ the step class sets
def steps_cfg(steps, classes=None):
    return compose(["experiment=compat_multistep_smoke", f"compat.steps={steps}",
                    f"data.classes={classes if classes is not None else 'null'}"])


def test_step_class_sets_and_fractions_are_resolved_and_checked():
    from ortho_run.compat.provider import Step, resolve_steps

    got = resolve_steps(steps_cfg("[first_quarter,first_half,first_three_quarters,all]"), 100)
    assert [len(s.classes) for s in got] == [25, 50, 75, 100] and got[1].classes == list(range(50))
    assert {s.fraction for s in got} == {1.0}
    assert [len(s.classes) for s in resolve_steps(
        steps_cfg("[first_third,first_two_thirds,all]"), 9)] == [3, 6, 9]
    assert resolve_steps(steps_cfg("[[0,1],first_4,[0,1,2,3,4,5]]", "first_6"), 10)[1] \
        == Step([0, 1, 2, 3], 1.0)
    assert resolve_steps(compose(["experiment=compat_smoke"]), 10) is None
    # data-incremental: the same classes, a growing share of their training images
    everything = list(range(10))
    assert resolve_steps(steps_cfg("[0.25,0.5,1.0]"), 10) == [
        Step(everything, 0.25), Step(everything, 0.5), Step(everything, 1.0)]
    both = resolve_steps(steps_cfg("[{classes:first_half,fraction:0.5},first_half,all]"), 10)
    assert both == [Step(list(range(5)), 0.5), Step(list(range(5)), 1.0), Step(everything, 1.0)]
    for steps, classes, match in [
            ("[all]", None, "at least two"),
            ("[first_half,first_quarter,all]", None, "must contain step 0"),
            ("[second_half,all]", None, "first ids"),
            ("[first_quarter,first_half]", None, "must be this run's own data"),
            ("[first_half,all]", "first_half", "must be this run's own data"),
            ("[first_fifth,all]", None, "first_quarter, first_third"),
            ("[first_50,all]", None, "only 10 classes"),
            ("[0.5,0.25,1.0]", None, "at least its fraction"),
            ("[1.0,all]", None, "add classes after them or data"),
            ("[1.5,1.0]", None, r"fraction 1.5 must be in \(0, 1\]"),
            ("[{classes:first_half,share:0.5},all]", None, "unknown keys"),
            ("[true,all]", None, "a class set, a fraction")]:
        with pytest.raises(ConfigError, match=match):
            resolve_steps(steps_cfg(steps, classes), 10)


def test_train_fraction_keeps_nested_per_class_subsets():
    from ortho_run.datasets.base import class_fraction

    y = torch.arange(4).repeat_interleave(torch.tensor([10, 20, 7, 1]))
    half = class_fraction(y, [0, 1, 2, 3], 0.5, seed=0)
    assert torch.bincount(y[half], minlength=4).tolist() == [5, 10, 4, 1]  # at least one
    quarter = class_fraction(y, [0, 1, 2, 3], 0.25, seed=0)
    assert set(quarter.tolist()) <= set(half.tolist())
    # a class keeps the same images when other classes come or go (seeded by its own id)
    only_01 = class_fraction(y[y < 2], [0, 1], 0.5, seed=0)
    assert only_01.tolist() == [i for i in half.tolist() if y[i] < 2]
    assert class_fraction(y, [0, 1, 2, 3], 0.5, seed=1).tolist() != half.tolist()
    cfg = compose(["data.train_fraction=0.5"])
    from ortho_run.datasets import load_dataset

    full, part = load_dataset(compose([]).data), load_dataset(cfg.data)
    assert len(part.train) == pytest.approx(len(full.train) / 2, abs=10)
    assert len(part.test) == len(full.test)


# ------------------------------------------------------------------ AC / AM and the matrix
def iamcl2r_ac_am(c):
    """miccunifi/iamcl2r ``compatibility_metrics.py`` re-typed: AC from the positions where a
    later model does not beat the diagonal, AM as the nan-mean of the lower triangle."""
    import numpy as np

    m = np.array(c, dtype=float)
    t = m.shape[0]
    position = np.zeros_like(m, dtype=bool)
    for j in range(t):
        for i in range(j + 1, t):
            if m[i][j] <= m[j][j]:
                position[i, j] = True
    max_ac = max(t * (t - 1) / 2, 1)
    lower = np.where(np.tril(np.ones_like(m)) > 0, m, np.nan)
    return (max_ac - position.sum()) / max_ac, float(np.nanmean(lower))


@pytest.mark.parametrize("seed", range(6))
def test_ac_am_follow_the_protocol_code_ties_included(seed):
    g = torch.Generator().manual_seed(seed)
    t = 1 + seed % 4
    c = torch.tril(torch.randint(1, 6, (t, t), generator=g).double() / 5)  # many ties
    s = multistep_scores(c)
    ac, am = iamcl2r_ac_am(c.tolist())
    assert s["ac"] == pytest.approx(ac) and s["am"] == pytest.approx(am)
    if t == 1:
        assert s["ac"] == 1.0


def test_ac_am_hand_example_with_a_tie():
    c = torch.tensor([[0.5, 0, 0], [0.5, 0.7, 0], [0.6, 0.8, 0.9]])
    s = multistep_scores(c)  # C[1,0] = C[0,0]: a tie, not compatible; the other two are
    assert s["ac"] == pytest.approx(2 / 3)
    assert s["am"] == pytest.approx((0.5 + 0.5 + 0.7 + 0.6 + 0.8 + 0.9) / 6)


def test_multistep_matrix_equals_a_direct_computation_of_each_pair():
    from ortho_run.compat.evaluate import multistep_matrix

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (40,), generator=g)
    embs = [torch.randn(40, d, generator=g) + labels[:, None].float() for d in (4, 6, 6)]
    out = multistep_matrix(embs, labels, [2, 3, 4])
    for i in range(3):
        for k in range(3):
            if k > i:
                assert out["compat/steps/cmc1"][i][k] is None
                continue
            d = min(embs[i].shape[1], embs[k].shape[1])  # truncated to the smaller dim
            ref = brute_force(embs[i][:, :d], embs[k][:, :d], labels)
            assert out["compat/steps/cmc1"][i][k] == pytest.approx(ref["cmc1"], abs=1e-9)
            assert out["compat/steps/map"][i][k] == pytest.approx(ref["map"], abs=1e-9)
    dense = torch.tensor([[v or 0.0 for v in row] for row in out["compat/steps/cmc1"]])
    assert out["compat/ac"] == multistep_scores(dense)["ac"]
    assert out["compat/steps/classes"] == [2, 3, 4]


# ------------------------------------------------------------------ the chain, end to end
@pytest.fixture(scope="module")
def chain_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multistep")
    ov = ["experiment=compat_multistep_smoke", "compat.steps=[first_quarter,first_half,all]",
          "trainer.max_epochs=2", f"cache_dir={root}/cache"]
    runs, shas = {}, {}
    for m in ("bct", "bt2", "oca"):
        runs[m] = run_inprocess(root, [*ov, f"method={m}"], name=m)
        shas[m] = {d.name: hashlib.sha256((d / "checkpoints" / "last.pt").read_bytes()).hexdigest()
                   for d in (root / "cache" / "models").iterdir() if d.is_dir()}
    return root, ov, runs, shas


def _cached(root):
    out = {}
    for d in (root / "cache" / "models").iterdir():
        if d.is_dir():
            s = json.loads((d / "summary.json").read_text())
            out[d.name] = (s["tag"], s["method"], json.loads(json.dumps(
                OmegaConf.to_container(OmegaConf.load(d / "resolved_config.yaml"))["data"]["classes"])))
    return out


@pytest.mark.slow
def test_one_cached_model_per_step_and_method_across_a_sweep(chain_runs):
    root, _, runs, shas = chain_runs
    cached = _cached(root)
    kinds = sorted((tag, method, len(classes or range(10))) for tag, method, classes in cached.values())
    assert kinds == [("independent-model", "ce", 5), ("independent-model", "ce", 10),
                     ("old-model", "ce", 2),
                     ("step-1-model", "bct", 5), ("step-1-model", "bt2", 5),
                     ("step-1-model", "oca", 5)]
    # models cached by an earlier run of the sweep were reused, never rewritten
    for before, after in ((shas["bct"], shas["bt2"]), (shas["bt2"], shas["oca"])):
        assert all(after[k] == v for k, v in before.items())
    for s in runs.values():
        assert s["compat/steps/classes"] == [2, 5, 10]
        c = s["compat/steps/cmc1"]
        assert [len([v for v in row if v is not None]) for row in c] == [1, 2, 3]
        # the one-step keys are the last update (step 2 against step 1)
        assert s["compat/new_old/cmc1"] == c[2][1] and s["compat/old_old/cmc1"] == c[1][1]
        assert s["compat/new_new/cmc1"] == c[2][2]
    # every chain starts from the same step-0 model
    assert len({s["compat/steps/cmc1"][0][0] for s in runs.values()}) == 1


@pytest.mark.slow
def test_the_matrix_is_each_step_model_against_each_earlier_gallery(chain_runs):
    """Recompute every entry from the cached step models and the run's own checkpoint."""
    from ortho_run.assemble import load_run
    from ortho_run.compat.artifacts import FrozenNet, embed_all
    from ortho_run.compat.provider import load_model, plan_compat
    from ortho_run.runner.run import build_job

    root, ov, runs, _ = chain_runs
    cfg = compose(["logger.mode=disabled", "trainer.progress=off", *ov, "method=bt2"])
    job = build_job(cfg, root / "probe")  # every model comes from the cache: nothing trains
    test = job.evals["test"]
    chain = plan_compat(cfg, 10).chain
    nets = [load_model(src, None, "cpu")[0] for src in chain] + [load_run(root / "bt2", "cpu")[0]]
    embs = [embed_all(FrozenNet(n, None), test) for n in nets]
    labels = embs[0][1]
    for i in range(3):
        for k in range(i + 1):
            d = min(embs[i][0].shape[1], embs[k][0].shape[1])
            ref = brute_force(embs[i][0][:, :d], embs[k][0][:, :d], labels)
            # the reference ranks float64 similarities; ours are float32, where a few
            # near-equal ones tie (mAP counts a tie as one threshold)
            assert runs["bt2"]["compat/steps/cmc1"][i][k] == pytest.approx(ref["cmc1"], abs=1e-3)
            assert runs["bt2"]["compat/steps/map"][i][k] == pytest.approx(ref["map"], abs=1e-4)
    # BT²'s embedding grew by k at step 1 and stayed at D_old afterwards
    assert [e[0].shape[1] for e in embs] == [32, 64, 64]


@pytest.mark.slow
def test_bt2_training_leaves_the_frozen_models_bit_identical(chain_runs):
    from ortho_run.runner.run import build_job

    root, ov, _, _ = chain_runs
    cfg = compose(["logger.mode=disabled", "trainer.progress=off", *ov, "method=bt2"])
    job = build_job(cfg, root / "probe2")
    old = job.service.old.net
    saved = {k: v.clone() for k, v in old.state_dict().items()}
    job.trainer.train_epoch(limit=5)
    assert all(torch.equal(v, saved[k]) for k, v in old.state_dict().items())  # BN stats too
    o = job.net.method
    assert gram_error(o.o_p.weight.detach()) < 1e-4 and gram_error(o.o_2.weight.detach()) < 1e-4


def test_compat_steps_with_a_method_that_trains_alone_is_ignored_with_a_warning(tmp_path, caplog):
    s = run_inprocess(tmp_path, ["experiment=compat_multistep_smoke", "method=ce",
                                 "trainer.max_epochs=1", "trainer.limit_train_batches=2"])
    assert s["status"] == "finished" and "compat/ac" not in s
    assert "compat.steps is set, but method=ce trains alone" in caplog.text


def test_wandb_summary_flattens_the_step_matrices():
    from ortho_run.runner.sinks import wandb_summary

    got = wandb_summary({"compat/steps/cmc1": [[0.5, None], [0.4, 0.6]], "compat/ac": 0.0,
                         "overrides": ["a=1"], "tag": "", "versions": {"torch": "x"}})
    assert got == {"compat/steps/cmc1/0_0": 0.5, "compat/steps/cmc1/1_0": 0.4,
                   "compat/steps/cmc1/1_1": 0.6, "compat/ac": 0.0, "tag": ""}
