"""A converted TensorRT-LLM checkpoint run by torch, op for op as model.py's network computes it:
the same fused/split tensors, the same layouts (qkv rows, 2-D conv kernels over a (b, d, 1, n)
view, the rotary table, the additive key mask, the mask zeroing padded frames). Tests check
it against the reference DiT, which proves the naming table, the converter and the network's
math without TensorRT; on a GPU machine it is the yardstick for an engine built from the same checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from indicf5.backends.trtllm.layout import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS

MASKED_KEY_BIAS = -30000.0  # added to padded keys' scores: softmax gives them 0, and it is finite in fp16


def timestep_frequencies(dim: int) -> torch.Tensor:
    """(dim/2,) fp32: the network's constant for the sinusoidal timestep features."""
    half = dim // 2
    return torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))


def rotary_table(max_positions: int, dim_head: int) -> torch.Tensor:
    """(max_positions, dim_head) fp32 angles, each frequency repeated for its interleaved pair."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim_head, 2, dtype=torch.float32) / dim_head))
    return (torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]).repeat_interleave(2, dim=-1)


class CheckpointExecutor:
    """velocity = executor(x, cond, text_emb, time, input_lengths), the engine's signature."""

    def __init__(self, checkpoint_dir: Path, device: str = "cpu"):
        checkpoint_dir = Path(checkpoint_dir)
        self.config = json.loads((checkpoint_dir / CHECKPOINT_CONFIG).read_text())
        self.w = {k: v.to(device) for k, v in load_file(str(checkpoint_dir / CHECKPOINT_WEIGHTS)).items()}
        c = self.config
        self.freqs = timestep_frequencies(c["freq_embed_dim"]).to(device)
        self.angles = rotary_table(c["max_position_embeddings"], c["dim_head"]).to(device)

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def __call__(self, x, cond, text_emb, time, input_lengths) -> torch.Tensor:
        c, dtype = self.config, x.dtype
        b, n, _ = x.shape
        keep = (torch.arange(n, device=x.device)[None, :] < input_lengths[:, None]).to(dtype)  # (b, n)

        # time: sinusoidal features (fp32) -> MLP
        angles = 1000.0 * time.float()[:, None] * self.freqs[None, :]
        t_freq = torch.cat((angles.sin(), angles.cos()), dim=-1).to(dtype)
        t_emb = self.linear("time_embed.mlp2", F.silu(self.linear("time_embed.mlp1", t_freq)))  # (b, d)

        # input embedding + convolutional positions on a (b, d, 1, n) view, padding zeroed
        h = self.linear("input_embed.proj", torch.cat((x, cond, text_emb), dim=-1))  # (b, n, d)
        keep4 = keep[:, None, None, :]
        p = h.transpose(1, 2).unsqueeze(2)
        for i in (1, 2):
            p = F.mish(
                F.conv2d(
                    p * keep4,
                    self.w[f"input_embed.conv{i}.weight"],
                    self.w[f"input_embed.conv{i}.bias"],
                    padding=(0, c["conv_kernel"] // 2),
                    groups=c["conv_groups"],
                )
            )
        h = h + (p * keep4).squeeze(2).transpose(1, 2)

        rope = self.angles[:n]  # (n, dh)
        key_bias = (1 - keep[:, None, None, :]) * MASKED_KEY_BIAS  # (b, 1, 1, n)
        for i in range(c["num_hidden_layers"]):
            h = self.block(f"blocks.{i}", h, t_emb, rope, key_bias, keep[..., None])

        scale, shift = self.linear("norm_out", F.silu(t_emb)).chunk(2, dim=-1)
        return self.linear("proj_out", F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None])

    def block(self, name, h, t_emb, rope, key_bias, keep):
        c = self.config
        heads, dh = c["num_attention_heads"], c["dim_head"]
        b, n, d = h.shape
        shift, scale, gate, shift_ff, scale_ff, gate_ff = self.linear(f"{name}.attn_norm", F.silu(t_emb)).chunk(
            6, dim=-1
        )
        hn = F.layer_norm(h, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        q, k, v = self.linear(f"{name}.attn.qkv", hn).chunk(3, dim=-1)  # (b, n, d) each
        q, k = (torch.cat((rotate_pairs(t[..., :dh], rope), t[..., dh:]), dim=-1) for t in (q, k))  # first head only
        q, k, v = (t.view(b, n, heads, dh).permute(0, 2, 1, 3) for t in (q, k, v))  # (b, h, n, dh)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh) + key_bias
        attn = torch.matmul(scores.softmax(dim=-1), v).permute(0, 2, 1, 3).reshape(b, n, d)
        h = h + gate[:, None] * self.linear(f"{name}.attn.dense", attn) * keep
        hn = F.layer_norm(h, (d,), eps=1e-6) * (1 + scale_ff[:, None]) + shift_ff[:, None]
        return h + gate_ff[:, None] * self.linear(
            f"{name}.ff.proj", F.gelu(self.linear(f"{name}.ff.fc", hn), approximate="tanh")
        )


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary positions on interleaved channel pairs of x (b, n, dh), in fp32 as the network does."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * angles.cos() + rotated * angles.sin()).to(x.dtype)
