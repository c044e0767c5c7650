"""The throughput benchmark runs end to end on a CPU (its GPU figures are on the issue)."""

import json

import pytest


@pytest.mark.parametrize("args,said", [
    (["--steps", "0"], "argument --steps: 0 must be >= 1"),
    (["--rounds", "0"], "argument --rounds: 0 must be >= 1"),
    (["--batch", "-1"], "argument --batch: -1 must be >= 1"),
    (["--warmup", "x"], "argument --warmup: 'x' is not an integer"),
    (["--optims", "sgd,muonn"], "--optims: muonn is not an option"),
    (["--methods", "ce,nope"], "--methods: nope is not an option"),
    (["--regularizers", "srp"], "--regularizers: srp is not an option"),
    # a config the runs would refuse is refused as a run refuses it, naming the key
    (["trainer.precision=fp8"], "expected one of [auto, bf16, fp32] (full_key: trainer.precision)"),
    (["optim.lr=-1"], "optim.lr=-1.0 is out of range: it must be > 0"),
    (["--calls", "optim.lr=-1"], "optim.lr=-1.0 is out of range: it must be > 0"),
    (["model=nosuch"], "Could not find 'model/nosuch'"),
    (["data.nme=3"], "Key 'nme' not in 'DigitsConfig' (full_key: data.nme)"),
    (["--json", "{tmp}"], "--json {tmp}: cannot write the results there (a folder)"),
    (["--json", "{tmp}/file/out.json"], "({tmp}/file is a file)"),
])
def test_bench_refuses_bad_arguments_before_any_work(args, said, capsys, tmp_path, monkeypatch):
    import ortho_run.runner.run as runner
    from ortho_run.bench import main

    def no_work(*a, **k):
        raise AssertionError("a job was built before the arguments were checked")

    monkeypatch.setattr(runner, "build_job", no_work)
    monkeypatch.setattr("ortho_run.assemble.build_net", no_work)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--tiny", *(a.format(tmp=tmp_path) for a in args)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and said.format(tmp=tmp_path) in err and "Traceback" not in err, err


@pytest.mark.slow
def test_bench_tiny_measures_all_four_quantities(tmp_path, capsys):
    from ortho_run.bench import main

    out = tmp_path / "bench.json"
    res = main(["--tiny", "--rounds", "1", "--methods", "ce,opl,gcr,ebv", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["ratios"] == res["ratios"]
    for key in ("ceiling", "runner", "standard"):
        assert saved[key]["img_per_s"] > 0
    r = saved["ratios"]
    assert r["runner_over_ceiling"] == saved["runner"]["img_per_s"] / saved["ceiling"]["img_per_s"]
    assert r["runner_over_standard"] > 0
    assert saved["methods"]["ce"]["step_time_vs_ce"] == 1.0
    assert {"opl", "gcr", "ebv"} <= saved["methods"].keys()
    assert saved["standard"]["pipeline"] == "loader" and saved["runner"]["pipeline"] == "resident"
    assert saved["optims"]["sgd"]["step_time_vs_sgd"] == 1.0
    assert {"muon", "normuon", "root", "auon", "auon_hybrid"} <= saved["optims"].keys()
    assert saved["regularizers"]["none"]["step_time_vs_none"] == 1.0
    assert "skipped" in saved["regularizers"]["orthogonal"]  # small_cnn has no linear layer
    printed = capsys.readouterr().out
    assert "(2)/(1)" in printed and "(2)/(3)" in printed and "vs ce" in printed
    # host work per step is counted; a method's head and loss add calls on top of ce's
    calls = {m: v["launches_per_step"] for m, v in saved["methods"].items()}
    assert all(calls[m] > calls["ce"] for m in ("opl", "gcr")), calls


def test_grassmann_step_is_a_few_fused_kernels():
    """The GCR step is launch-bound on a GPU: keep it to ~25 host calls (it was 57 before the
    baddbmm fusion), with the same result as the unfused formula."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ortho_run.bench import top_level_aten_calls
    from ortho_run.optim.grassmann import GrassmannSGD

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.linalg.qr(torch.randn(6, 20, 4))[0])
    opt = GrassmannSGD([p], lr=0.1, reorth_every=0)
    p.grad = torch.randn_like(p)
    s0, m = p.detach().clone(), p.grad.clone()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    calls = [c for c in top_level_aten_calls(prof.events()) if "eye" not in c]
    assert len(calls) <= 26, calls
    # unfused reference: tangent projection, then the geodesic through the SVD of G
    g = m - s0 @ (s0.transpose(-1, -2) @ m)
    u, sig, vh = torch.linalg.svd(g.double(), full_matrices=False)
    ref = (s0.double() @ vh.transpose(-1, -2) * torch.cos(0.1 * sig)[:, None, :]
           - u * torch.sin(0.1 * sig)[:, None, :]) @ vh
    assert torch.allclose(p.detach().double(), ref, atol=1e-5)


@pytest.mark.slow
def test_bench_runs_with_a_timm_backbone(tmp_path):
    import pytest

    pytest.importorskip("timm")
    from ortho_run.bench import main

    res = main(["--tiny", "--rounds", "1", "--model", "timm", "--methods", "ce", "--optims",
                "sgd", "--regularizers", "none", "--no-count", "--skip-loader",
                "model.arch=resnet18"])
    assert res["args"]["model"] == "timm" and res["runner"]["img_per_s"] > 0
    assert res["ratios"]["runner_over_ceiling"] > 0
