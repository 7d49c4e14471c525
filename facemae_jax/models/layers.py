"""Building blocks shared by every encoder and the decoder (ARCHITECTURE.md §1).

Parameters are stored exactly as the reference stores them (fused ``qkv`` kernel, separate ``q_bias`` /
``v_bias``, keys have no bias at all), so the converter is a pure layout transform and optimiser rules written
on reference names apply unchanged. All video tensors are channels-last: ``[B, T, H, W, 3]``.

Every kernel/embedding initialiser is wrapped with ``nn.with_logical_partitioning``: the logical axes below are
mapped to mesh axes ('data', 'fsdp') by ``facemae_jax.sharding`` (rules are data, not code):

* ``embed``   the model width C (or Cd in the decoder) — the axis FSDP shards;
* ``hidden``  fused qkv / kv outputs, MLP hidden width, bottleneck hidden width;
* ``classes`` classifier / pixel-head outputs;
* ``None``    small or structural axes (conv taps, region index) — never sharded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]
LN_EPS = 1e-6


# ------------------------------------------------------------------------------------------------------------
# Initialisers (ARCHITECTURE §1.8 / QUIRKS Q17). They only matter when training from scratch.
# ------------------------------------------------------------------------------------------------------------


def trunc_normal_abs(std: float = 0.02, bound: float = 2.0) -> Initializer:
    """timm ``trunc_normal_(std=std)``: normal truncated at +-``bound`` *absolute* (= +-100 std for 0.02)."""
    return nn.initializers.truncated_normal(stddev=std, lower=-bound / std, upper=bound / std)


def torch_default_uniform(fan_in: int) -> Initializer:
    """PyTorch's default Linear/Conv init: U(+-1/sqrt(fan_in)) for weight and bias alike."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@dataclasses.dataclass(frozen=True)
class Inits:
    """The initialiser set of one model family/mode (fine-tune: trunc-normal 0.02; pre-train: xavier over fused
    matrices)."""

    dense: Initializer

    @staticmethod
    def for_mode(mode: str) -> "Inits":
        if mode == "pretrain":
            # xavier_uniform on the fused (C, 3A) / (C, 2A) kernel = the reference's bound over the fused matrix.
            return Inits(dense=nn.initializers.xavier_uniform())
        return Inits(dense=trunc_normal_abs(0.02))


def _p(init: Initializer, axes: tuple[str | None, ...]) -> Initializer:
    return nn.with_logical_partitioning(init, axes)


def dense(features: int, *, name: str, init: Initializer, axes: tuple[str | None, str | None], use_bias: bool = True,
          dtype: Any = jnp.float32, bias_init: Initializer = nn.initializers.zeros) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        name=name,
        dtype=dtype,
        kernel_init=_p(init, axes),
        bias_init=_p(bias_init, (axes[1],)),
    )


def layer_norm(name: str, dtype: Any = jnp.float32) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LN_EPS,
        name=name,
        dtype=dtype,
        scale_init=_p(nn.initializers.ones, ("norm",)),
        bias_init=_p(nn.initializers.zeros, ("norm",)),
    )


# ------------------------------------------------------------------------------------------------------------
# Position table (ARCHITECTURE §1.2)
# ------------------------------------------------------------------------------------------------------------


def sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
    """Fixed 1-D sin/cos table ``[1, N, D]`` float32, computed in float64 then cast (bit-exact with the reference)."""
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angle = pos / np.power(10000.0, 2 * (j // 2) / dim)
    table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    return table[None].astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Tubelet embedding: Conv3d, kernel = stride = (tubelet, patch, patch). ``[B,T,H,W,3] -> [B, N, C]`` with
    raster token order ``n = t*H'*W' + h*W' + w`` (ARCHITECTURE §1.1)."""

    embed_dim: int
    patch_size: int
    tubelet_size: int
    in_chans: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, video: jax.Array) -> jax.Array:
        k = (self.tubelet_size, self.patch_size, self.patch_size)
        fan_in = self.in_chans * int(np.prod(k))
        x = nn.Conv(
            self.embed_dim,
            kernel_size=k,
            strides=k,
            padding="VALID",
            name="proj",
            dtype=self.dtype,
            kernel_init=_p(torch_default_uniform(fan_in), (None, None, None, None, "embed")),
            bias_init=_p(torch_default_uniform(fan_in), ("embed",)),
        )(video)
        b, t, h, w, c = x.shape
        return x.reshape(b, t * h * w, c)


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
    b, n, a = x.shape
    return x.reshape(b, n, num_heads, a // num_heads)


ATTENTION_IMPLS = ("xla", "cudnn", "auto")
REMAT_CHOICES = ("none", "full")  # or the name of any jax.checkpoint_policies policy


def resolve_attention_impl(impl: str, dtype: Any) -> tuple[str, str]:
    """The ``implementation`` for ``jax.nn.dot_product_attention`` -> (name, why).

    ``xla`` is XLA's own softmax(QK^T)V (every backend, float32 included: the faithful numerics). ``cudnn`` is
    cuDNN's fused flash attention: NVIDIA GPUs only, bf16/fp16 only — asked for elsewhere it is an error, not a
    silent fallback. ``auto`` takes cuDNN where both hold and XLA otherwise. jax itself never picks cuDNN on its
    own (``implementation=None`` means XLA), so without this knob no fused kernel is ever used.
    """
    backend = jax.default_backend()
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "xla":
        return "xla", "requested"
    if impl == "cudnn":
        if backend != "gpu":
            raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU, but the jax backend is {backend!r}; "
                             "use 'xla', or 'auto' to take cuDNN only where it applies")
        if not low_precision:
            raise ValueError(f"attention_impl='cudnn' needs bfloat16/float16 compute, the model dtype is "
                             f"{jnp.dtype(dtype).name}; set model dtype=bfloat16 or use 'auto'/'xla'")
        return "cudnn", "requested"
    if impl == "auto":
        if backend == "gpu" and low_precision:
            return "cudnn", "auto: GPU and bf16/fp16 compute -> cuDNN flash attention"
        return "xla", (f"auto: {backend} backend, {jnp.dtype(dtype).name} compute -> XLA (cuDNN flash attention "
                       "needs an NVIDIA GPU and bf16/fp16)")
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


def remat_policy(remat: str):
    """``none`` -> None (no rematerialisation); ``full`` -> recompute everything in the backward pass (jax's default
    policy); any other name -> ``jax.checkpoint_policies.<name>`` (e.g. ``dots_with_no_batch_dims_saveable``:
    keep the matmul outputs, recompute the element-wise ops)."""
    if remat in ("none", "full"):
        return None
    policy = getattr(jax.checkpoint_policies, remat, None)
    if policy is None or not callable(policy):
        names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
        raise ValueError(f"remat must be 'none', 'full' or a jax.checkpoint_policies name ({', '.join(names)}), "
                         f"got {remat!r}")
    if remat.startswith(("save_", "offload", "save_and_offload")):  # factories, not policies
        raise ValueError(f"remat {remat!r} is a policy factory that needs arguments; name a ready policy")
    return policy


def remat_block(cls: type[nn.Module], remat: str, static_argnums: tuple[int, ...]) -> type[nn.Module]:
    """``cls`` itself, or ``nn.remat(cls)`` with the named policy. The wrapped class keeps the module's name, so
    parameter paths (and the converter, optimiser rules, official checkpoints) are unchanged. ``static_argnums``
    count ``self`` as 0 (flax convention) and name the Python-valued arguments (``deterministic``, ``batch``)."""
    if remat == "none":
        return cls
    return nn.remat(cls, policy=remat_policy(remat), static_argnums=static_argnums, prevent_cse=True)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, impl: str = "xla") -> jax.Array:
    """softmax((q * hd^-0.5) k^T) v through ``jax.nn.dot_product_attention`` with the chosen implementation
    (``resolve_attention_impl``; XLA unless cuDNN was asked for). ``q: [B, N1, A]``, ``k, v: [B, N2, A]`` ->
    ``[B, N1, A]``."""
    b, n1, a = q.shape
    hd = a // num_heads
    if impl == "auto":
        impl = resolve_attention_impl(impl, q.dtype)[0]
    out = jax.nn.dot_product_attention(
        _heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads), scale=hd**-0.5, implementation=impl
    )
    return out.reshape(b, n1, a)


class Attention(nn.Module):
    """Self-attention with a fused ``qkv`` kernel and the reference biases: ``concat(q_bias, 0, v_bias)`` —
    keys never have a bias (ARCHITECTURE §1.3)."""

    dim: int
    num_heads: int
    init: Initializer
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.dim
        qkv = dense(3 * a, name="qkv", init=self.init, axes=("embed", "hidden"), use_bias=False, dtype=self.dtype)(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        if self.qkv_bias:
            q = q + self.param("q_bias", _p(nn.initializers.zeros, ("norm",)), (a,)).astype(q.dtype)
            v = v + self.param("v_bias", _p(nn.initializers.zeros, ("norm",)), (a,)).astype(v.dtype)
        out = _attend(q, k, v, self.num_heads, self.attention_impl)
        return dense(self.dim, name="proj", init=self.init, axes=("hidden", "embed"), dtype=self.dtype)(out)


class CrossAttention(nn.Module):
    """The reference ``GeneralAttention``: separate ``q`` and fused ``kv`` kernels, ``q_bias`` on queries, ``v_bias``
    on values, no key bias. ``ctx=None`` makes it self-attention (still with separate q / kv matrices)."""

    dim: int
    num_heads: int
    init: Initializer
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, ctx: jax.Array | None = None) -> jax.Array:
        ctx = x if ctx is None else ctx
        a = self.dim
        q = dense(a, name="q", init=self.init, axes=("embed", "hidden"), use_bias=False, dtype=self.dtype)(x)
        kv = dense(2 * a, name="kv", init=self.init, axes=("embed", "hidden"), use_bias=False, dtype=self.dtype)(ctx)
        k, v = jnp.split(kv, 2, axis=-1)
        if self.qkv_bias:
            q = q + self.param("q_bias", _p(nn.initializers.zeros, ("norm",)), (a,)).astype(q.dtype)
            v = v + self.param("v_bias", _p(nn.initializers.zeros, ("norm",)), (a,)).astype(v.dtype)
        out = _attend(q, k, v, self.num_heads, self.attention_impl)
        return dense(self.dim, name="proj", init=self.init, axes=("hidden", "embed"), dtype=self.dtype)(out)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2 (ARCHITECTURE §1.5)."""

    hidden: int
    out: int
    init: Initializer
    dtype: Any = jnp.float32
    out_axis: str | None = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = dense(self.hidden, name="fc1", init=self.init, axes=("embed", "hidden"), dtype=self.dtype)(x)
        x = nn.gelu(x, approximate=False)
        return dense(self.out, name="fc2", init=self.init, axes=("hidden", self.out_axis), dtype=self.dtype)(x)


class DropPath(nn.Module):
    """Stochastic depth with timm 0.4.12 semantics: one keep/drop per row of ``group`` consecutive leading rows.

    ``group=1`` drops per element of the leading dimension (the reference); ``group=R`` on a ``[B*R, ...]`` tensor
    drops per sample (QUIRKS Q13 corrected option). Identity when ``deterministic`` or ``rate == 0``.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, group: int = 1) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        n = x.shape[0] // group
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, (n,))
        keep = jnp.repeat(keep, group)
        keep = keep.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


class Block(nn.Module):
    """Plain pre-norm transformer block (ARCHITECTURE §1.7): keys norm1, attn, norm2, mlp."""

    dim: int
    num_heads: int
    mlp_ratio: float
    init: Initializer
    drop_path: float = 0.0
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        dp = DropPath(self.drop_path)
        attn = Attention(self.dim, self.num_heads, self.init, self.qkv_bias, self.dtype, self.attention_impl,
                         name="attn")
        x = x + dp(attn(layer_norm("norm1", self.dtype)(x)), deterministic)
        mlp = Mlp(int(self.dim * self.mlp_ratio), self.dim, self.init, self.dtype, name="mlp")
        return x + dp(mlp(layer_norm("norm2", self.dtype)(x)), deterministic)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """linspace(0, rate, depth), computed in float32 like torch (block 15 of 16 at 0.1 -> 0.10000000149)."""
    return [float(v) for v in np.linspace(0, rate, depth, dtype=np.float32)]


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x: [B, N, C]``, ``idx: [B, M]`` -> ``[B, M, C]``."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)
