"""Tiny pooling checkpoints (embedding models, cross-encoders, classifiers), written by transformers.

``make_pooling_checkpoint(name, dir)`` builds the model of :data:`POOLING_MODELS` with
transformers' own config class (``AutoConfig.for_model``) and model class
(``AutoModel`` / ``AutoModelForSequenceClassification``), draws every weight from N(0, 0.2) and
writes it with ``save_pretrained`` in small shards, plus the local tokenizer of
:mod:`loader_plugins.bench.tokenizer`. BERT-family tokenizers get BERT's templates: ``<s> A </s>``
and, for a pair, ``<s> A </s> B </s>``; BERT's return token type 1 on the second text (so the
cross-encoder's ``token_type_embeddings`` row 1 is used). Decoders take the matrix's tiny shape
(:data:`_arch_models.ARCHITECTURES`); ``qwen2_reranker`` is the matrix's tied Qwen2 causal LM
(:func:`_arch_models.make_arch_checkpoint`), which vLLM turns into a reranker the way it serves
Qwen3-Reranker (``hf_overrides`` in :data:`POOLING_MODELS`). Nothing comes from a model hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

__all__ = ["POOLING_MODELS", "PoolingModel", "make_pooling_checkpoint"]

_BERT = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
             max_position_embeddings=256)
# RoBERTa's positions start at pad_token_id + 1 = 2 (vLLM's RobertaEmbedding adds the offset):
# two more rows than the engine's max_model_len, as roberta-base's 514 for 512
_ROBERTA = dict(_BERT, max_position_embeddings=258, pad_token_id=1, bos_token_id=0, eos_token_id=2)
_RERANKER_TOKENS = ["a", "and"]   # (false, true): single tokens of the tiny tokenizer


class PoolingModel(NamedTuple):
    """``model_type`` / ``auto_class``: transformers' (the checkpoint's writer); ``fields``: the
    config (None: the matrix's tiny shape of ``model_type``, :data:`_arch_models.ARCHITECTURES`);
    ``task``: what the test asks of the engine (``embed``: ``LLM.embed``, ``score``: ``LLM.score``
    of query/document pairs, ``classify``: ``LLM.classify``); ``vllm_class``: the class vLLM
    builds for it; ``engine``: more ``LLM(...)`` arguments."""

    model_type: str
    auto_class: str
    fields: dict | None
    task: str
    vllm_class: str
    engine: dict = {}


_CLS = "AutoModelForSequenceClassification"

POOLING_MODELS: dict[str, PoolingModel] = {
    # BertModel (CLS pooling); the checkpoint's pooler.* is dropped by vLLM's BertModel mapper
    "bert": PoolingModel("bert", "AutoModel", dict(_BERT), "embed", "BertEmbeddingModel"),
    # RobertaModel: BERT with position ids offset by padding_idx + 1 in the forward
    "roberta": PoolingModel("roberta", "AutoModel", dict(_ROBERTA), "embed", "RobertaEmbeddingModel"),
    # a cross-encoder as ms-marco-MiniLM: one label, token type ids on the pair
    "bert_reranker": PoolingModel("bert", _CLS, dict(_BERT, num_labels=1), "score", "BertForSequenceClassification"),
    # XLMRobertaForSequenceClassification, three classes (dense + out_proj head)
    "xlm_roberta_cls": PoolingModel("xlm-roberta", _CLS, dict(_ROBERTA, num_labels=3), "classify",
                                    "RobertaForSequenceClassification"),
    # ModernBERT (fused Wqkv, GeGLU Wi, alternating global / sliding attention), three classes
    "modernbert_cls": PoolingModel("modernbert", _CLS,
                                   dict(_BERT, num_labels=3, layer_types=["full_attention", "sliding_attention"],
                                        local_attention=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        cls_token_id=1, sep_token_id=2),
                                   "classify", "ModernBertForSequenceClassification"),
    # a decoder as an embedding model (gte-Qwen2, Qwen3-Embedding): Qwen2Model, no "model." prefix
    "qwen2_embed": PoolingModel("qwen2", "AutoModel", None, "embed", "Qwen2ForEmbedding"),
    # Qwen2ForSequenceClassification: vLLM's as_seq_cls_model(Qwen2ForCausalLM), a `score` head
    "qwen2_cls": PoolingModel("qwen2", _CLS, None, "classify", "Qwen2ForSequenceClassification"),
    # a causal LM as a reranker (Qwen3-Reranker's recipe): vLLM builds score.weight inside
    # load_weights from the lm_head rows of two tokens (Qwen3-Reranker's "no", "yes"; here two
    # the tiny tokenizer has), and this lm_head is the tied embeddings
    "qwen2_reranker": PoolingModel("qwen2", "AutoModelForCausalLM", None, "score", "Qwen2ForSequenceClassification",
                                   {"hf_overrides": {"architectures": ["Qwen2ForSequenceClassification"],
                                                     "classifier_from_token": _RERANKER_TOKENS,
                                                     "method": "from_2_way_softmax"}}),
}


def make_pooling_checkpoint(name: str, dir: str | os.PathLike[str], *, seed: int = 0, std: float = 0.2,
                            max_shard_size: str = "300KB") -> Path:
    """Write the tiny random checkpoint ``name`` (a key of :data:`POOLING_MODELS`) into ``dir``."""
    import torch
    import transformers

    from _arch_models import ARCHITECTURES, make_arch_checkpoint
    from loader_plugins.bench.tokenizer import write_tokenizer

    model_type, auto, fields = POOLING_MODELS[name][:3]
    out = Path(dir)
    if auto == "AutoModelForCausalLM":
        make_arch_checkpoint(model_type, out, seed=seed, std=std, max_shard_size=max_shard_size)
        _check_tokens(out, _RERANKER_TOKENS)
        return out
    if fields is None:   # a decoder with the matrix's tiny shape
        fields = dict(ARCHITECTURES[model_type][1], num_labels=3)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, fields["vocab_size"], fields["max_position_embeddings"])
    if model_type not in ARCHITECTURES:   # the BERT family
        _bert_templates(out, token_types=model_type == "bert")
    config = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = getattr(transformers, auto).from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return out


def _bert_templates(out: Path, token_types: bool) -> None:
    """``<s> A </s>`` and ``<s> A </s> B </s>`` (type ids 1 on B), BERT's ``[CLS] A [SEP] B [SEP]``;
    ``token_types``: the tokenizer returns ``token_type_ids`` (BERT's do, RoBERTa's do not), which
    vLLM's cross-encoder path hands to the model."""
    path = out / "tokenizer.json"
    tok = json.loads(path.read_text())
    special = tok["post_processor"]["special_tokens"]
    special["</s>"] = {"id": "</s>", "ids": [2], "tokens": ["</s>"]}

    def piece(kind: str, name: str, type_id: int) -> dict:
        return {kind: {"id": name, "type_id": type_id}}

    a, b = piece("Sequence", "A", 0), piece("Sequence", "B", 1)
    cls, sep, sep1 = piece("SpecialToken", "<s>", 0), piece("SpecialToken", "</s>", 0), piece("SpecialToken", "</s>", 1)
    tok["post_processor"]["single"] = [cls, a, sep]
    tok["post_processor"]["pair"] = [cls, a, sep, b, sep1]
    path.write_text(json.dumps(tok))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(add_bos_token=False, cls_token="<s>", sep_token="</s>", pad_token="<unk>")
    if token_types:
        config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _check_tokens(out: Path, words) -> None:
    """Each of ``words`` must be one token of the tokenizer (the reranker's classifier tokens)."""
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    missing = [w for w in words if w not in vocab]
    if missing:
        raise RuntimeError(f"the tokenizer at {out} has no token for {missing}: pick words of its vocabulary")
