"""The trainer's step against the reference PyTorch step: same weights, same machine, one process, interleaved.

    python -m benchmarks.torch_reference_step --reference-repo /path/to/MAE-DFER \\
        --out results/torch_reference_step_cpu.json

Issue 15's CPU target is "no slower than the reference PyTorch train steps"; its proxy, a fraction of a 1024^2 GEMM,
moves with the machine (the GEMM of this project's CI host has ranged from 33 to 168 GFLOP/s). This benchmark
measures the target itself, so that a claim about it does not rest on a number taken on another machine.

Neither side is simplified:

* **PyTorch**: the reference model built by the reference code of a checkout of github.com/sunlicai/MAE-DFER
  (``--reference-repo``; the published DFEW fine-tune and VoxCeleb2 pre-train settings: depth 16, regions 2x5x10,
  ``region`` classify token, drop path 0.1 / 0.0), the reference optimiser (``optim_factory.create_optimizer``:
  AdamW, the layer-decay parameter groups and weight-decay skip list of ``run_class_finetuning.py`` /
  ``run_mae_pretraining.py``), and the reference step of ``engine_for_*.py``: fine-tune = the reference ``Mixup``
  (mixup 0.8 / cutmix 1.0, smoothing 0.1) + forward + ``SoftTargetCrossEntropy`` + backward + the gradient norm
  its loss scaler computes + ``optimizer.step()``; pre-train = the normalised frame-difference target + forward +
  MSE + backward + gradient norm + step. Float32, ``torch.set_num_threads(cpu_count)``; the video arrives as the
  reference loader delivers it (normalised float, channels first).
* **facemae_jax**: ``benchmarks.train_step.build_step``, i.e. the trainer's own jitted, donating step for the same
  job config (uint8 video normalised in the step, mixup/cutmix, erasing, the non-finite guard), with the reference
  model's weights converted by ``convert.torch_to_flax``. A forward pass of both on the same input is compared first,
  so the two timed steps are known to be the same network.

The steps alternate, ``--rounds`` times, each round preceded by a 1024^2 float32 GEMM in each framework, with a
pause between calls so that neither framework's spinning worker threads steal the other's cores. Medians are
reported with the ratio (facemae_jax / PyTorch; < 1 = faster) and each step's FLOP/s (XLA's count of the step) as a
fraction of its own framework's GEMM.

torch, timm 0.4.12 (the reference's pin) and the reference checkout are not dependencies of this project and
nothing is downloaded: install them yourself (``--extra-sys-path`` appends a directory such as a
``pip install --target`` location to ``sys.path``, after the project's own packages).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np

CASES = ("lgi_finetune", "lgi_pretrain")
PAUSE_S = 0.5


def _import_reference(repo: str):
    if not os.path.isfile(os.path.join(repo, "modeling_finetune.py")):
        raise SystemExit(f"--reference-repo {repo}: no modeling_finetune.py there; expected a checkout of "
                         "github.com/sunlicai/MAE-DFER")
    sys.path.insert(0, repo)
    import importlib

    mods = {m: importlib.import_module(m) for m in ("modeling_finetune", "modeling_pretrain", "optim_factory",
                                                      "mixup")}
    return SimpleNamespace(**mods)


def _torch_gemm(torch, n: int = 1024, repeats: int = 10) -> float:
    a = torch.randn(n, n)
    a @ a
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def _backward_and_step(torch, model, optimizer, loss) -> tuple[float, float]:
    """The reference loss scaler's part of the step (fp32, no clipping): backward, the gradient norm it computes and
    logs (``utils.get_grad_norm_``), ``optimizer.step()``."""
    optimizer.zero_grad()
    loss.backward()
    norm = torch.norm(torch.stack([torch.norm(p.grad.detach(), 2) for p in model.parameters() if p.grad is not None]),
                      2)
    optimizer.step()
    return loss.item(), norm.item()


def _reference_finetune(ref, torch, cfg, batch: int):
    """Model, optimiser and step function exactly as run_class_finetuning.py / engine_for_finetuning.py build them."""
    from timm.loss import SoftTargetCrossEntropy

    model = ref.modeling_finetune.vit_base_dim512_no_depth_patch16_160(
        num_classes=cfg.num_classes, all_frames=cfg.num_frames, tubelet_size=cfg.tubelet_size, drop_rate=0.0,
        drop_path_rate=0.1, attn_drop_rate=0.0, use_mean_pooling=True, init_scale=cfg.init_scale, depth=cfg.depth,
        attn_type="local_global", lg_region_size=tuple(cfg.region_size), lg_classify_token_type=cfg.classify_token_type)
    num_layers = model.get_num_layers()
    layer_decay = 0.75
    assigner = ref.optim_factory.LayerDecayValueAssigner(
        [layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)])
    args = SimpleNamespace(opt="adamw", weight_decay=0.05, lr=1e-3 * batch / 256, opt_eps=1e-8,
                           opt_betas=(0.9, 0.999), momentum=0.9)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every parameter group
        optimizer = ref.optim_factory.create_optimizer(args, model, skip_list=model.no_weight_decay(),
                                                       get_num_layer=assigner.get_layer_id,
                                                       get_layer_scale=assigner.get_scale)
    mixup_fn = ref.mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                               mode="batch", label_smoothing=0.1, num_classes=cfg.num_classes)
    criterion = SoftTargetCrossEntropy()

    def step(video, label, mask=None):
        samples, targets = mixup_fn(video, label)
        return _backward_and_step(torch, model, optimizer, criterion(model(samples), targets))

    return model, step, optimizer


def _reference_pretrain(ref, torch, cfg, batch: int):
    """Model, optimiser and step as run_mae_pretraining.py / engine_for_pretraining.py (frame-difference target)."""
    from einops import rearrange

    model = ref.modeling_pretrain.pretrain_videomae_base_dim512_no_depth_patch16_160(
        drop_path_rate=0.0, decoder_depth=cfg.decoder_depth, encoder_depth=cfg.depth, attn_type="local_global",
        lg_region_size=tuple(cfg.region_size))
    args = SimpleNamespace(opt="adamw", weight_decay=0.05, lr=3e-4 * batch / 256, opt_eps=1e-8,
                           opt_betas=(0.9, 0.95), momentum=0.9)
    with contextlib.redirect_stdout(io.StringIO()):
        optimizer = ref.optim_factory.create_optimizer(args, model)
    mean = torch.as_tensor((0.485, 0.456, 0.406))[None, :, None, None, None]
    std = torch.as_tensor((0.229, 0.224, 0.225))[None, :, None, None, None]
    p = cfg.patch_size

    def step(video, label=None, mask=None):
        with torch.no_grad():  # engine_for_pretraining.train_one_epoch, use_frame_diff_as_target=True
            unnorm = video * std + mean
            sq = rearrange(unnorm, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=2, p1=p, p2=p)
            norm = (sq - sq.mean(dim=-2, keepdim=True)) / (sq.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
            patches = rearrange(norm, "b n p c -> b n (p c)")
            t_, h_, w_ = unnorm.shape[2] // 2, unnorm.shape[3] // p, unnorm.shape[4] // p
            vp = rearrange(patches, "b (t h w) (p0 p1 p2 c) -> b c (t p0) (h p1) (w p2)", t=t_, h=h_, w=w_, p0=2,
                           p1=p, p2=p)
            kept = vp[:, :, ::2]
            diff = vp - kept.repeat_interleave(2, dim=2)
            diff[:, :, ::2] = vp[:, :, ::2]
            vp = rearrange(diff, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)", t=t_, h=h_, w=w_, p0=2, p1=p,
                           p2=p)
            labels = vp[mask].reshape(vp.shape[0], -1, vp.shape[-1])
        return _backward_and_step(torch, model, optimizer, torch.nn.functional.mse_loss(model(video, mask), labels))

    return model, step, optimizer


class _TorchSide:
    """The reference step in its own process (no shared allocator or thread pool with XLA)."""

    def __init__(self, case: str, batch: int, reference_repo: str, weights_path: str, host_malloc: str):
        from facemae_jax import host_memory

        self.host_malloc_kept = host_memory.keep_freed_memory(host_malloc)
        import torch

        from benchmarks import train_step
        from facemae_jax.models import registry

        torch.set_num_threads(os.cpu_count())
        torch.manual_seed(0)
        self.torch = torch
        ref = _import_reference(reference_repo)
        cfg = registry.get_config(train_step.CASES[case][0])  # only the case's shapes, depth and regions
        build = _reference_finetune if cfg.mode == "finetune" else _reference_pretrain
        self.model, self.step_fn, self.optimizer = build(ref, torch, cfg, batch)
        np.savez(weights_path, **{k: v.detach().numpy() for k, v in self.model.state_dict().items()})

    def set_data(self, video, mask, label):
        t = self.torch
        self.video = t.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3)))  # channels first
        self.mask = None if mask is None else t.from_numpy(np.asarray(mask, bool))
        self.label = None if label is None else t.from_numpy(np.asarray(label, np.int64))
        self.model.eval()
        with t.no_grad():
            out = self.model(self.video) if self.mask is None else self.model(self.video, self.mask)
        self.model.train()
        return out.numpy(), self.host_malloc_kept

    def gemm(self):
        return _torch_gemm(self.torch)

    def step(self):
        t0 = time.perf_counter()
        loss, _ = self.step_fn(self.video, self.label, self.mask)
        return time.perf_counter() - t0, loss

    def optimizer_only(self):
        """optimizer.step() on the gradients the last step left: what the reference spends outside fwd + bwd."""
        t0 = time.perf_counter()
        self.optimizer.step()
        return time.perf_counter() - t0


class _JaxSide:
    """The trainer's step (benchmarks.train_step.build_step), with the reference model's weights when given (else
    the step's own initialisation)."""

    def __init__(self, case: str, batch: int, weights_path: str | None = None):
        from facemae_jax import host_memory

        self.host_malloc_kept = host_memory.keep_freed_memory()  # as launch.py does, before jax starts threads
        import jax

        from benchmarks import train_step
        from facemae_jax.convert import torch_to_flax

        jax.config.update("jax_default_matmul_precision", "highest")
        self.jax, self.train_step = jax, train_step
        step, self.state, self.data, self.cfg, self.tx = train_step.build_step(case, batch, tiny=False,
                                                                              dtype="float32", attention_impl="xla",
                                                                              remat="none")
        if weights_path is not None:
            with np.load(weights_path) as z:
                params, _ = torch_to_flax({k: z[k] for k in z.files}, self.cfg, source=weights_path)
            self.state["params"] = jax.tree.map(jax.numpy.asarray, params)
            self.forward = self._forward()  # of the given weights, before any step changes them
        self.compiled = step.lower(self.state, self.data).compile()
        self.step()  # warm-up

    def _forward(self):
        from facemae_jax.models import registry
        from facemae_jax.targets import normalize_video

        self.video = np.asarray(normalize_video(self.jax.numpy.asarray(self.data["video"])))  # what the model sees
        model = registry.create_model(self.cfg)
        args = (self.video,) if self.cfg.mode == "finetune" else (self.video, self.data["mask"])
        return np.asarray(self.jax.jit(lambda p, *a: model.apply({"params": p}, *a))(self.state["params"], *args))

    def info(self):
        """What the other side needs (the model's input, mask, labels) and the eval-mode forward to compare with."""
        from facemae_jax.models import registry

        return {"video": self.video, "mask": self.data.get("mask"), "label": self.data.get("label"),
                "forward": self.forward, "flops": float(self.compiled.cost_analysis()["flops"]),
                "parameters": registry.count_params(self.state["params"]), "host_malloc_kept": self.host_malloc_kept}

    def gemm(self):
        return self.train_step.gemm_flops_per_s()

    def step(self):
        t0 = time.perf_counter()
        self.state, m = self.compiled(self.state, self.data)
        self.jax.block_until_ready(m)
        return time.perf_counter() - t0, float(m["loss"])

    def optimizer_only(self):
        """The step's optimiser update + non-finite guard (steps._finish) alone, on fixed gradients (compiled at the
        first call, which is the warm-up)."""
        if not hasattr(self, "finish"):
            from facemae_jax import steps

            jnp = self.jax.numpy
            self.grads = self.jax.tree.map(lambda p: p * 1e-3, self.state["params"])
            finish = self.jax.jit(lambda st, g: steps._finish(st, g, jnp.float32(1.0), self.tx, {}),
                                  donate_argnums=0)
            self.finish = finish.lower(self.state, self.grads).compile()
        t0 = time.perf_counter()
        self.state, m = self.finish(self.state, self.grads)
        self.jax.block_until_ready((self.state, m))
        return time.perf_counter() - t0


def _serve(conn, side_cls, args):
    """Worker loop: build the side, then answer (method, args) calls until told to stop; errors go back as text."""
    import traceback

    try:
        side = side_cls(*args)
        conn.send(("ok", None))
        while True:
            name, call_args = conn.recv()
            if name == "stop":
                return
            conn.send(("ok", getattr(side, name)(*call_args)))
    except Exception as e:  # one message, the cause first, for the parent to report
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class _Worker:
    def __init__(self, ctx, side_cls, args, name: str):
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, side_cls, args), daemon=True)
        self.proc.start()
        self._answer()

    def _answer(self):
        status, value = self.conn.recv()
        if status == "error":
            raise SystemExit(f"{self.name} side failed: {value}")
        return value

    def __call__(self, name: str, *args):
        self.conn.send((name, args))
        return self._answer()

    def stop(self):
        self.conn.send(("stop", ()))
        self.proc.join(timeout=30)


def compare_case(case: str, reference_repo: str, batch: int, rounds: int, reference_malloc: str) -> dict:
    """Both sides in spawned worker processes (they inherit ``sys.path``), called in turn from here."""
    import multiprocessing
    import tempfile

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "reference_weights.npz")
        ref = _Worker(ctx, _TorchSide, (case, batch, reference_repo, weights, reference_malloc), "PyTorch")
        ours = _Worker(ctx, _JaxSide, (case, batch, weights), "facemae_jax")
        info = ours("info")
        out_t, ref_kept = ref("set_data", info["video"], info["mask"], info["label"])
        forward_rel = float(np.linalg.norm(info["forward"] - out_t) / np.linalg.norm(out_t))
        ref("step")  # warm-up (facemae_jax warmed up when it compiled)
        t_j, t_t, g_j, g_t, o_j, o_t, losses = [], [], [], [], [], [], []
        for _ in range(rounds):
            for worker, gemms in ((ours, g_j), (ref, g_t)):
                time.sleep(PAUSE_S)
                gemms.append(worker("gemm"))
            time.sleep(PAUSE_S)
            tj, loss_j = ours("step")
            time.sleep(PAUSE_S)
            tt, loss_t = ref("step")
            t_j.append(tj)
            t_t.append(tt)
            losses.append((loss_j, loss_t))
        ours("optimizer_only")  # warm-up (compiles it)
        ref("optimizer_only")
        for _ in range(rounds):
            time.sleep(PAUSE_S)
            o_j.append(ours("optimizer_only"))
            time.sleep(PAUSE_S)
            o_t.append(ref("optimizer_only"))
        ours.stop()
        ref.stop()
    mj, mt, gj, gt, oj, ot = (statistics.median(v) for v in (t_j, t_t, g_j, g_t, o_j, o_t))
    flops = info["flops"]
    return {
        "case": case, "batch": batch, "rounds": rounds, "forward_relative_difference": forward_rel,
        "parameters": info["parameters"], "xla_flops_per_step": flops,
        "facemae_jax_step_s": t_j, "pytorch_step_s": t_t, "facemae_jax_step_s_median": mj,
        "pytorch_step_s_median": mt, "ratio_facemae_jax_over_pytorch": mj / mt,
        "jax_gemm_1024_flops_per_s": g_j, "torch_gemm_1024_flops_per_s": g_t,
        "facemae_jax_fraction_of_gemm": flops / mj / gj, "pytorch_fraction_of_gemm": flops / mt / gt,
        "facemae_jax_optimizer_s": o_j, "pytorch_optimizer_s": o_t,
        "facemae_jax_optimizer_s_median": oj, "pytorch_optimizer_s_median": ot,
        "losses_jax_torch": losses,
        "host_malloc_kept": {"facemae_jax": info["host_malloc_kept"], "pytorch": ref_kept},
    }


def main(argv=None) -> int:
    import importlib.metadata
    import importlib.util

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference-repo", required=True, help="a checkout of github.com/sunlicai/MAE-DFER")
    ap.add_argument("--extra-sys-path", action="append", default=[],
                    help="directory appended to sys.path (e.g. where torch and timm 0.4.12 were pip-installed)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reference-malloc", default="default", choices=["default", "keep"],
                    help="glibc malloc policy of the PyTorch process: default = as the reference runs; keep = the "
                         "one launch.py gives facemae_jax on CPU hosts (facemae_jax.host_memory)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    extra = [os.path.abspath(p) for p in args.extra_sys_path]
    sys.path.extend(extra)
    for package in ("torch", "timm", "einops"):
        if importlib.util.find_spec(package) is None:
            raise SystemExit(f"{package} is needed for this benchmark and is not importable; install torch and "
                             "timm==0.4.12 (the reference's pin), or point --extra-sys-path at them")
    repo = os.path.abspath(args.reference_repo)
    if not os.path.isfile(os.path.join(repo, "modeling_finetune.py")):
        raise SystemExit(f"--reference-repo {repo}: no modeling_finetune.py there; expected a checkout of "
                         "github.com/sunlicai/MAE-DFER")
    rows = []
    for case in args.cases:
        r = compare_case(case, repo, args.batch, args.rounds, args.reference_malloc)
        rows.append(r)
        print(f"{case:<13} batch {r['batch']}  forward rel diff {r['forward_relative_difference']:.1e}  "
              f"PyTorch {r['pytorch_step_s_median']:.2f} s ({100 * r['pytorch_fraction_of_gemm']:.0f}% of its GEMM,"
              f" optimizer {r['pytorch_optimizer_s_median']:.2f} s)  facemae_jax {r['facemae_jax_step_s_median']:.2f}"
              f" s ({100 * r['facemae_jax_fraction_of_gemm']:.0f}% of its GEMM, optimizer + guard "
              f"{r['facemae_jax_optimizer_s_median']:.2f} s)  ratio {r['ratio_facemae_jax_over_pytorch']:.2f}",
              flush=True)
    versions = {}
    for package in ("jax", "torch", "timm"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    meta = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
            "versions": versions, "load_average": os.getloadavg(), "pause_between_calls_s": PAUSE_S,
            "command": "python -m benchmarks.torch_reference_step " + " ".join(sys.argv[1:] if argv is None
                                                                               else argv)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
