"""Shared fixtures for treadle-hf tests: tiny Hugging Face models built from config classes
(random weights, nothing downloaded) and token data generated in code.

Other test modules import these builders directly (``from conftest import tiny_gpt2``): keep
the names and signatures stable.
"""

from __future__ import annotations

import torch

VOCAB = 100


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB, dropout: float = 0.0):
    """A 2-layer GPT-2 causal LM with 32-wide embeddings; same seed, same weights. Dropout is
    off unless asked for (GPT-2's own default is 0.1), so runs compare exactly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=vocab,
        n_positions=64,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=1,
        eos_token_id=1,
    )
    return GPT2LMHeadModel(config)


def _tiny_bert_config(vocab: int, **options: object):
    """2 layers, 32 wide, dropout off so runs compare exactly."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        **options,
    )


def tiny_bert_classifier(seed: int = 0, vocab: int = VOCAB, num_labels: int = 2):
    """A 2-layer BERT for sequence classification; dropout off so runs compare exactly."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(_tiny_bert_config(vocab, num_labels=num_labels))


def tiny_bert_mlm(vocab: int = VOCAB, seed: int = 0):
    """A 2-layer BERT masked LM; dropout off so runs compare exactly."""
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(_tiny_bert_config(vocab))


def tiny_t5(seed: int = 0, vocab: int = VOCAB):
    """A 2-layer T5 encoder-decoder; dropout off so runs compare exactly."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def lm_batches(
    n: int, seq: int, vocab: int = VOCAB, batch_size: int = 4, seed: int = 1234
) -> list[dict[str, torch.Tensor]]:
    """``n`` causal-LM batches of ``batch_size`` rows of ``seq`` random tokens (ids in
    ``[2, vocab)``), each a dict with ``input_ids``, ``attention_mask`` and ``labels`` (a copy
    of ``input_ids``: the model shifts them itself)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (batch_size, seq), generator=generator)
        batches.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        )
    return batches


def token_batches(n: int = 4, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of 2 rows of 16 random ids in ``[0, VOCAB)``, labels a copy of the ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, VOCAB, (2, 16), generator=generator) for _ in range(n)]
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "log", "fast", "slow", "red"]


def tiny_tokenizer():
    """A word-level fast tokenizer built in code ([PAD]=0, [UNK]=1, then ``WORDS``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
