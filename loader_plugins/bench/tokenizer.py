"""A Llama-style tokenizer made locally, for demo and test checkpoints (no model hub).

``write_tokenizer(dir, vocab_size, model_max_length)`` trains a byte-level BPE with the ``tokenizers``
library on generated pseudo-English and writes what ``transformers.AutoTokenizer`` and vLLM read:
``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``. Its vocabulary is exactly ``vocab_size`` (padded with ``<extra_N>`` tokens
when the corpus runs out of merges), ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>`` as in Llama, and
``<s>`` is prepended to every prompt. The corpus is drawn from a fixed seed: the same arguments give the
same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List

__all__ = ["write_tokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama
_CORPUS_SEED = 1234  # fixed: every checkpoint of one vocabulary size shares one tokenizer


def _corpus(n_words: int, n_sentences: int) -> List[str]:
    """Deterministic pseudo-English: ``n_words`` made-up words (at most) in random sentences."""
    rng = random.Random(_CORPUS_SEED)
    onsets = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "pl"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ee"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ck"]
    words = sorted(
        {
            "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(1, 3)))
            for _ in range(n_words)
        }
    )
    words += ["the", "a", "of", "and", "to", "in", "is", "Hello", "world", "my", "name", "model"]
    sentences = []
    for _ in range(n_sentences):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", ","]))
    return sentences


def write_tokenizer(out: Path, vocab_size: int, model_max_length: int) -> List[int]:
    """Train and save the tokenizer into ``out``; return the ids greedy decoding should avoid.

    Those are the special tokens, the padding tokens and every token that does not decode on its own to
    printable ASCII (most of the 256 byte-level tokens). A vocabulary of a few hundred tokens is trained
    on a few hundred words; a larger one on proportionally more, so that most of it is real merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = Path(out)
    scale = max(1, vocab_size // 512)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(400 * scale, 600 * scale), trainer=trainer)
    # Pad with unused tokens if the corpus ran out of merges, so every model id decodes.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<extra_{i}>" for i in range(missing)])
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tok.save(str(out / "tokenizer.json"))

    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(out / "special_tokens_map.json", special)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            **special,
        },
    )
    quiet = []
    for token_id in range(vocab_size):
        token = tok.id_to_token(token_id)
        text = tok.decode([token_id], skip_special_tokens=False)
        if token in SPECIAL_TOKENS or token.startswith("<extra_") or not (text.isascii() and text.isprintable()):
            quiet.append(token_id)
    return quiet


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
