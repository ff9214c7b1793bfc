"""Random-weight tiny models of the real architectures, with an offline-made tokenizer and processor.

They load through the same code path as hub models (`AutoProcessor` / `AutoModelForImageTextToText`),
so tests and the demo exercise the real loading, preprocessing and splice code without a model hub.
"""
from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("qwen2_5_vl", "llava_onevision")

# The words the tiny tokenizer knows: enough for prompts, captions and the benchmark's answers.
VOCAB_WORDS = """user assistant system a an the this that is are was were of in on at to and or with from by for it its video frame frames
describe what which who how many much does did do there object objects shape shapes colour color red green blue yellow
white black orange purple cyan magenta gray square circle triangle star small large big medium moves moving move left
right up down appears appeared disappears disappeared first last start end beginning background static panning
textured touch touched edge ever never yes no one two three four five six seven eight zero changed change between
answer question caption short long scene camera motion direction distinct same different . , ? ! : ;
options""".split()  # append new words at the end only: ids of the existing words must not move

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(special: list[str]):
    """A word-level fast tokenizer built offline (no hub): specials first, then [UNK], then the words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(special + ["[UNK]", "\n"] + VOCAB_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=special[1:])
    return fast


def tiny_qwen2_5_vl(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                    vision_depth: int = 2, vision_hidden: int = 32) -> Path:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    out = Path(out_dir)
    tokenizer = build_tokenizer(QWEN_SPECIAL)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    head_dim = 16
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=hidden_size // head_dim,
                         num_key_value_heads=max(1, hidden_size // head_dim // 2), max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]},
                         tie_word_embeddings=True, bos_token_id=ids["<|im_start|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                           num_heads=2, out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1],
                           tokens_per_second=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    pix = dict(min_pixels=56 * 56, max_pixels=224 * 224)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pix), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**pix), chat_template=QWEN_CHAT_TEMPLATE)
    _save(out, model, processor)
    return out


def tiny_llava_onevision(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                         vision_hidden: int = 32, image_size: int = 112) -> Path:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor)

    out = Path(out_dir)
    tokenizer = build_tokenizer(LLAVA_SPECIAL)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL}
    head_dim = 16
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=hidden_size * 2, num_hidden_layers=layers,
                         num_attention_heads=hidden_size // head_dim,
                         num_key_value_heads=max(1, hidden_size // head_dim // 2), max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=ids["<|im_start|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=vision_hidden,
                           intermediate_size=vision_hidden * 2, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=14),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=[[image_size, image_size]],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[image_size, image_size]]),
        tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(image_size // 14) ** 2, vision_feature_select_strategy="full",
        chat_template=LLAVA_CHAT_TEMPLATE)
    _save(out, model, processor)
    return out


def _save(out: Path, model, processor) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def make_tiny_model(out_dir: str | Path, arch: str = "qwen2_5_vl", seed: int = 0) -> Path:
    if arch == "qwen2_5_vl":
        return tiny_qwen2_5_vl(out_dir, seed=seed)
    if arch == "llava_onevision":
        return tiny_llava_onevision(out_dir, seed=seed)
    raise ValueError(f"arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
