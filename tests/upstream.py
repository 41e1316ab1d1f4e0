"""Upstream F5-TTS (PyPI ``f5-tts``) as a test-only oracle.

Its ``f5_tts.model`` package imports the trainer (wandb, datasets, ...), so the DiT and CFM modules
are imported through a bare package module, with stand-ins for the tokenizer and librosa modules
that the DiT and the sampler never call.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import pytest


def _stub(name: str, **attrs) -> None:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def _not_used(*_args, **_kwargs):
    raise AssertionError("the oracle should not call this")


def load():
    """Returns (DiT class, CFM class) of upstream F5-TTS, or skips when it is not installed."""
    spec = importlib.util.find_spec("f5_tts")
    if spec is None:
        pytest.skip("f5-tts is not installed (make test installs it)")
    if "f5_tts.model" not in sys.modules:
        package = types.ModuleType("f5_tts.model")
        package.__path__ = [spec.submodule_search_locations[0] + "/model"]
        sys.modules["f5_tts.model"] = package
        # IndicF5 segments with jieba where F5-TTS 1.x uses rjieba; both expose cut(text)
        jieba = importlib.import_module("jieba") if importlib.util.find_spec("jieba") else None
        if jieba is not None:
            jieba.setLogLevel(60)
        _stub("rjieba", cut=(lambda text: list(jieba.cut(text))) if jieba else _not_used)
        if importlib.util.find_spec("pypinyin") is None:
            _stub("pypinyin", lazy_pinyin=_not_used, Style=types.SimpleNamespace(TONE3=3))
        _stub("librosa")
        _stub("librosa.filters", mel=_not_used)
    from f5_tts.model.backbones.dit import DiT
    from f5_tts.model.cfm import CFM

    return DiT, CFM


def char_tokenizer():
    """IndicF5's tokenizer (convert_char_to_pinyin over jieba), or skips without jieba/pypinyin."""
    load()
    if importlib.util.find_spec("jieba") is None or importlib.util.find_spec("pypinyin") is None:
        pytest.skip("jieba and pypinyin are needed for the tokenizer oracle (make test installs them)")
    from f5_tts.model.utils import convert_char_to_pinyin

    return lambda text: convert_char_to_pinyin([text])[0]


def infer_utils():
    """Upstream's inference module (``f5_tts.infer.utils_infer``: reference preparation, chunking,
    infer_process / infer_batch_process), or skips without pydub. Its ASR pipeline is never used."""
    _, cfm = load()
    char_tokenizer()
    if importlib.util.find_spec("pydub") is None:
        pytest.skip("pydub is needed for upstream's reference preparation (make test installs it)")
    sys.modules["f5_tts.model"].CFM = cfm
    _stub("transformers", pipeline=_not_used)
    with warnings.catch_warnings():  # pydub looks for ffmpeg, which WAV files do not need
        warnings.simplefilter("ignore", RuntimeWarning)
        return importlib.import_module("f5_tts.infer.utils_infer")


def f5tts_base_kwargs(config) -> dict:
    """Upstream's F5TTS_Base architecture (IndicF5's) at the given sizes."""
    return dict(
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        dim_head=config.dim_head,
        ff_mult=config.ff_mult,
        text_dim=config.text_dim,
        conv_layers=config.conv_layers,
        mel_dim=config.mel_dim,
        text_num_embeds=config.text_num_embeds,
        text_mask_padding=False,
        pe_attn_head=1,
        attn_mask_enabled=False,
        dropout=0.0,
    )
