"""Tiny models and a character-level tokenizer built in code: no hub, no network.

Tests, the demo and the benchmarks all build their models here, so "a tiny Qwen2-style model" means one thing.
Load a saved tokenizer with `PreTrainedTokenizerFast.from_pretrained` and pass it as `processing_class`:
`AutoTokenizer` turns a char-level tokenizer next to a Qwen2 `config.json` into a byte-level one, and spaces vanish.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
DEFAULT_CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " +-*/=()?.,:;!'\n#"


def char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character of `chars` plus pad/bos/eos/unk (ids 0-3)."""
    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(chars)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own "word"; the Fuse decoder joins them back without spaces.
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    tok.padding_side = "left"  # GRPO left-pads prompts
    return tok


def tiny_model(
    vocab_size: int,
    *,
    arch: str = "qwen2",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    tie_embeddings: bool = False,
    max_positions: int = 512,
    seed: int = 0,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> torch.nn.Module:
    """A randomly initialised causal LM (`arch` = "qwen2" or "llama") of a few hundred thousand parameters.

    With vocab_size=151_936, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864 and tied embeddings it
    has Qwen2.5-0.5B's shape (used by the GPU benchmark).
    """
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate or 2 * hidden,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    # A private generator keeps the caller's global RNG untouched and the weights reproducible.
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.bos_token_id = bos_token_id
    return model


def qwen_0_5b_shape(**overrides) -> torch.nn.Module:
    """A randomly initialised model with Qwen2.5-0.5B's shape (vocab 151,936, hidden 896, 24 layers)."""
    shape = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, tie_embeddings=True)
    shape.update(overrides)
    return tiny_model(151_936, **shape)
