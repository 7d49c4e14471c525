"""Numerical parity with the reference PyTorch code on golden files (shared/golden/README.md).

    python -m facemae_jax.parity ../shared/golden/*.npz ../shared/golden/steps/*.npz ../shared/golden/views/*.npz

Each file is recognised by its ``meta`` and gets one PASS/FAIL line; exit status 0 only if all pass. Training-step
goldens are checked by ``parity_steps``, eval-view goldens by ``parity_views``; this module checks forward goldens.

For each forward golden: build the model from the reference constructor and kwargs recorded in ``meta``, import the
``param/*`` weights with the converter, run the same input (and mask), and print one line with the relative error
‖a−b‖/‖b‖ of every stored output it can compare (``output``, ``features``, ``pooled``, ``target``, the full-tensor
statistics, ``loss`` as |Δ|/|b|, and every stored ``act/*`` sub-module output). Exit status 0 only if every error
is <= 1e-4 (float32). Input files (``meta.kind == "input"``) are skipped. Both golden formats (1: full tensors and
an ``input`` array; 2: compact) are read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np
from flax import traverse_util

TOLERANCE = 1e-4

# Reference constructor kwargs that carry no information for us when they have these values.
_NEUTRAL = {
    "norm_layer": None, "drop_rate": 0.0, "attn_drop_rate": 0.0, "encoder_num_classes": 0, "init_values": 0.0,
    "use_learnable_pos_emb": False, "use_mean_pooling": True, "in_chans": 3, "qk_scale": None,
    "use_checkpoint": False, "save_feature": False, "num_segments": 1, "fc_drop_rate": 0.0,
}
_RENAME = {
    "embed_dim": "embed_dim", "encoder_embed_dim": "embed_dim", "depth": "depth", "encoder_depth": "depth",
    "num_heads": "num_heads", "encoder_num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias",
    "drop_path_rate": "drop_path_rate", "img_size": "img_size", "patch_size": "patch_size",
    "tubelet_size": "tubelet_size", "all_frames": "num_frames", "num_frames": "num_frames",
    "num_classes": "num_classes", "init_scale": "init_scale", "decoder_embed_dim": "decoder_embed_dim",
    "decoder_depth": "decoder_depth", "decoder_num_heads": "decoder_num_heads",
    "lg_region_size": "region_size", "lg_first_attn_type": "first_attn_type",
    "lg_third_attn_type": "third_attn_type", "lg_attn_param_sharing_first_third": "share_first_third",
    "lg_attn_param_sharing_all": "share_all", "lg_no_second": "no_second", "lg_no_third": "no_third",
    "lg_classify_token_type": "classify_token_type", "stage_depths": "stage_depths",
    "temporal_kernel_size": "temporal_kernel", "num_bottleneck_tokens": "bottleneck_tokens",
    "head_activation_func": "head_activation", "keep_temporal_dim": "keep_temporal_dim",
}
_MASK_KINDS = {"TubeWindowMaskingGenerator": "tube_window", "TubeMaskingGenerator": "tube",
               "RandomMaskingGenerator": "random"}


def config_from_meta(meta: dict[str, Any]):
    """The ModelConfig equivalent to the reference constructor call recorded in a golden's ``meta``."""
    from facemae_jax.models import registry
    from facemae_jax.models.config import ModelConfig

    ctor = meta["model_constructor"]
    kwargs = dict(ctor.get("kwargs", {}))
    mode = meta["mode"]
    family_name = meta["family"]
    if ctor.get("kind") == "class":
        base: dict[str, Any] = {}
    else:  # a registered entrypoint name, e.g. pretrain_svfap_base_patch16_160
        name = ctor["callable"]
        if family_name == "svfap" and name == "pretrain_svfap_base_patch16_160":
            name += "_as_written"  # the reference constructor as written is 768/12 (Q7)
        base = registry.get_config(name).to_dict()
    cfg: dict[str, Any] = {**base, "mode": mode}
    attn_type = kwargs.pop("attn_type", None)
    if family_name == "svfap":
        cfg["family"] = "tpsbt"
    elif attn_type is not None:
        cfg["family"] = {"local_global": "lgi", "joint": "vit"}[attn_type]
    elif "family" not in cfg:
        cfg["family"] = "vit"  # MAE-DFER class default attn_type is 'joint'
    decoder_out = kwargs.pop("decoder_num_classes", None)
    norm = kwargs.pop("norm_layer", None)
    if norm is not None and "1e-6" not in str(norm) and "1e-06" not in str(norm):
        raise ValueError(f"unsupported norm_layer {norm!r} (all models use LayerNorm eps=1e-6)")
    for k, v in kwargs.items():
        if k in _RENAME:
            if isinstance(v, list):
                v = tuple(v)
            cfg[_RENAME[k]] = v
        elif k in _NEUTRAL:
            if v not in (_NEUTRAL[k], None) and not (k == "init_values" and not v):
                raise ValueError(f"reference kwarg {k}={v!r} is not supported by this port")
        else:
            raise ValueError(f"unknown reference constructor kwarg {k}={v!r}")
    if mode == "pretrain":
        m = meta.get("mask", {})
        if m.get("generator") in _MASK_KINDS:
            cfg["mask_kind"] = _MASK_KINDS[m["generator"]]
        if "mask_ratio" in m.get("args", {}):
            cfg["mask_ratio"] = m["args"]["mask_ratio"]
        elif "mask_kind" not in cfg:
            cfg["mask_kind"] = "tube_window" if cfg["family"] == "lgi" else "tube"
    defaults = ModelConfig(family=cfg["family"], mode=mode).to_dict()
    merged = {**defaults, **cfg}
    result = ModelConfig.from_dict(merged)
    if decoder_out is not None and decoder_out != result.patch_dim:
        raise ValueError(f"decoder_num_classes={decoder_out} but the token holds {result.patch_dim} values")
    return result


def load_input(path: str, z: Any, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (normalised input NCTHW float32, mean, std). Format 2: uint8 pixels in a side file, normalised on the
    host with the exact float32 op order; format 1: the stored normalised input."""
    if "input" in z.files:
        x = z["input"].astype(np.float32)
        mean = np.asarray(meta.get("input", {}).get("normalization_mean", (0.485, 0.456, 0.406)), np.float32)
        std = np.asarray(meta.get("input", {}).get("normalization_std", (0.229, 0.224, 0.225)), np.float32)
        return x, mean, std
    zi = np.load(os.path.join(os.path.dirname(os.path.abspath(path)), meta["input"]["file"]))
    mean, std = zi["mean"].astype(np.float32), zi["std"].astype(np.float32)
    x = (zi["pixels"].astype(np.float32) / np.float32(255) - mean.reshape(1, 3, 1, 1, 1)) / std.reshape(1, 3, 1, 1, 1)
    return x.astype(np.float32), mean, std


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / den) if den > 0 else float(np.linalg.norm(a - b))


def stats(full: np.ndarray) -> np.ndarray:
    a = full.astype(np.float64)
    return np.stack([a.mean(axis=(1, 2)), a.std(axis=(1, 2)), np.abs(a).max(axis=(1, 2))], axis=1)


def _act_layout(name: str, arr: np.ndarray) -> np.ndarray:
    """Our captured output -> the reference module's layout (Conv1d outputs are (B*P, C, T))."""
    if "temporal_downsamples" in name:
        return np.swapaxes(arr, 1, 2)
    return arr


def check_file(path: str) -> tuple[dict[str, float], str]:
    """-> ({quantity: relative error}, description). Raises on malformed files."""
    import jax
    import jax.numpy as jnp

    from facemae_jax import naming, targets
    from facemae_jax.convert import torch_to_flax
    from facemae_jax.models import registry

    jax.config.update("jax_default_matmul_precision", "highest")
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    cfg = config_from_meta(meta)
    sd = {k[len("param/"):]: z[k].astype(np.float32) for k in z.files if k.startswith("param/")}
    params, _ = torch_to_flax(sd, cfg, source=path)
    x, mean, std = load_input(path, z, meta)
    video = jnp.asarray(x.transpose(0, 2, 3, 4, 1))
    model = registry.create_model(cfg)
    wanted = {k[len("act/"):] for k in z.files if k.startswith("act/")}

    def capture(mdl, method_name):
        if method_name != "__call__" or not mdl.scope.path:
            return False
        return naming.flax_path_to_torch(tuple(mdl.scope.path) + ("x",))[:-2] in wanted

    errs: dict[str, float] = {}
    if cfg.mode == "finetune":
        fwd = jax.jit(lambda p, v: model.apply({"params": p}, v, return_aux=True, capture_intermediates=capture,
                                               mutable=["intermediates"]))
        (logits, aux), state = fwd(params, video)
        errs["output"] = rel(logits, z["output"])
        for k in ("features", "pooled"):
            if k in z.files:
                errs[k] = rel(aux[k], z[k])
    else:
        mask = z["mask"].astype(bool)
        from facemae_jax.models.mae import check_mask

        check_mask(cfg, mask)  # under jit the model cannot check a traced mask
        fwd = jax.jit(lambda p, v, m: model.apply({"params": p}, v, m, return_aux=True,
                                                  capture_intermediates=capture, mutable=["intermediates"]))
        (pred, aux), state = fwd(params, video, jnp.asarray(mask))
        pred = np.asarray(pred)
        frame_diff = bool(meta.get("loss_settings", {}).get("use_frame_diff_as_target", False))
        pixels01 = targets.denormalize_video(video, jnp.asarray(mean), jnp.asarray(std))
        target = np.asarray(targets.reconstruction_targets(pixels01, aux["mask_idx"], patch=cfg.patch_size,
                                                           tubelet=cfg.tubelet_size, frame_diff=frame_diff))
        rows = z["output"].shape[1]
        errs["output"] = rel(pred[:, :rows], z["output"])
        errs["target"] = rel(target[:, :rows], z["target"])
        if "output_stats" in z.files:
            errs["output_stats"] = rel(stats(pred), z["output_stats"])
            errs["target_stats"] = rel(stats(target), z["target_stats"])
        errs["features"] = rel(aux["features"], z["features"])
        loss = float(np.mean((pred - target) ** 2, dtype=np.float32))
        errs["loss"] = abs(loss - float(z["loss"])) / abs(float(z["loss"]))
        if "aux/decoder_pos_embed" in z.files:
            from facemae_jax.models.layers import sinusoid_table

            errs["decoder_pos_embed"] = rel(sinusoid_table(cfg.num_tokens, cfg.decoder_embed_dim),
                                            z["aux/decoder_pos_embed"])
    captured = {}
    for p, v in traverse_util.flatten_dict(state.get("intermediates", {})).items():
        if p[-1] == "__call__":
            captured[naming.flax_path_to_torch(p[:-1] + ("x",))[:-2]] = v
    for name in sorted(wanted):
        if name in captured:
            errs[f"act/{name}"] = rel(_act_layout(name, np.asarray(captured[name][0])), z[f"act/{name}"])
        else:
            errs[f"act/{name}"] = float("inf")
    return errs, _desc(meta)


def golden_kind(meta: dict[str, Any]) -> str:
    """'input' | 'train_steps' | 'eval_views' | 'forward' (shared/golden/README.md: kinds in ``meta``)."""
    if meta.get("kind") in ("input", "train_steps"):
        return meta["kind"]
    if str(meta.get("format", "")).startswith("eval_views"):
        if meta["format"] != "eval_views v1":
            raise ValueError(f"eval-views format {meta['format']!r} is not supported (this tool reads v1)")
        return "eval_views"
    return "forward"


def _desc(meta: dict[str, Any]) -> str:
    return f"{meta.get('family')} {meta.get('mode')} {meta.get('size')} seed={meta.get('seed')}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare the port with reference golden files: forward outputs, "
                                             "training steps and eval views, in any mix.")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--verbose", action="store_true", help="print every act/* error too")
    args = ap.parse_args(argv)
    ok = True
    checked = 0
    for path in args.files:
        name = os.path.basename(path)
        try:
            with np.load(path) as z:
                meta = json.loads(str(z["meta"]))
            kind = golden_kind(meta)
            if kind == "input":
                continue
            if kind in ("train_steps", "eval_views"):
                from facemae_jax import parity_steps, parity_views

                if kind == "train_steps":
                    _, passed, summary = parity_steps.check_train_steps(path)
                    desc = f"train steps, {_desc(meta)}"
                else:
                    _, passed, summary = parity_views.check_eval_views(path)
                    desc = f"eval views, {len(meta['clips'])} clips, seed={meta.get('seed')}"
                checked += 1
                ok &= passed
                head, _, rest = summary.partition("\n")
                print(f"{name} [{desc}]: {head}  -> {'PASS' if passed else 'FAIL'}" + (f"\n{rest}" if rest else ""))
                continue
            errs, desc = check_file(path)
        except Exception as e:  # report and continue with the next file
            print(f"{name}: ERROR {type(e).__name__}: {e}  -> FAIL")
            ok = False
            continue
        checked += 1
        worst = max(errs.values())
        passed = worst <= TOLERANCE
        ok &= passed
        main_keys = [k for k in errs if not k.startswith("act/")]
        acts = [k for k in errs if k.startswith("act/")]
        parts = [f"{k} {errs[k]:.2e}" for k in main_keys]
        if acts:
            parts.append(f"act/* ({len(acts)}) max {max(errs[k] for k in acts):.2e}")
        print(f"{name} [{desc}]: " + "  ".join(parts) + f"  -> {'PASS' if passed else 'FAIL'}")
        if args.verbose:
            for k in acts:
                print(f"    {k} {errs[k]:.2e}")
    if checked == 0:
        print("no golden files checked")
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
