"""benchmarks/step_profile.py: the FLOP attribution of compiled HLO thunks, and the script end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import step_profile


def _index(fn, *args):
    return step_profile.HloIndex(jax.jit(fn).lower(*args).compile().as_text())


def _flops_of_every_instruction(index):
    return sum(index.flops(name) for name in index.entry)


def test_matmul_flops_are_output_size_times_contracted_size():
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    assert _flops_of_every_instruction(_index(lambda x, y: x @ y, a, b)) == 2 * 64 * 32 * 16
    # a batched contraction over two dimensions
    q, k = jnp.ones((3, 5, 7, 4)), jnp.ones((3, 6, 7, 4))
    got = _flops_of_every_instruction(_index(lambda x, y: jnp.einsum("bqhd,bkhd->bhqk", x, y), q, k))
    assert got == 2 * (3 * 7 * 5 * 6) * 4


def test_convolution_flops_count_the_whole_kernel_window():
    x = jnp.ones((2, 8, 8, 3))
    w = jnp.ones((4, 4, 3, 5))  # HWIO, stride 4: a patch embedding

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    assert _flops_of_every_instruction(_index(conv, x, w)) == 2 * (2 * 2 * 2 * 5) * (4 * 4 * 3)


def test_elementwise_work_has_no_matmul_flops():
    assert _flops_of_every_instruction(_index(lambda x: jnp.tanh(x) * 2 + 1, jnp.ones((128, 128)))) == 0


@pytest.mark.extended
def test_profile_of_the_tiny_step_accounts_for_the_matmuls(tmp_path):
    out = tmp_path / "profile.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    r = subprocess.run([sys.executable, "-m", "benchmarks.step_profile", "--case", "lgi_finetune", "--tiny",
                        "--repeats", "1", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    # the matmuls found in the executed thunks carry most of XLA's own FLOP count (the rest is element-wise work)
    assert 0.7 < res["matmul_flops"] / res["xla_flops_per_step"] <= 1.0
    assert res["matmul_thunk_s"] > 0 and res["other_thunk_s"] > 0
    assert sum(m["gflop"] for m in res["matmuls"]) * 1e9 <= res["matmul_flops"] * (1 + 1e-9)
    scopes = {m["scope"] for m in res["matmuls"]}
    assert any("mlp" in s for s in scopes) and any(s.startswith("bwd:") for s in scopes)
    assert "slowest matmuls" in r.stdout


def test_scope_folds_indices_but_keeps_layer_names():
    index = step_profile.HloIndex(
        '  %a = f32[2]{0} fusion(%p), kind=kLoop, calls=%c, metadata={op_name="jit(step)/transpose(jvp(LGIClassifier))'
        '/LGIClassifier.encode/blocks_3/mlp/fc1/dot_general"}\n'
        '  %b = f32[2]{0} fusion(%p), kind=kLoop, calls=%c, metadata={op_name="jit(step)/jvp(LGIClassifier)'
        '/LGIClassifier.encode/blocks_12/DropPath_0/div"}\n'
        '  %c = f32[2]{0} add(%p, %p), metadata={op_name="jit(step)/add"}\n')
    assert index.scope("a") == "bwd: mlp/fc1/dot_general"  # fc1 stays fc1 (fc2 is another row)
    assert index.scope("b") == "fwd: blocks_*/DropPath_*/div"
    assert index.scope("c") == "step: add"
