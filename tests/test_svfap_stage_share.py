"""The stage-share analysis of the SVFAP fusion (benchmarks/svfap_stage_share.py, issue 19): its terms are the
model's, they sum to what the final norm receives, and each edit does what it says."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from benchmarks import svfap_stage_share as ss
from facemae_jax.models import registry

# 4 x 4 x 4 tokens, three stages (4 -> 2 -> 1 frames), the corrected options the study questions.
TINY = dict(num_frames=8, img_size=16, patch_size=4, embed_dim=16, num_heads=2, stage_depths=(1, 1, 1),
            bottleneck_tokens=(3,), bottleneck_hidden=8, decoder_embed_dim=8, decoder_num_heads=1, decoder_depth=1,
            mask_ratio=0.5, svfap_reverse_ctx="bottleneck", svfap_upsample="repeat")


@functools.cache
def _tiny():
    """Tiny pre-train model with host-drawn random parameters (no init compile), two videos, a tube mask and the
    jitted analysis forward (one compile for every edit)."""
    cfg = registry.get_config("tpsbt_tiny_pretrain", **TINY)
    model = registry.create_model(cfg)
    rng = np.random.default_rng(0)
    flat = {k: (0.3 * rng.standard_normal(v.shape) + (k[-1] == "scale")).astype(np.float32)
            for k, v in flatten_dict(registry.abstract_params(model)).items()}
    video, mask = registry.example_inputs(cfg, batch=2)
    videos = [rng.standard_normal(video.shape).astype(np.float32) for _ in range(2)]

    mask = np.broadcast_to(mask[:1], mask.shape)  # one mask for both clips: the batch-mean check needs it

    @jax.jit
    def run(params, v, keep, mean):
        plain = model.apply({"params": params}, v, mask, train=False)
        return plain, *ss.fused_terms_apply(model, params, v, mask, keep, mean)

    return cfg, unflatten_dict(flat), videos, run


def test_terms_are_the_models_and_edits_act():
    cfg, params, (v1, v2), run = _tiny()
    s = len(cfg.stage_depths)
    plain, pred, terms, fused = run(params, v1, *ss.edit_coefficients(s))
    assert len(terms) == s == 3
    np.testing.assert_array_equal(pred, plain)  # the interception alone changes nothing
    np.testing.assert_allclose(sum(terms), fused, atol=1e-5)  # the terms are what the final norm receives
    shares = ss.term_shares(terms, fused)
    for kind in ("raw", "centered"):
        assert sum(shares[kind]["projection"]) == pytest.approx(1.0, abs=1e-4)
        assert all(r > 0.05 for r in shares[kind]["rms"])
    # Every term zeroed: the prediction no longer depends on the video (it does without the edit).
    all_zero = ss.edit_coefficients(s, [(i, "zero") for i in range(s)])
    assert np.abs(run(params, v2, *ss.edit_coefficients(s))[1] - pred).max() > 1e-3
    np.testing.assert_allclose(run(params, v1, *all_zero)[1], run(params, v2, *all_zero)[1], atol=1e-6)
    # One term zeroed changes the prediction, and only that term.
    _, p1, t1, _ = run(params, v1, *ss.edit_coefficients(s, [(1, "zero")]))
    assert np.abs(p1 - pred).max() > 1e-3
    assert float(np.abs(t1[1]).max()) == 0.0
    np.testing.assert_array_equal(t1[0], terms[0])
    np.testing.assert_array_equal(t1[2], terms[2])
    # The batch mean of a batch of two equal clips is the clip: the mean edit then changes nothing.
    same = np.stack([v1[0], v1[0]])
    every_mean = ss.edit_coefficients(s, [(i, "mean") for i in range(s)])
    np.testing.assert_allclose(run(params, same, *every_mean)[1], run(params, same, *ss.edit_coefficients(s))[1],
                               atol=1e-5)


def test_edit_names_and_bad_edits():
    edits = ss.stage_edits(3)
    assert edits["trained fusion"] == ()
    assert edits["only stage 2 (others mean)"] == ((0, "mean"), (1, "mean"))
    assert len(edits) == 1 + 2 * (3 + 3 + 1)
    keep, mean = ss.edit_coefficients(3, [(0, "zero"), (2, "mean")])
    assert keep.tolist() == [0, 1, 0] and mean.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="stages 0..2"):
        ss.edit_coefficients(3, [(3, "zero")])
    with pytest.raises(ValueError, match="zero"):
        ss.edit_coefficients(3, [(0, "drop")])
