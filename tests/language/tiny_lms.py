"""Tiny random Hugging Face causal LMs built from configs (no download), and token windows for them."""

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the llm extra

VOCAB = 64


def tiny(kind: str, seed: int = 0):
    """A tiny random causal LM of the family ``kind`` ("llama", "opt", "gpt2"), fp32, eval mode."""
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "opt":
        cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
        model = transformers.OPTForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.float().eval()


def windows(n=6, length=16, seed=0):
    from chita_minimal.data.text import token_windows

    g = torch.Generator().manual_seed(seed)
    return token_windows(torch.randint(0, VOCAB, (n * length * 2,), generator=g), None, n, length, seed=seed)
