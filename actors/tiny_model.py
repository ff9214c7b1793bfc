"""Random-weight tiny models of the real architectures, with an offline-made tokenizer and processor.

They load through the same code path as hub models (`AutoProcessor` / `AutoModelForImageTextToText`),
so tests and the demo exercise the real loading, preprocessing and splice code without a model hub.
"""
from __future__ import annotations

from pathlib import Path


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


def make_tiny_model(out_dir: str | Path, arch: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Save the random-weight "tiny" shape of `arch` (built by `actors.model_shapes`) with its offline
    tokenizer and processor to `out_dir`, loadable like any model directory."""
    from actors.model_shapes import build_model

    if arch not in ARCHS:
        raise ValueError(f"arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    built = build_model(arch, "tiny", seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    built.model.save_pretrained(out)
    built.processor.save_pretrained(out)
    return out
