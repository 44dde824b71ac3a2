"""Named reference models, built once per process.

Building the weights takes a few tens of milliseconds and every node, test and
verifier in a process wants the same object (and its cached model hash), so
``load_reference`` hands out one shared instance per (name, dtype). Models are
immutable after construction; each request gets its own ``Session``.
"""

from __future__ import annotations

import threading

import numpy as np

from .model import ModelConfig, ReferenceModel
from .tokenizer import ByteTokenizer

__all__ = ["REFERENCE_CONFIGS", "is_byte_level", "load_reference"]

_TOKENIZER = ByteTokenizer()

REFERENCE_CONFIGS: dict[str, ModelConfig] = {
    # Sized for well over 200 decode tokens/s on one CPU core in numpy.
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=_TOKENIZER.vocab_size,
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=384,
        max_seq_len=2048,
        rope_theta=10000.0,
        norm_eps=1e-5,
        weight_seed=2,
    ),
    # A second, smaller model of another shape and seed: a host serving several
    # models (``node serve --model tiny --model nano``) is tested with two that differ.
    "nano": ModelConfig(
        name="nano",
        vocab_size=_TOKENIZER.vocab_size,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=192,
        max_seq_len=1024,
        rope_theta=10000.0,
        norm_eps=1e-5,
        weight_seed=3,
    ),
}

_models: dict[tuple[str, np.dtype], ReferenceModel] = {}
_lock = threading.Lock()


def load_reference(name: str = "tiny", dtype: type = np.float32) -> tuple[ReferenceModel, ByteTokenizer]:
    """The shared (model, tokenizer) pair for a named reference model."""
    if name not in REFERENCE_CONFIGS:
        raise LookupError(f"unknown reference model {name!r}; known: {', '.join(sorted(REFERENCE_CONFIGS))}")
    key = (name, np.dtype(dtype))
    with _lock:
        if key not in _models:
            _models[key] = ReferenceModel(REFERENCE_CONFIGS[name], _TOKENIZER, dtype=dtype)
        return _models[key], _TOKENIZER


_byte_level_hashes: frozenset[str] | None = None


def is_byte_level(model_hash: str) -> bool:
    """Whether ``model_hash`` is a reference model's (fp32 or fp16): their vocabulary is the byte-level one.

    The hashes are computed once, on first use (the weights are made from
    their seeds), so only a process that asks pays for it.
    """
    global _byte_level_hashes
    if _byte_level_hashes is None:
        _byte_level_hashes = frozenset(load_reference(name, dtype)[0].model_hash
                                       for name in REFERENCE_CONFIGS for dtype in (np.float32, np.float16))
    return model_hash in _byte_level_hashes
