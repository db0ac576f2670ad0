"""Tiny, randomly initialised language models and a real (trained-in-code) tokenizer for tests.

No downloads: the tokenizer is a byte-level BPE trained on a few sentences; models are built from configs.
"""

import json
import os
import random
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dogs",
    "ran",
    "across",
    "green",
    "fields",
    "and",
    "birds",
    "sang",
    "over",
    "quiet",
    "rivers",
    "near",
    "old",
    "towns",
    "where",
    "people",
    "read",
    "books",
    "about",
    "stars",
    "planets",
    "oceans",
    "mountains",
    "trains",
    "and",
    "small",
    "machines",
]


def make_text(n_docs: int, seed: int = 0, words_per_doc: tuple[int, int] = (20, 80)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words_per_doc))) for _ in range(n_docs)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_text(200, seed=123), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_model(kind: str = "llama", n_layers: int = 3, d: int = 32, vocab: int = 300, seed: int = 0):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
        model = LlamaForCausalLM(cfg)
    elif kind == "neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=1,
        )
        model = GPTNeoXForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=d,
            n_layer=n_layers,
            n_head=4,
            n_positions=512,
            bos_token_id=0,
            eos_token_id=1,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


def save_tiny_model(path: Path, kind: str = "llama", n_layers: int = 3, d: int = 32) -> Path:
    tiny_model(kind, n_layers, d).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def child_env(**overrides: str) -> dict[str, str]:
    """os.environ for a child Python that imports this checkout: the repo goes first on PYTHONPATH and
    whatever PYTHONPATH already held (e.g. packages installed with --target) is kept."""
    keep = os.environ.get("PYTHONPATH")
    path = os.pathsep.join([str(ROOT)] + ([keep] if keep else []))
    return {**os.environ, "PYTHONPATH": path, **overrides}


class _SharedCacheBlock(torch.nn.Module):
    """A block that caches its first input of each forward on a shared object (like a KV cache holding the
    first pass's keys), or one that adds that cached input to its output."""

    def __init__(self, block, shared, writes: bool):
        super().__init__()
        self.block, self.shared, self.writes = block, shared, writes

    def forward(self, hidden_states, *args, **kwargs):
        if self.writes and self.shared.memory is None:
            self.shared.memory = hidden_states
        out = self.block(hidden_states, *args, **kwargs)
        if self.writes:
            return out
        extra = 0.5 * self.shared.memory
        return (out[0] + extra, *out[1:]) if isinstance(out, tuple) else out + extra


def shared_cache_model(n_layers: int = 3, d: int = 32):
    """A tiny Llama whose block 1 caches its input on a shared object that block 2 reads, emptied at the start
    of every forward: replayed from a clean forward, block 2 still reads the clean input of block 1."""
    from types import SimpleNamespace

    model = tiny_model("llama", n_layers=n_layers, d=d)
    shared = SimpleNamespace(memory=None)
    model.model.register_forward_pre_hook(lambda *_: setattr(shared, "memory", None))
    layers = model.model.layers
    layers[1] = _SharedCacheBlock(layers[1], shared, writes=True)
    layers[2] = _SharedCacheBlock(layers[2], shared, writes=False)
    return model
