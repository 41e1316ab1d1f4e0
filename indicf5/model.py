"""The IndicF5 transformer: F5-TTS's DiT in its v0 (F5TTS_Base) form, the fp32 yardstick.

One forward pass predicts the flow (velocity) of the mel frames at time t:

    text ids ─TextEmbedding─> text_emb (b, n, text_dim)      computed once per utterance
    x (noisy mel), cond (reference mel, zero past it), text_emb
        ─InputEmbedding─> h (b, n, dim)  ─ depth × DiTBlock(h, modulation, rope) ─> AdaLN ─> proj ─> (b, n, mel)
        (each block also applies the next block's AdaLN, or the final one, to its output)
    t ─TimestepEmbedding─> t_emb ─> each block's AdaLN modulation          `condition`: t alone

Parameter names follow upstream's state dict exactly (``time_embed.time_mlp.0``, ``ff.ff.0.0`` ...)
so IndicF5's checkpoint loads as it is. Classifier-free guidance is not the model's business: the
sampler batches the conditional and unconditional rows (see sampler.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from indicf5.config import ModelConfig

TEXT_MAX_POS = 4096  # IndicF5's precomputed text positions (~43.7 s); later positions reuse the last


# ---------------------------------------------------------------------------------------------
# positions


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Timestep embedding: (b,) -> (b, dim) as [sin | cos]; computed in fp32, cast to t's dtype."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angles = scale * t.float()[:, None] * freqs[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=-1).to(t.dtype)


def text_position_table(dim: int, length: int, theta: float = 10000.0) -> torch.Tensor:
    """Absolute positions added to the text embedding: (length, dim) as [cos | sin]."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angles = torch.outer(torch.arange(length).float(), freqs)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def rope_inv_freq(dim_head: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim_head, 2).float() / dim_head))


def rope_angles(seq_len: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """(n, dim_head) angles, each frequency repeated for its (even, odd) channel pair."""
    angles = torch.arange(seq_len, device=inv_freq.device).float()[:, None] * inv_freq[None, :]
    return angles.repeat_interleave(2, dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (..., d) by angles broadcast to it; math in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * angles.cos() + rotated * angles.sin()).to(x.dtype)


def rotate_first_head(q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions on the first head of q and k (b, n, h, dh); rope (n, dh) angles."""
    angles = rope[:, None, :]  # (n, 1, dh): the same for every head it is applied to
    return tuple(torch.cat((apply_rope(t[:, :, :1], angles), t[:, :, 1:]), dim=2) for t in (q, k))


# ---------------------------------------------------------------------------------------------
# text


def zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (b, n, d) with the frames past each row's length (mask (b, n) False) set to 0."""
    return x if mask is None else x.masked_fill(~mask[..., None], 0.0)


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt-V2), taken over the sequence axis."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # (b, n, d)
        gx = torch.norm(zero_padding(x, mask), p=2, dim=1, keepdim=True)  # (b, 1, d): each row's real frames
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.grn = GRN(hidden)
        self.pwconv2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # (b, n, d)
        h = self.dwconv(zero_padding(x, mask).transpose(1, 2)).transpose(1, 2)  # a row's end sees zeros, as alone
        h = self.pwconv2(self.grn(F.gelu(self.pwconv1(self.norm(h))), mask))
        return x + h


class TextEmbedding(nn.Module):
    """Character ids -> per-frame text features, padded with the filler token to the mel length."""

    def __init__(self, vocab_size: int, dim: int, conv_layers: int):
        super().__init__()
        self.text_embed = nn.Embedding(vocab_size + 1, dim)  # row 0 is the filler token
        self.register_buffer("positions", text_position_table(dim, TEXT_MAX_POS), persistent=False)
        self.text_blocks = nn.ModuleList([ConvNeXtV2Block(dim, dim * 2) for _ in range(conv_layers)])

    def forward(self, text: torch.Tensor, seq_len: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """text: (b, nt) ids with -1 for batch padding (all -1 is the unconditional text). With
        `mask` (b, seq_len), True on each row's first frames, every row comes out as embedded
        alone at its own length (the convolutions and GRN see none of the rest), zero past it."""
        ids = (text + 1)[:, :seq_len]  # -1 -> filler 0; text longer than the audio is cut
        ids = F.pad(ids, (0, seq_len - ids.shape[1]), value=0)
        h = self.text_embed(ids)  # (b, n, text_dim)
        pos = torch.arange(seq_len, device=h.device).clamp(max=TEXT_MAX_POS - 1)
        h = h + self.positions[pos].to(h.dtype)
        for block in self.text_blocks:
            h = block(h, mask)
        return zero_padding(h, mask)


# ---------------------------------------------------------------------------------------------
# audio input


class ConvPositionEmbedding(nn.Module):
    """Two grouped convolutions (kernel 31) with Mish; padded frames are zeroed before each."""

    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16):
        super().__init__()
        conv = lambda: nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=kernel_size // 2)
        self.conv1d = nn.Sequential(conv(), nn.Mish(), conv(), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x.transpose(1, 2)  # (b, d, n)
        keep = None if mask is None else mask[:, None, :]
        for layer in self.conv1d:
            if keep is not None and isinstance(layer, nn.Conv1d):
                h = h.masked_fill(~keep, 0.0)
            h = layer(h)
        if keep is not None:
            h = h.masked_fill(~keep, 0.0)
        return h.transpose(1, 2)


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(mel_dim * 2 + text_dim, dim)
        self.conv_pos_embed = ConvPositionEmbedding(dim)

    def forward(self, x, cond, text_emb, mask=None):
        h = self.proj(torch.cat((x, cond, text_emb), dim=-1))
        return h + self.conv_pos_embed(h, mask)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (b,) -> (b, dim)
        return self.time_mlp(sinusoidal_embedding(t, self.freq_dim))


# ---------------------------------------------------------------------------------------------
# transformer


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine weights) modulated by the time: x (b, n, d); shift, scale (b, d)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """The time embedding -> a block's modulation: shift, scale and gate for attention, then for the MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * 6)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:  # (b, d) -> (b, 6, d)
        return self.linear(F.silu(t_emb)).unflatten(-1, (6, -1))


class AdaLayerNormFinal(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * 2)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:  # (b, d) -> (b, 2, d): scale, then shift (unlike above)
        return self.linear(F.silu(t_emb)).unflatten(-1, (2, -1))


def sdpa_attend(q, k, v, mask=None):
    """Attention over (b, n, h, dh) tensors; padded keys (mask False) are not attended."""
    key_mask = None if mask is None else mask[:, None, None, :]
    h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask)
    return h.transpose(1, 2)


class Attention(nn.Module):
    """Self-attention; rotary positions on the first head only (F5TTS_Base's pe_attn_head=1)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, heads * dim_head)
        self.to_k = nn.Linear(dim, heads * dim_head)
        self.to_v = nn.Linear(dim, heads * dim_head)
        self.to_out = nn.ModuleList([nn.Linear(heads * dim_head, dim)])

    def forward(self, x, rope, mask=None):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, self.dim_head) for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        q, k = rotate_first_head(q, k, rope)  # (b, n, h, dh)
        h = self.to_out[0](sdpa_attend(q, k, v, mask).reshape(b, n, -1))
        return h if mask is None else h.masked_fill(~mask[..., None], 0.0)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        # nested so the names read ff.0.0 / ff.2 as in upstream's checkpoints
        self.ff = nn.Sequential(
            nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(approximate="tanh")),
            nn.Identity(),
            nn.Linear(dim * mult, dim),
        )

    def forward(self, x):
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x, normed, modulation, next_norm, rope, mask=None):
        """x (b, n, d) the residual stream and `normed` its normalised, modulated copy for this
        block's attention; modulation (b, 6, d): self.attn_norm(t_emb); next_norm the (shift,
        scale) of the norm after this block -> (x, x normalised by next_norm).

        Each block normalises the next one's input (upstream does it at the next block's start):
        the same math, and an engine that compiles one block fuses that norm into the block's last
        pass over x."""
        _, _, gate, shift_ff, scale_ff, gate_ff = modulation.unbind(1)
        x = x + gate[:, None] * self.attn(normed, rope, mask)
        x = x + gate_ff[:, None] * self.ff(modulated_norm(x, shift_ff, scale_ff))
        return x, modulated_norm(x, *next_norm)


class DiT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.time_embed = TimestepEmbedding(c.dim)
        self.text_embed = TextEmbedding(c.text_num_embeds, c.text_dim, c.conv_layers)
        self.input_embed = InputEmbedding(c.mel_dim, c.text_dim, c.dim)
        self.rotary_embed = nn.Module()
        self.rotary_embed.register_buffer("inv_freq", rope_inv_freq(c.dim_head))  # saved in checkpoints
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(c.dim, c.heads, c.dim_head, c.ff_mult) for _ in range(c.depth)]
        )
        self.norm_out = AdaLayerNormFinal(c.dim)
        self.proj_out = nn.Linear(c.dim, c.mel_dim)

    def embed_text(self, text: torch.Tensor, seq_len: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(b, nt) ids -> (b, seq_len, text_dim), each row at its length if `mask` (b, seq_len)
        says. Constant over the ODE steps: compute it once."""
        return self.text_embed(text, seq_len, mask)

    def condition(self, time: torch.Tensor) -> list[torch.Tensor]:
        """All the step needs of the time: each block's (b, 6, d) modulation, then the final
        norm's (b, 2, d). It depends on t alone, so an engine may compute it for a whole time grid
        at once (rows = steps) and hand `flow` one step's rows."""
        t_emb = self.time_embed(time)
        return [block.attn_norm(t_emb) for block in self.transformer_blocks] + [self.norm_out(t_emb)]

    def flow(self, x, cond, text_emb, condition: list[torch.Tensor], mask=None) -> torch.Tensor:
        """The step over the frames, given `condition(time)` (rows of 1 broadcast over the batch).
        `mask` only passes through to the blocks' attention and the position convolutions: an
        engine that replaces those may pass what its own modules take instead."""
        h = self.input_embed(x, cond, text_emb, mask)
        rope = rope_angles(x.shape[1], self.rotary_embed.inv_freq)
        scale, shift = condition[-1].unbind(1)
        norms = [modulation.unbind(1)[:2] for modulation in condition[:-1]] + [
            (shift, scale)
        ]  # (shift, scale) of each norm
        normed = modulated_norm(h, *norms[0])
        for block, modulation, next_norm in zip(self.transformer_blocks, condition, norms[1:]):
            h, normed = block(h, normed, modulation, next_norm, rope, mask)
        return self.proj_out(normed)

    def forward(
        self,
        x: torch.Tensor,  # (b, n, mel) noisy mel at time t
        cond: torch.Tensor,  # (b, n, mel) reference mel, zero where generated (and for uncond rows)
        text_emb: torch.Tensor,  # (b, n, text_dim) from embed_text
        time: torch.Tensor,  # (b,) or () flow time in [0, 1]
        mask: torch.Tensor | None = None,  # (b, n) True on real frames, for batches of mixed length
    ) -> torch.Tensor:
        return self.flow(x, cond, text_emb, self.condition(time.expand(x.shape[0]) if time.ndim == 0 else time), mask)
