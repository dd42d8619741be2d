"""A thin decoder-only transformer (Llama / Qwen2 / Qwen3 / Ministral-3) whose attention is the tidar ops.

One forward path serves every TiDAR mode. The caller gives token ids, explicit
position ids and an :class:`AttentionContext` that says which tidar op each layer
calls (and with which cache):

=================  ============================  ===================================
mode               op                            used by
=================  ============================  ===================================
causal             ``causal_attention``          likelihood, training of AR models
training           ``training_attention``        TiDAR training
prefill            ``prefill_attention``         TiDAR prefill
decode             ``decode_attention``          TiDAR decode step
append             ``append_attention``          AR prefill and AR decode step
=================  ============================  ===================================

Each mode's layout and mask: ``docs/semantics.md``.
No dense mask is ever built here: the ops take the mask rule from
:mod:`tidar_kernels.kernels.mask`. :meth:`Transformer.forward` returns the final hidden
states; :meth:`Transformer.lm_head` turns only the rows a caller needs into
logits (a decode step of ``k + k*k`` rows needs ``3k - 1`` of them).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ops
from ..kernels.mask import Layout, check_training_shape, training_position_ids
from ..kernels.validation import check_positive
from . import cpu_linear
from .adapters import apply_adapter, embed
from .kv_cache import KVCache



@dataclass(frozen=True)
class YarnRope:
    """YaRN's RoPE frequencies (Ministral-3 and its diffusion checkpoints), from a config's ``rope_parameters``.

    Each frequency pair ``i`` blends the plain frequency ``theta**(-2i/D)``
    (extrapolation, kept for fast-rotating pairs) with it divided by ``factor``
    (interpolation, for pairs that turn less than once over the training context):
    a linear ramp between the pair dimensions at which the plain frequency makes
    ``beta_fast`` and ``beta_slow`` turns over ``original_max_position_embeddings``
    (rounded outwards when ``truncate``). cos and sin are multiplied by
    :attr:`attention_scaling`: ``attention_factor`` when given, else
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are non-zero,
    else ``mscale(factor, 1)``, with ``mscale(s, m) = 0.1 m ln s + 1`` (1 for ``s <= 1``).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = None
    truncate: bool = True

    def __post_init__(self):
        for name in ("factor", "beta_fast", "beta_slow"):
            if isinstance(getattr(self, name), bool) or not getattr(self, name) > 0:
                raise ValueError(f"yarn {name} must be > 0, got {getattr(self, name)!r}")
        original = self.original_max_position_embeddings
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise ValueError(f"yarn original_max_position_embeddings must be an integer >= 1, got {original!r}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"yarn attention_factor must be > 0 or None, got {self.attention_factor!r}")

    @property
    def attention_scaling(self) -> float:
        """The factor cos and sin are multiplied by (class docstring)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return float(mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim))
        return mscale(self.factor)

    def inv_freq(self, wavelengths: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
        """The blended frequencies ``[D/2]`` (fp32) from ``wavelengths = theta**(2i/D)`` (radians per turn)."""

        def pair_dim(turns: float) -> float:  # the (fractional) pair dimension turning `turns` times
            return head_dim * math.log(self.original_max_position_embeddings / (turns * 2 * math.pi)) / (
                2 * math.log(theta))

        low, high = pair_dim(self.beta_fast), pair_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # a step instead of a ramp
        pairs = torch.arange(head_dim // 2, dtype=torch.float32, device=wavelengths.device)
        keep = 1 - ((pairs - low) / (high - low)).clamp(0, 1)  # weight of the plain (extrapolated) frequency
        return 1.0 / (self.factor * wavelengths) * (1 - keep) + 1.0 / wavelengths * keep


@dataclass
class TransformerConfig:
    """Shape and flavour of the transformer.

    ``vocab_size`` counts every row of the embedding, the mask token included.
    ``mask_token_id`` is TiDAR's ``[M]`` (None for a plain AR model: it then
    cannot draft). ``qkv_bias`` is Qwen2's bias on the q/k/v projections and
    ``qk_norm`` Qwen3's per-head RMSNorm of q and k before RoPE. ``max_seq_len`` is
    the context the checkpoint was trained for (metadata: RoPE takes any position
    and the decode loop sizes its cache per call).

    Ministral-3: ``yarn`` (a :class:`YarnRope`, or its fields as a dict) replaces
    plain RoPE frequencies, and ``query_scale_beta`` > 0 multiplies each query, after
    RoPE, by Llama 4's ``1 + beta * ln(1 + floor(pos / query_scale_length))`` at
    its own position. ``trained_block_size`` is the diffusion block a checkpoint was
    trained with (the largest draft length worth trying), None when unknown.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = False
    mask_token_id: Optional[int] = None
    max_seq_len: int = 4096
    yarn: Optional[YarnRope] = None
    query_scale_beta: float = 0.0
    query_scale_length: Optional[int] = None
    trained_block_size: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.yarn, dict):  # from to_dict / JSON
            self.yarn = YarnRope(**self.yarn)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
                     "max_seq_len"):
            check_positive(name, getattr(self, name))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id must lie in [0, vocab_size={self.vocab_size}) or be None, "
                             f"got {self.mask_token_id}")
        if self.yarn is not None and not isinstance(self.yarn, YarnRope):
            raise ValueError(f"yarn must be a YarnRope, its fields as a dict, or None, got {type(self.yarn).__name__}")
        if not self.query_scale_beta >= 0:
            raise ValueError(f"query_scale_beta must be >= 0, got {self.query_scale_beta!r}")
        for name in ("query_scale_length", "trained_block_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if self.query_scale_beta and self.query_scale_length is None:
            raise ValueError(f"query_scale_length must be set when query_scale_beta is {self.query_scale_beta} "
                             "(the position period of the query scale), got None")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "TransformerConfig":
        """A named configuration (see :data:`CONFIGS`), with optional field overrides."""
        if name not in CONFIGS:
            raise ValueError(f"name must be one of {sorted(CONFIGS)}, got {name!r}")
        return dataclasses.replace(CONFIGS[name], **overrides)

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (the ``config`` entry of our checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TransformerConfig":
        """Inverse of :meth:`to_dict`; unknown fields are an error (missing ones take their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**values)


# Shapes of the published models. Qwen's vocabularies (151936 rows) are larger
# than their tokenizers (151665 tokens), so the mask token takes the first unused
# row; SmolLM2 has no spare row and gets one appended (id 49152) by the loader.
CONFIGS: dict[str, TransformerConfig] = {
    "tiny": TransformerConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                              intermediate_size=160, mask_token_id=96, max_seq_len=512),
    "small": TransformerConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32,
                               intermediate_size=688, mask_token_id=4095, max_seq_len=2048),
    "smollm2-135m": TransformerConfig(vocab_size=49153, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                                      intermediate_size=1536, rope_theta=100000.0, norm_eps=1e-5,
                                      tie_embeddings=True, mask_token_id=49152, max_seq_len=8192),
    "qwen2.5-1.5b": TransformerConfig(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                                      head_dim=128, intermediate_size=8960, rope_theta=1000000.0, norm_eps=1e-6,
                                      qkv_bias=True, tie_embeddings=True, mask_token_id=151665,
                                      max_seq_len=32768),
    "qwen3-8b": TransformerConfig(vocab_size=151936, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128,
                                  intermediate_size=12288, rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True,
                                  mask_token_id=151669, max_seq_len=40960),
    "qwen3-32b": TransformerConfig(vocab_size=151936, dim=5120, n_layers=64, n_heads=64, n_kv_heads=8,
                                   head_dim=128, intermediate_size=25600, rope_theta=1000000.0, norm_eps=1e-6,
                                   qk_norm=True, mask_token_id=151669, max_seq_len=40960),
}


@dataclass(frozen=True)
class AttentionContext:
    """Which tidar op every layer calls, and the state that op needs.

    ``block_size`` is ``B`` (training) or the draft length ``k`` (prefill,
    decode). ``cache`` is a :class:`tidar_kernels.model.kv_cache.KVCache` or
    :class:`~tidar_kernels.model.kv_cache.PagedKVCache` (its ``block_table`` goes to the ops): required by
    PREFILL and DECODE, optional for CAUSAL (with a cache: the AR prefill and AR
    step), never with TRAINING. ``prompt_lens`` (int32 ``[batch]``) are the real
    prompt lengths of a right-padded prefill. Cached calls pass
    ``check_lengths=False``: the decode loop sizes its cache once up front, so a
    step never synchronises with the host.

    ``read_only`` (PREFILL only, without ``prompt_lens``): the forward is one bidirectional
    block of ``block_size`` rows over the committed cache that writes none of it
    (:func:`tidar_kernels.kernels.ops.block_attention`: linear self-speculation's draft).
    ``adapter_from``: the first row on which attached adapters
    (:mod:`tidar_kernels.model.adapters`) apply, 0 for the whole forward; None: off.
    """

    layout: Layout
    block_size: int = 1
    cache: Optional["KVCache"] = None
    prompt_lens: Optional[torch.Tensor] = None
    read_only: bool = False
    adapter_from: Optional[int] = None

    def __post_init__(self):
        if self.adapter_from is not None and (isinstance(self.adapter_from, bool) or not isinstance(
                self.adapter_from, int) or self.adapter_from < 0):
            raise ValueError(f"adapter_from must be an integer >= 0 or None, got {self.adapter_from!r}")
        if self.read_only:
            if self.layout != Layout.PREFILL or self.cache is None or self.prompt_lens is not None:
                raise ValueError("read_only must come with layout PREFILL, a cache and no prompt_lens (one "
                                 f"block over the cache), got layout {self.layout.name}")
            return
        needs_cache = self.layout in (Layout.PREFILL, Layout.DECODE)
        if needs_cache and self.cache is None:
            raise ValueError(f"cache must be a KVCache for layout {self.layout.name}, got None")
        if self.layout == Layout.TRAINING and self.cache is not None:
            raise ValueError("cache must be None for layout TRAINING (training attends within the batch only)")
        if (self.layout == Layout.PREFILL) != (self.prompt_lens is not None):
            raise ValueError(f"prompt_lens must be given exactly for layout PREFILL, got layout "
                             f"{self.layout.name} with prompt_lens {'set' if self.prompt_lens is not None else 'None'}")

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output ``[B, T, q_heads, head_dim]`` of ``layer`` through this context's tidar op."""
        if self.cache is None:
            if self.layout == Layout.TRAINING:
                return ops.training_attention(q, k, v, self.block_size)
            return ops.causal_attention(q, k, v)
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        seqlens, table = self.cache.seqlens, self.cache.block_table  # table: None unless the cache is paged
        if self.layout == Layout.DECODE:
            return ops.decode_attention(q, k, v, k_cache, v_cache, seqlens, self.block_size, check_lengths=False,
                                        block_table=table)
        if self.read_only:
            return ops.block_attention(q, k, v, k_cache, v_cache, seqlens, check_lengths=False, block_table=table)
        if self.layout == Layout.PREFILL:
            return ops.prefill_attention(q, k, v, k_cache, v_cache, seqlens, self.prompt_lens, self.block_size,
                                         check_lengths=False, block_table=table)
        return ops.append_attention(q, k, v, k_cache, v_cache, seqlens, check_lengths=False, block_table=table)


CAUSAL = AttentionContext(Layout.CAUSAL)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in fp32 like the reference implementations."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(NamedTuple):
    """What RoPE applies at a forward's positions, computed once for all layers.

    ``cos``/``sin [B, T, 1, D]`` in the activation dtype (YaRN's attention scaling
    included); ``query_scale [B, T, 1, 1]`` (None when the model has none).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    query_scale: Optional[torch.Tensor]


def rope_inv_freq(config: TransformerConfig, device=None) -> torch.Tensor:
    """RoPE's per-pair frequencies ``[head_dim/2]`` in fp32: ``1 / theta**(2i/D)``, YaRN-blended when set."""
    head_dim, theta = config.head_dim, config.rope_theta
    wavelengths = theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    return 1.0 / wavelengths if config.yarn is None else config.yarn.inv_freq(wavelengths, head_dim, theta)


def rotary_tables(config: TransformerConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> Rotary:
    """:class:`Rotary` of ``position_ids [B, T]`` (explicit: in TiDAR's layouts rows and positions differ).

    Angles ``pos * inv_freq`` in fp32; the query scale uses each row's own position.
    """
    angles = position_ids.float()[..., None] * rope_inv_freq(config, position_ids.device)  # [B, T, D/2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [B, T, 1, D]
    scaling = 1.0 if config.yarn is None else config.yarn.attention_scaling
    cos, sin = (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)
    query_scale = None
    if config.query_scale_beta:
        periods = torch.div(position_ids, config.query_scale_length, rounding_mode="floor").float()
        query_scale = (1 + config.query_scale_beta * torch.log(1 + periods)).to(dtype)[:, :, None, None]
    return Rotary(cos, sin, query_scale)


def apply_rotary(x: torch.Tensor, tables: Rotary) -> torch.Tensor:
    """RoPE of ``x [B, T, H, D]`` in the "rotate half" layout of Hugging Face checkpoints.

    Dimension ``i < D/2`` is paired with ``i + D/2``; the pair is rotated by its angle.
    """
    first, second = x.chunk(2, dim=-1)
    return x * tables.cos + torch.cat([-second, first], dim=-1) * tables.sin


class Attention(nn.Module):
    """Grouped-query attention with RoPE at explicit positions (optional qkv bias, qk-norm, query scale)."""

    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        c = config
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None

    def forward(self, x: torch.Tensor, rope: Rotary, context: AttentionContext) -> torch.Tensor:
        c = self.config
        batch, seq, _ = x.shape
        on = context.adapter_from
        q = apply_adapter(self.wq, x, on).view(batch, seq, c.n_heads, c.head_dim)
        k = apply_adapter(self.wk, x, on).view(batch, seq, c.n_kv_heads, c.head_dim)
        v = apply_adapter(self.wv, x, on).view(batch, seq, c.n_kv_heads, c.head_dim)
        if self.q_norm is not None:  # Qwen3: RMSNorm per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if rope.query_scale is not None:  # Ministral-3: after RoPE, at each row's own position
            q = q * rope.query_scale
        out = context.attend(self.layer, q, k, v)  # GQA is the op's business
        return apply_adapter(self.wo, out.reshape(batch, seq, c.n_heads * c.head_dim), on)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)  # down

    def forward(self, x: torch.Tensor, context: AttentionContext = CAUSAL) -> torch.Tensor:
        on = context.adapter_from
        return apply_adapter(self.w2, F.silu(apply_adapter(self.w1, x, on)) * apply_adapter(self.w3, x, on), on)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: ``x + attention(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, rope: Rotary, context: AttentionContext) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, context)
        return x + self.feed_forward(self.ffn_norm(x), context)


class Transformer(nn.Module):
    """Decoder-only transformer (embedding, blocks, final norm, tied or untied LM head)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                context: AttentionContext = CAUSAL) -> torch.Tensor:
        """Final (normed) hidden states ``[B, T, dim]`` of ``input_ids [B, T]`` at ``position_ids [B, T]``.

        ``context`` picks the attention op of every layer (see the module docstring).
        Logits are :meth:`lm_head`'s job, for the rows the caller needs.
        """
        _check_ids("input_ids", input_ids, self.config.vocab_size)
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(position_ids.shape)}")
        x = embed(self.tok_embeddings, input_ids, context.adapter_from)
        rope = rotary_tables(self.config, position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, context)
        return self.norm(x)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., vocab]`` of hidden states ``[..., dim]`` (tied or untied head)."""
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return cpu_linear.linear(hidden, weight)

    def forward_causal(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Likelihood mode (docs/semantics.md#append-and-likelihood): logits ``[B, T, V]``, plain causal, no cache."""
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand(input_ids.shape)
        return self.lm_head(self(input_ids, positions, CAUSAL))

    def forward_training(self, input_ids: torch.Tensor, block_size: int,
                         mask_rows_adapter: bool = False) -> torch.Tensor:
        """Training layout (docs/semantics.md#training-layout): logits ``[B, 2S, V]`` of ``[S clean | S mask]`` tokens.

        The caller builds ``input_ids`` (second half all ``mask_token_id``);
        position ids are ``[0..S-1, 0..S-1]``. ``mask_rows_adapter``: attached adapters
        (:mod:`tidar_kernels.model.adapters`) run on the mask half, rows ``[S, 2S)``, only.
        """
        _check_ids("input_ids", input_ids, self.config.vocab_size)
        if input_ids.shape[1] % 2:
            raise ValueError(f"input_ids.shape[1] must be 2*S (S clean + S mask tokens), got {input_ids.shape[1]}")
        seq_len = input_ids.shape[1] // 2
        check_training_shape(seq_len, block_size)
        positions = training_position_ids(seq_len).to(input_ids.device).expand(input_ids.shape)
        context = AttentionContext(Layout.TRAINING, block_size, adapter_from=seq_len if mask_rows_adapter else None)
        return self.lm_head(self(input_ids, positions, context))


def _check_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an int64 tensor [batch, seq], got {got}")
    if ids.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one token per sequence, got shape {tuple(ids.shape)}")
