"""Throughput benchmark: one process, one run, ratios measured side by side.

    python -m ortho_run.bench --model resnet18_cifar --batch 512 --data cifar10 --data-root R
    python -m ortho_run.bench --tiny          # CPU: small CNN on digits (what CI exercises)
    python -m ortho_run.bench --calls         # CPU: ATen calls per optimiser step / penalty

Measures, on the same model, batch and precision:
  (1) ceiling  — fwd+bwd+step on synthetic tensors already on the device (no data path);
  (2) runner   — the runner's own training loop (Trainer, device-resident pipeline);
  (3) standard — the same loop fed by a torch DataLoader with PIL/torchvision transforms;
  and (2) for each method, as step time relative to ``ce``; with ``--optims`` /
  ``--regularizers`` each optimiser's step time relative to SGD (``timm_muon``: timm's Muon on
  our Muon's parameters, the maintained peer) and each regulariser's relative to none.
Prints img/s and the ratios (2)/(1), (2)/(3), method/ce, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import OmegaConf


def _compose(args, method: str, pipeline: str, extra=()):
    ov = ["logger.mode=disabled", "trainer.progress=off", f"model={args.model}",
          f"data={args.data}", f"data.batch_size={args.batch}", f"data.pipeline={pipeline}",
          f"data.num_workers={args.workers}", f"method={method}", "trainer.max_epochs=100",
          f"trainer.precision={args.precision}", f"trainer.device={args.device}",
          f"trainer.compile={str(args.compile).lower()}",
          f"trainer.compile_mode={args.compile_mode}", "data.augment=crop_flip"]
    if args.data == "synthetic":
        ov += [f"data.num_classes={args.num_classes}", f"data.image_size={args.image_size}",
               f"data.train_per_class={args.train_per_class}", "data.test_per_class=2"]
    if args.data_root:
        ov.append(f"data.root={args.data_root}")
    if method == "ebv":
        ov.append("method.gen_steps=20000")
    ov += args.override + list(extra)
    return checked_config(ov)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, method: str, pipeline: str, tmp: Path, extra=()):
    from ortho_run.runner.run import build_job

    name = "_".join([method, pipeline, *(e.replace("=", "-") for e in extra)])
    job = build_job(_compose(args, method, pipeline, extra), tmp / name)
    job.trainer.train_epoch(limit=args.warmup)  # warm-up: cuDNN autotuning, compilation
    return job


def timed_epoch(args, job, epoch: int, profile: bool = False) -> dict:
    """img/s of the real Trainer loop over one epoch of --steps batches."""
    tr = job.trainer
    if profile and job.device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile as prof_ctx

        with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            tr.train_epoch(limit=args.steps)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                        max_name_column_width=60))
    row = tr.train_epoch(limit=args.steps)
    return {"img_per_s": row["time/train_img_per_s"],
            "step_ms": 1000 * args.batch / row["time/train_img_per_s"],
            "pipeline": job.pipeline, "device": str(job.device)}


VIEW_OPS = {"aten::view", "aten::t", "aten::transpose", "aten::as_strided", "aten::expand",
            "aten::expand_as", "aten::empty", "aten::empty_strided", "aten::empty_like",
            "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::permute",
            "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::slice", "aten::select",
            "aten::alias", "aten::lift_fresh", "aten::result_type", "aten::to",
            "aten::_to_copy", "aten::resolve_conj", "aten::resolve_neg", "aten::mT",
            "aten::mH", "aten::diagonal", "aten::unbind", "aten::narrow", "aten::split",
            "aten::chunk", "aten::unflatten", "aten::flatten", "aten::view_as"}


def top_level_aten_calls(events) -> list:
    """Names of the profiled top-level ATen calls that do work (views and allocations left out):
    what the host issues on a CPU, one per kernel launch or more on a GPU."""
    return [e.name for e in events if e.name.startswith("aten::") and e.name not in VIEW_OPS
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool = True):
    """Silence what the profiler's C++ side prints to fd 2 on a machine without a GPU
    (``gpuGetDeviceCount failed``, ``USDT ... profiler_start``) around the benchmark's table."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def count_launches(args, job, steps: int = 4) -> float:
    """Work items the host issues per training step: CUDA kernel launches on a GPU, top-level
    non-view ATen calls on a CPU. The loop is launch-bound, so this is what a method adds."""
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    tr = job.trainer
    cuda = job.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with quiet_native_stderr(enabled=not cuda), prof_ctx(activities=acts) as prof:
        tr.train_epoch(limit=steps)
    events = prof.events()
    if cuda:
        n = sum(1 for e in events if "LaunchKernel" in e.name or e.name == "cudaGraphLaunch")
    else:
        n = len(top_level_aten_calls(events))
    return n / steps


def interleaved(args, jobs: dict, profile: bool = False) -> dict:
    """The median of ``args.rounds`` timed epochs per job, the jobs taking turns in each round
    (so a drifting clock hits every job alike)."""
    rounds = {n: [] for n in jobs}
    for r in range(args.rounds):
        for n, job in jobs.items():
            rounds[n].append(timed_epoch(args, job, 1 + r, profile=profile and r == 0))
    return {n: _median(rs) for n, rs in rounds.items()}


def _median(rows):
    rows = sorted(rows, key=lambda r: r["step_ms"])
    out = dict(rows[len(rows) // 2])
    out["all_step_ms"] = [r["step_ms"] for r in rows]
    return out


def measure_ceiling(args, job):
    """The trainer's step (fwd+bwd+optimisers) on one synthetic batch resident on the device."""
    tr, dev = job.trainer, job.device
    ds = job.ds
    x = torch.randn(args.batch, ds.channels, ds.image_size, ds.image_size, device=dev)
    if dev.type == "cuda" and tr.tcfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, ds.num_classes, (args.batch,), device=dev)
    tr.net.train()

    def step():
        tr.step(x, y)  # the trainer's own step, without a data path

    for _ in range(args.warmup):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(dev)
    dt = time.perf_counter() - t0
    return {"img_per_s": args.steps * args.batch / dt, "step_ms": 1000 * dt / args.steps}


def step_calls(model: str = "resnet18_cifar", embed_dim: Optional[int] = 128,
               optims: Optional[List[str]] = None, regularizers: Optional[List[str]] = None,
               overrides: Sequence[str] = ()) -> dict:
    """Top-level ATen calls (``top_level_aten_calls``) of one step of each optimiser plugin's
    main optimiser (the orthogonalised one, or SGD/AdamW for every parameter), its state already
    built, and of one penalty of each regulariser that adds one, for ``model`` on the CPU: what
    the host issues per step, which does not depend on the machine. Newton–Schulz runs in fp32
    here (the count is the same in bf16, which a CPU computes far more slowly). Also the number
    of matrices and of distinct matrix shapes the orthogonalised step sees."""
    from ortho_run.assemble import NetSpec, build_net
    from ortho_run.optim import OPTIMIZERS, build_optimizers
    from ortho_run.regularizers import REGULARIZERS, build_regularizer

    optims = list(optims) if optims is not None else OPTIMIZERS.names()
    regularizers = list(regularizers) if regularizers is not None else REGULARIZERS.names()
    cpu = torch.device("cpu")
    spec = NetSpec(channels=3, image_size=32, num_classes=10, embed_dim=embed_dim)
    base = [f"model={model}", "logger.mode=disabled", *overrides]
    if embed_dim:
        base.append(f"model.embed_dim={embed_dim}")

    def calls(fn) -> int:
        fn()  # state, caches
        with quiet_native_stderr(), profile_cpu() as prof:
            fn()
        return len(top_level_aten_calls(prof.events()))

    out: Dict[str, dict] = {"model": model, "optims": {}, "regularizers": {}}
    for name in optims:
        cfg = checked_config(base + [f"optim={name}"])
        if "ns_dtype" in cfg.optim:
            cfg.optim.ns_dtype = "fp32"
        net = build_net(cfg, spec, cpu)
        opt = build_optimizers(net.backbone.param_groups() + net.method.param_groups(),
                               OmegaConf.to_object(cfg.optim), cpu)[0]
        gen = torch.Generator().manual_seed(0)
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        params = [p for g in opt.param_groups for p in g["params"]]
        out["optims"][name] = {"calls": calls(opt.step), "params": len(params),
                               "shapes": len({tuple(p.shape) for p in params})}
    for name in regularizers:
        cfg = checked_config(base + [f"regularizer={name}"])
        net = build_net(cfg, spec, cpu)
        reg = build_regularizer(cfg.regularizer, net.backbone)
        if reg.adds_loss:
            out["regularizers"][name] = {"calls": calls(reg.penalty), "layers": len(reg.names)}
    return out


def profile_cpu():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


def compose_config(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir

    from ortho_run.store import config_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def checked_config(overrides: Sequence[str]):
    """The composed config, through the run's own pre-flight: a bad value is refused as a run
    refuses it, before anything is timed."""
    from ortho_run.validate import validate

    return validate(compose_config(overrides))


def print_step_calls(res: dict) -> None:
    print(f"ATen calls per step on the CPU ({res['model']}):")
    for name, r in res["optims"].items():
        print(f"    optim {name:12s} {r['calls']:5d} calls/step   ({r['params']} parameters "
              f"in {r['shapes']} shapes)")
    for name, r in res["regularizers"].items():
        print(f"    regularizer {name:9s} {r['calls']:5d} calls/penalty   ({r['layers']} layers)")


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} must be >= {low}")
        return v
    return parse


def _check_names(p: argparse.ArgumentParser, args) -> None:
    """Every name of --methods, --optims and --regularizers is an option of its group."""
    from ortho_run.methods import METHODS
    from ortho_run.optim import OPTIMIZERS
    from ortho_run.regularizers import REGULARIZERS

    for flag, given, known in (("--methods", args.methods, METHODS.names()),
                               ("--optims", args.optims, [*OPTIMIZERS.names(), *PEERS]),
                               ("--regularizers", args.regularizers, REGULARIZERS.names())):
        unknown = [n for n in str(given or "").split(",") if n and n not in known]
        if unknown:
            p.error(f"{flag}: {', '.join(unknown)} is not an option; use some of "
                    f"{', '.join(known)}")


def main(argv=None):
    from ortho_run.errors import stops_with

    with stops_with("stopped: the measurement is incomplete, and no result was written"):
        return _main(argv)


def _main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ortho_run.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="any model option, e.g. resnet18_cifar (default; small_cnn with --tiny) "
                        "or timm with the override model.arch=NAME")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch", type=_at_least(1), default=512)
    p.add_argument("--steps", type=_at_least(1), default=50)
    p.add_argument("--warmup", type=_at_least(0), default=15)
    p.add_argument("--workers", type=_at_least(0), default=8)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default",
                   help="with --compile: default|reduce_overhead (CUDA graphs)|max_autotune|"
                        "max_autotune_no_cudagraphs")
    p.add_argument("--methods", default=None,
                   help="methods to time against ce (default: every method that trains alone)")
    p.add_argument("--optims", default="",
                   help="optimisers to time against sgd on method ce, e.g. sgd,muon,normuon,"
                        "root,auon,auon_hybrid,timm_muon (timm's Muon on our Muon's parameters; "
                        "the tiny mode times them all)")
    p.add_argument("--regularizers", default="",
                   help="regularisers to time against none on method ce, e.g. "
                        "none,soft_orth,srip,conv_orth,orthogonal (the tiny mode times them all)")
    p.add_argument("--num-classes", type=_at_least(2), default=10)
    p.add_argument("--image-size", type=_at_least(4), default=32)
    p.add_argument("--train-per-class", type=_at_least(1), default=5000)
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--profile", action="store_true", help="print a CUDA kernel table per method")
    p.add_argument("--no-count", action="store_true",
                   help="skip counting kernel launches (GPU) / ATen calls (CPU) per step")
    p.add_argument("--rounds", type=_at_least(1), default=5, help="interleaved timing rounds (median)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: small_cnn on digits")
    p.add_argument("--calls", action="store_true",
                   help="only count the ATen calls of one optimiser step and one regulariser "
                        "penalty on the CPU (--calls-model, default resnet18_cifar with a "
                        "128-d embedding: 20 hidden matrices in 11 shapes)")
    p.add_argument("--calls-model", default="resnet18_cifar")
    p.add_argument("override", nargs="*", help="extra Hydra overrides")
    args = p.parse_args(argv)
    if args.json:
        from ortho_run.io import unwritable

        out = Path(args.json)
        why = "a folder" if out.is_dir() else unwritable(out.parent)
        if why:
            p.error(f"--json {out}: cannot write the results there ({why}): give a file path in "
                    f"a folder you can write to")
    from hydra.errors import HydraException

    from ortho_run.errors import OrthoRunError, refusal

    try:
        res = _run(p, args)
    except (OrthoRunError, HydraException) as exc:  # the config, data or device asked for
        print(f"error: {refusal(exc)}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        from ortho_run.io import atomic_write_json

        atomic_write_json(res, args.json)
    return res


def _run(p: argparse.ArgumentParser, args) -> dict:
    if args.calls:
        res = step_calls(args.calls_model, overrides=args.override)
        print_step_calls(res)
        return res
    if args.tiny:
        args.model, args.data, args.batch = args.model or "small_cnn", "digits", 64
        args.steps, args.warmup, args.workers = min(args.steps, 8), min(args.warmup, 2), 0
        args.rounds = min(args.rounds, 2)
        from ortho_run.optim import OPTIMIZERS
        from ortho_run.regularizers import REGULARIZERS

        args.optims = args.optims or ",".join(["sgd", *OPTIMIZERS.names(), *PEERS])
        args.regularizers = args.regularizers or ",".join(["none", *REGULARIZERS.names()])

    args.model = args.model or "resnet18_cifar"
    if args.methods is None:
        from ortho_run.store import compatibility_methods

        args.methods = ",".join(compatibility_methods(compat=False))
    _check_names(p, args)
    res = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        methods = [m for m in args.methods.split(",") if m]
        if "ce" not in methods:
            methods.insert(0, "ce")
        jobs = {m: build(args, m, "resident", tmp) for m in methods}
        from ortho_run.runner.env import device_name

        res["device"] = device_name(jobs["ce"].device)
        res["ceiling"] = measure_ceiling(args, jobs["ce"])
        res["methods"] = interleaved(args, jobs, profile=args.profile)
        if not args.no_count:
            for m in methods:
                res["methods"][m]["launches_per_step"] = count_launches(args, jobs[m])
        res["runner"] = res["methods"]["ce"]
        del jobs
        res["optims"] = _variants(args, tmp, "optim", args.optims, "sgd")
        res["regularizers"] = _variants(args, tmp, "regularizer", args.regularizers, "none")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not args.skip_loader:
            job = build(args, "ce", "loader", tmp)
            res["standard"] = timed_epoch(args, job, 1)
    ce_ms = res["methods"]["ce"]["step_ms"]
    res["ratios"] = {"runner_over_ceiling": res["runner"]["img_per_s"] / res["ceiling"]["img_per_s"]}
    if "standard" in res:
        res["ratios"]["runner_over_standard"] = res["runner"]["img_per_s"] / res["standard"]["img_per_s"]
    for m, r in res["methods"].items():
        r["step_time_vs_ce"] = r["step_ms"] / ce_ms
    compiled = f" compile={args.compile_mode}" if args.compile else ""
    print(f"device: {res['device']}  model={args.model} batch={args.batch} "
          f"precision={args.precision} data={args.data}{compiled}")
    print(f"(1) ceiling   {res['ceiling']['img_per_s']:10.0f} img/s")
    print(f"(2) runner    {res['runner']['img_per_s']:10.0f} img/s   (2)/(1) = "
          f"{res['ratios']['runner_over_ceiling']:.3f}")
    if "standard" in res:
        print(f"(3) standard  {res['standard']['img_per_s']:10.0f} img/s   (2)/(3) = "
              f"{res['ratios']['runner_over_standard']:.2f}  ({args.workers} workers)")
    for m, r in res["methods"].items():
        launches = (f"   {r['launches_per_step']:.0f} {'launches' if 'cuda' in r['device'] else 'ATen calls'}/step"
                    if "launches_per_step" in r else "")
        print(f"    {m:8s} {r['step_ms']:8.2f} ms/step   vs ce = {r['step_time_vs_ce']:.3f}{launches}")
    for kind, base in (("optims", "sgd"), ("regularizers", "none")):
        for name, r in res[kind].items():
            if "skipped" in r:
                print(f"    {kind[:-1]} {name:12s} skipped: {r['skipped']}")
            else:
                print(f"    {kind[:-1]} {name:12s} {r['step_ms']:8.2f} ms/step   vs {base} = "
                      f"{r['step_time_vs_' + base]:.3f}")
    return res


#: peers timed next to our optimisers (not plugins: ``optim=`` never selects them)
PEERS = {"timm_muon": "muon"}


def timm_muon_like(ours: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """timm's maintained ``Muon`` on the parameters and settings of our ``optim=muon`` (K.
    Jordan's coefficients and lr scale, Nesterov): the same update, so a fair peer to time."""
    from timm.optim import Muon

    g = ours.param_groups[0]
    return Muon([p for grp in ours.param_groups for p in grp["params"]], lr=g["lr"],
                momentum=g["momentum"], nesterov=g["nesterov"], weight_decay=g["weight_decay"],
                ns_coefficients="original", adjust_lr_fn="original")


def _with_peer(job, name: str):
    """Replace the orthogonalised optimiser of a ``PEERS[name]`` job by the peer's."""
    from ortho_run.optim import build_scheduler

    tr = job.trainer
    peer = timm_muon_like(tr.optimizers[0])
    tr.optimizers[0] = peer
    optim_cfg = OmegaConf.to_object(tr.cfg.optim)
    tr.schedulers[0] = build_scheduler(peer, optim_cfg, max(1, len(tr.train_loader)),
                                       tr.tcfg.max_epochs)
    tr.train_epoch(limit=2)  # its state and any compilation, as the others had
    return job


def _variants(args, tmp: Path, group: str, names: str, base: str) -> dict:
    """Step time of method ce with each ``group`` option against ``base`` (interleaved rounds,
    median), on the same model, batch and data. ``timm_muon`` (optimisers) is timm's Muon on the
    same parameters as our ``muon``."""
    from ortho_run.errors import OrthoRunError

    names = list(dict.fromkeys(n for n in names.split(",") if n))
    if not names:
        return {}
    if base not in names:
        names.insert(0, base)
    jobs, out = {}, {}
    for n in names:
        try:
            option = PEERS.get(n, n) if group == "optim" else n
            jobs[n] = build(args, "ce", "resident", tmp, extra=[f"{group}={option}"])
            if option != n:
                jobs[n] = _with_peer(jobs[n], n)
        except ImportError as exc:
            out[n] = {"skipped": f"needs {exc.name}"}
        except OrthoRunError as exc:  # e.g. a hard constraint on a model without linear layers
            out[n] = {"skipped": str(exc).split(";")[0]}
    out.update(interleaved(args, jobs))
    ref = out[base]["step_ms"]
    for n, r in out.items():
        if "step_ms" in r:
            r[f"step_time_vs_{base}"] = r["step_ms"] / ref
    return {n: out[n] for n in names}


if __name__ == "__main__":
    main()
