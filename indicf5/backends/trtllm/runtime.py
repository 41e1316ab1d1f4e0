"""A built TensorRT-LLM engine as a FlowModel (sampler.py): the text features in torch, once per
utterance (the reference TextEmbedding on the converted text weights), and every flow step on the
engine, both guidance branches in one batch (GuidedVelocity batches them), bound on the current
torch CUDA stream. Batches above the engine's row limit run in slices.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tensorrt_llm._utils import torch_dtype_to_trt, trt_dtype_to_torch
from tensorrt_llm.runtime import Session, TensorInfo

from indicf5.model import TextEmbedding
from indicf5.backends.trtllm.layout import TEXT_WEIGHTS, model_config_of

ENGINE_FILE = "rank0.engine"
ENGINE_CONFIG = "config.json"


class TrtllmEngine:
    def __init__(self, engine_dir: Path, device: str = "cuda"):
        engine_dir = Path(engine_dir)
        config = json.loads((engine_dir / ENGINE_CONFIG).read_text())
        self.config = model_config_of(config["pretrained_config"])
        self.max_rows = config["build_config"]["max_batch_size"]
        self.session = Session.from_serialized_engine((engine_dir / ENGINE_FILE).read_bytes())
        text = load_file(str(engine_dir / TEXT_WEIGHTS))
        c = self.config
        self.text_embed = TextEmbedding(c.text_num_embeds, c.text_dim, c.conv_layers)
        self.text_embed.load_state_dict({k.removeprefix("text_embed."): v.float() for k, v in text.items()})
        dtype = next(iter(text.values())).dtype
        self.text_embed = self.text_embed.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def embed_text(self, text: torch.Tensor, seq_len: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_embed(text, seq_len, mask)

    def __call__(self, x, cond, text_emb, time, mask=None) -> torch.Tensor:
        b, n, _ = x.shape
        lengths = (mask.sum(-1) if mask is not None else torch.full((b,), n, device=x.device)).to(torch.int32)
        time = time.float().expand(b).contiguous()
        return torch.cat(
            [
                self._run(x[s], cond[s], text_emb[s], time[s], lengths[s])
                for s in (slice(i, i + self.max_rows) for i in range(0, b, self.max_rows))
            ]
        )

    def _run(self, x, cond, text_emb, time, lengths) -> torch.Tensor:
        inputs = {
            "x": x.contiguous(),
            "cond": cond.contiguous(),
            "text_emb": text_emb.contiguous(),
            "time": time,
            "input_lengths": lengths,
        }
        infos = self.session.infer_shapes(
            [TensorInfo(k, torch_dtype_to_trt(v.dtype), tuple(v.shape)) for k, v in inputs.items()]
        )
        outputs = {
            i.name: torch.empty(tuple(i.shape), dtype=trt_dtype_to_torch(i.dtype), device=x.device) for i in infos
        }
        if not self.session.run(inputs, outputs, torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("the TensorRT engine failed to run a flow step")
        return outputs["velocity"]
