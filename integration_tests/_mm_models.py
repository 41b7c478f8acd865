"""Tiny multimodal checkpoints (vision tower included), written by transformers itself.

``make_mm_checkpoint(name, dir)`` builds the model's config with transformers' own config classes,
the model with ``AutoModelForImageTextToText.from_config``, draws every weight from N(0, std), and
writes it with ``save_pretrained`` in small shards (``model.safetensors.index.json``); then the
local BPE tokenizer of ``loader_plugins.bench.tokenizer`` with the model's image tokens added as
special tokens (``tokenizers``), and the processor (transformers' processor class over the *PIL*
image processor, ``save_pretrained``): everything vLLM's multimodal processor reads. Nothing comes
from a model hub.

Sizes: text hidden 128, 2 layers, 4 heads of 32 (vLLM's CPU attention wants head_dim >= 32);
vision towers hidden 64, 2 layers, 2 heads of 32, images of 28-56 pixels in patches of 14, so an
image is 1-16 patches (a handful of image tokens).

``MM_MODELS`` says, per model, the class vLLM builds, the prefixes of its vision-tower parameters
(the same in the checkpoint and in vLLM's model), the prompt that carries the image placeholder,
and the size of the picture (``make_image``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

__all__ = ["MM_MODELS", "MMModel", "make_mm_checkpoint", "make_image"]

_TEXT = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, intermediate_size=256, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)


@dataclasses.dataclass(frozen=True)
class MMModel:
    vllm_class: str
    #: name prefixes of the vision tower's tensors (the image encoder, not the projector after it)
    vision_prefixes: tuple[str, ...]
    #: a prompt with the model's image placeholder (the processor expands it)
    image_prompt: str
    image_size: tuple[int, int]


MM_MODELS: dict[str, MMModel] = {
    "llava": MMModel("LlavaForConditionalGeneration", ("vision_tower.",),
                     "<image>\nDescribe the picture of the world:", (28, 28)),
    "llava_pixtral": MMModel("LlavaForConditionalGeneration", ("vision_tower.",),
                             "[IMG]Describe the picture of the world:", (28, 28)),
    # visual.merger. is the projector
    "qwen2_vl": MMModel("Qwen2VLForConditionalGeneration", ("visual.blocks.", "visual.patch_embed."),
                        "<|vision_start|><|image_pad|><|vision_end|>The name of the model is", (56, 56)),
    "qwen2_5_vl": MMModel("Qwen2_5_VLForConditionalGeneration", ("visual.blocks.", "visual.patch_embed."),
                          "<|vision_start|><|image_pad|><|vision_end|>The name of the model is", (56, 56)),
    "gemma3": MMModel("Gemma3ForConditionalGeneration", ("vision_tower.",),
                      "<start_of_image>Hello world, my name is", (56, 56)),
    "idefics3": MMModel("Idefics3ForConditionalGeneration", ("model.vision_model.",),
                        "User:<image>Describe the world of names<end_of_utterance>\nAssistant:", (56, 56)),
}


def make_image(size: tuple[int, int], seed: int = 0):
    """A small RGB picture drawn in code (gradients and a square), the same for the same arguments."""
    import numpy as np
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 40, size=(h, w, 3))
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // max(w + h - 2, 1)], -1)
    img = (img + noise) % 256
    img[h // 4: h // 2, w // 4: w // 2] = (250, 20, 20)
    return Image.fromarray(img.astype("uint8"), "RGB")


def _tokenizer(out: Path, specials: list[str], named: dict[str, str], vocab: int = 512, plain: tuple[str, ...] = ()):
    """The bench BPE (its size ``vocab - len(specials) - len(plain)``) with ``specials`` appended as
    special tokens and ``plain`` as ordinary added tokens; ``named``: tokenizer attributes
    (``image_token`` -> its text) that transformers' processors read. Returns transformers'
    tokenizer loaded from ``out``."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer

    from loader_plugins.bench.tokenizer import write_tokenizer

    write_tokenizer(out, vocab - len(specials) - len(plain), 512)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_tokens([AddedToken(s, normalized=False, special=False) for s in plain])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["extra_special_tokens"] = named or list(specials)
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return AutoTokenizer.from_pretrained(str(out))


def _save(model, out: Path, std: float, seed: int, max_shard_size: str) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
    model.save_pretrained(out, max_shard_size=max_shard_size)


def _llava(out: Path):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    tok = _tokenizer(out, ["<image>"], {"image_token": "<image>"})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_VISION, image_size=28, patch_size=14, projection_dim=64),
        text_config=LlamaConfig(**_TEXT), image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=4, vision_feature_layer=-2, vision_feature_select_strategy="default")
    size = {"shortest_edge": 28}
    processor = LlavaProcessor(CLIPImageProcessorPil(size=size, crop_size={"height": 28, "width": 28}), tok,
                               patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return config, processor


def _llava_pixtral(out: Path):
    from transformers import LlavaConfig, MistralConfig, PixtralImageProcessorPil, PixtralProcessor, PixtralVisionConfig

    specials = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = _tokenizer(out, specials, {})
    config = LlavaConfig(
        vision_config=PixtralVisionConfig(**_VISION, head_dim=32, image_size=28, patch_size=14),
        text_config=MistralConfig(**_TEXT), image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        vision_feature_layer=-1, vision_feature_select_strategy="full", multimodal_projector_bias=True)
    # a 28-pixel picture: 2 x 2 patches, a row break after each row and an end: 6 image tokens
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 28}, patch_size=14)
    return config, PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14, spatial_merge_size=1)


def _qwen2_vl(out: Path, v25: bool):
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
    tok = _tokenizer(out, specials, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                     "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    text = dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14,
                                              temporal_patch_size=2, merge_size=2)
    if v25:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor as Processor

        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"])
    else:
        from transformers import Qwen2VLConfig, Qwen2VLProcessor as Processor

        vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                               video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                               vision_end_token_id=ids["<|vision_end|>"])
    # the processor class wants a video processor (a torchvision one: never called, videos are off)
    video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    return config, Processor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor)


def _gemma3(out: Path):
    from transformers import (Gemma3Config, Gemma3ImageProcessorPil, Gemma3Processor, Gemma3TextConfig,
                              SiglipVisionConfig)

    specials = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    # Gemma's vocabulary has runs of newlines as tokens; vLLM's Gemma 3 processor looks them up
    tok = _tokenizer(out, specials, {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                     "image_token": "<image_soft_token>"}, plain=("\n", "\n\n", "\n\n\n", "\n\n\n\n"))
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**_TEXT, sliding_window=128),
        vision_config=SiglipVisionConfig(**_VISION, image_size=56, patch_size=14, vision_use_head=False),
        mm_tokens_per_image=4, boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
    image_processor = Gemma3ImageProcessorPil(size={"height": 56, "width": 56}, do_pan_and_scan=False)
    return config, Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4)


def _idefics3(out: Path):
    from transformers import (Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor, Idefics3VisionConfig,
                              LlamaConfig)

    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid]
    tok = _tokenizer(out, specials, {})
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**_VISION, image_size=56, patch_size=14),
        text_config=LlamaConfig(**_TEXT), image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2,
        pad_token_id=0)
    # one 56-pixel image, not split into tiles: (56 / 14)^2 / 2^2 = 4 image tokens
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 56},
                                                max_image_size={"longest_edge": 56})
    return config, Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4)


_WRITERS = {
    "llava": _llava,
    "llava_pixtral": _llava_pixtral,
    "qwen2_vl": lambda out: _qwen2_vl(out, v25=False),
    "qwen2_5_vl": lambda out: _qwen2_vl(out, v25=True),
    "gemma3": _gemma3,
    "idefics3": _idefics3,
}
#: Checkpoint names as the Hub has them. transformers 5.19 saves these models' names in the Hub's
#: layout (its reverse mapping, ``save_original_format``) except one level: it drops the
#: ``vision_model.`` of a nested CLIP/SigLIP tower (``vision_tower.embeddings.`` where the Hub's
#: LLaVA and Gemma 3 checkpoints, e.g. llava-hf/llava-1.5-7b-hf and google/gemma-3-4b-it, have
#: ``vision_tower.vision_model.embeddings.``), in its own names too (``model.vision_tower.embeddings.``).
#: vLLM 0.32 loads neither ("There is no module or parameter named 'vision_tower.embeddings'"), so
#: the writer puts the level back.
_HUB_RENAMES = {"llava": ("vision_tower.", "vision_tower.vision_model."),
                "gemma3": ("vision_tower.", "vision_tower.vision_model.")}


def _rename(out: Path, old: str, new: str) -> None:
    """Rename every tensor whose name starts with ``old`` in the shards and the index."""
    from safetensors.torch import load_file, save_file

    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())

    def renamed(name: str) -> str:
        return new + name[len(old):] if name.startswith(old) else name

    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(out / shard))   # views of the mapped file: write a new one, then replace
        save_file({renamed(k): v for k, v in tensors.items()}, str(out / f"{shard}.tmp"), metadata={"format": "pt"})
        os.replace(out / f"{shard}.tmp", out / shard)
    index["weight_map"] = {renamed(k): v for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index, indent=2) + "\n")


def make_mm_checkpoint(name: str, dir: str | os.PathLike[str], *, seed: int = 0, std: float = 0.1,
                       max_shard_size: str = "300KB") -> Path:
    """Write the tiny random checkpoint of ``name`` (a key of :data:`MM_MODELS`), its tokenizer and
    processor into ``dir``."""
    import torch
    from transformers import AutoModelForImageTextToText

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    config, processor = _WRITERS[name](out)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    _save(model, out, std, seed, max_shard_size)
    if name in _HUB_RENAMES:
        _rename(out, *_HUB_RENAMES[name])
    processor.save_pretrained(out)
    return out
