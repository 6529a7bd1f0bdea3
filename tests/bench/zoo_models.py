"""The zoo's models: Hugging Face architectures built from small configs, random weights.

As in PyTorch's dynamo runner (``benchmarks/dynamo/huggingface.py``), a model is built from its
config class (no download) and trained on random token ids. Every model gets the same shape:
``layers`` blocks of width ``width`` with ``width // 64`` heads and a 4x feed-forward, a
vocabulary of 8192 (the real ones, 30k-50k, would make the output projection the whole cost),
and no dropout (compiled dropout draws other random numbers than eager dropout, which would
make the losses incomparable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Batch = dict[str, torch.Tensor]

VOCAB = 8192


@dataclass(frozen=True)
class Size:
    layers: int = 4
    width: int = 256
    seq_len: int = 128
    batch_size: int = 8

    @property
    def heads(self) -> int:
        return max(1, self.width // 64)


@dataclass(frozen=True)
class ZooModel:
    """One architecture: its HF class, how to configure it, and its task."""

    name: str  # the name on the command line and in the tables
    hf_class: str  # the transformers class trained (the dynamo runner's naming)
    configure: Callable[[Size], Any]
    task: str  # "causal", "masked" or "seq2seq"
    tolerance: float = 1e-2  # the dynamo runner's training tolerance

    def build(self, size: Size) -> torch.nn.Module:
        import transformers

        model: torch.nn.Module = getattr(transformers, self.hf_class)(self.configure(size))
        return model


def _gpt2(s: Size) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB, n_positions=max(512, s.seq_len), n_embd=s.width, n_layer=s.layers,
        n_head=s.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip


def _bert_like(config_class: str) -> Callable[[Size], Any]:
    def configure(s: Size) -> Any:
        import transformers

        return getattr(transformers, config_class)(
            vocab_size=VOCAB, hidden_size=s.width, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, intermediate_size=4 * s.width,
            max_position_embeddings=max(512, s.seq_len + 2), hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip

    return configure


def _distilbert(s: Size) -> Any:
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=VOCAB, dim=s.width, n_layers=s.layers, n_heads=s.heads, hidden_dim=4 * s.width,
        max_position_embeddings=max(512, s.seq_len), dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip


def _t5(s: Size) -> Any:
    from transformers import T5Config

    return T5Config(
        vocab_size=VOCAB, d_model=s.width, d_kv=64, d_ff=4 * s.width, num_layers=s.layers,
        num_decoder_layers=s.layers, num_heads=s.heads, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip


def _bart(s: Size) -> Any:
    from transformers import BartConfig

    return BartConfig(
        vocab_size=VOCAB, d_model=s.width, encoder_layers=s.layers, decoder_layers=s.layers,
        encoder_attention_heads=s.heads, decoder_attention_heads=s.heads,
        encoder_ffn_dim=4 * s.width, decoder_ffn_dim=4 * s.width,
        max_position_embeddings=max(512, s.seq_len), dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=1, decoder_start_token_id=2,
    )  # fmt: skip


def _opt(s: Size) -> Any:
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=VOCAB, hidden_size=s.width, num_hidden_layers=s.layers, ffn_dim=4 * s.width,
        num_attention_heads=s.heads, word_embed_proj_dim=s.width,
        max_position_embeddings=max(512, s.seq_len), dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip


def _llama_like(config_class: str, **extra: Any) -> Callable[[Size], Any]:
    def configure(s: Size) -> Any:
        import transformers

        return getattr(transformers, config_class)(
            vocab_size=VOCAB, hidden_size=s.width, intermediate_size=4 * s.width,
            num_hidden_layers=s.layers, num_attention_heads=s.heads,
            num_key_value_heads=max(1, s.heads // 2), max_position_embeddings=max(512, s.seq_len),
            **extra,
        )  # fmt: skip

    return configure


def _gpt_neox(s: Size) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=s.width, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, intermediate_size=4 * s.width,
        max_position_embeddings=max(512, s.seq_len), hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip


def _phi(s: Size) -> Any:
    from transformers import PhiConfig

    return PhiConfig(
        vocab_size=VOCAB, hidden_size=s.width, intermediate_size=4 * s.width,
        num_hidden_layers=s.layers, num_attention_heads=s.heads,
        max_position_embeddings=max(512, s.seq_len), resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0,
    )  # fmt: skip


MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("gpt2", "GPT2LMHeadModel", _gpt2, "causal"),
        # BertForMaskedLM is in the runner's higher_training tolerance list
        ZooModel("bert", "BertForMaskedLM", _bert_like("BertConfig"), "masked", 2e-2),
        ZooModel("roberta", "RobertaForMaskedLM", _bert_like("RobertaConfig"), "masked"),
        ZooModel("distilbert", "DistilBertForMaskedLM", _distilbert, "masked"),
        ZooModel("electra", "ElectraForMaskedLM", _bert_like("ElectraConfig"), "masked"),
        # MT5ForConditionalGeneration (T5's architecture) is in the higher_training list
        ZooModel("t5", "T5ForConditionalGeneration", _t5, "seq2seq", 2e-2),
        ZooModel("bart", "BartForConditionalGeneration", _bart, "seq2seq"),
        ZooModel("opt", "OPTForCausalLM", _opt, "causal"),
        ZooModel("llama", "LlamaForCausalLM", _llama_like("LlamaConfig"), "causal"),
        ZooModel("mistral", "MistralForCausalLM", _llama_like("MistralConfig"), "causal"),
        ZooModel("qwen2", "Qwen2ForCausalLM", _llama_like("Qwen2Config"), "causal"),
        ZooModel("gpt-neox", "GPTNeoXForCausalLM", _gpt_neox, "causal"),
        ZooModel("phi", "PhiForCausalLM", _phi, "causal"),
    )
}


def batches(model: ZooModel, size: Size, count: int = 4, seed: int = 1) -> list[Batch]:
    """``count`` random batches for ``model``'s task, the same in every process."""
    generator = torch.Generator().manual_seed(seed)
    shape = (size.batch_size, size.seq_len)
    out = []
    for _ in range(count):
        ids = torch.randint(3, VOCAB, shape, generator=generator)
        if model.task == "causal":
            out.append({"input_ids": ids, "labels": ids.clone()})
        elif model.task == "masked":
            scored = torch.rand(shape, generator=generator) < 0.15
            labels = torch.where(scored, ids, torch.full_like(ids, -100))
            out.append({"input_ids": ids, "labels": labels})
        else:
            labels = torch.randint(3, VOCAB, shape, generator=generator)
            out.append({"input_ids": ids, "labels": labels})
    return out
