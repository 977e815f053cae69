"""Shared fixtures: tiny transformers models built from configs (odd, distinct sizes), saved to temp
folders when a test needs a path. Nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_opt(seed: int = 0, attn: str = "eager", vocab: int = 61, hidden: int = 22, layers: int = 2, ffn: int = 37):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=hidden,
                    attn_implementation=attn, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return OPTForCausalLM(cfg).eval()


def tiny_llama(seed: int = 0, attn: str = "eager", vocab: int = 67, hidden: int = 24, layers: int = 2, ffn: int = 41):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      attn_implementation=attn, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, attn: str = "eager", vocab: int = 59, hidden: int = 26, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=2, n_positions=64,
                     attn_implementation=attn, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, vocab: int = 71, hidden: int = 18, layers: int = 2, ffn: int = 29, labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                     num_attention_heads=2, max_position_embeddings=64, num_labels=labels,
                     attn_implementation="eager")
    return BertForSequenceClassification(cfg).eval()


BUILDERS = {"opt": tiny_opt, "llama": tiny_llama, "gpt2": tiny_gpt2}


def ids_for(model, batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)


@pytest.fixture
def opt():
    return tiny_opt()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- shared by the parity tests ----------------------------------------------------------------------
PARITY_TOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str = "logits", tol: float = PARITY_TOL) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:g}"


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and much steadier on a busy machine, than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
