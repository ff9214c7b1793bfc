"""Random-weight models of real VLM *shapes*, built in memory from a config (nothing saved or downloaded):
the one builder of every model shape — the tiny test models (`actors.tiny_model` saves them), the shape the
shipped tiny model was trained at (`bench.train_tiny`), and the public 0.5B/3B/7B shapes (the benchmarks).

Speed depends on the shape (hidden size, layers, heads, vocabulary, vision tower), not on the weights,
so the speed benchmarks build a model with the published config numbers and random weights. The
tokenizer and processors are the offline ones from `actors.tiny_model` (a word-level tokenizer whose
ids all sit below the real vocabulary size), so prompts are short but the vocabulary-sized LM head
costs what it costs in the real model.

Where the numbers come from (public `config.json` files on the Hugging Face hub, copied by hand):
  * Qwen/Qwen2.5-VL-3B-Instruct: text hidden 2048, 36 layers, 16 heads, 2 KV heads, intermediate 11008,
    vocab 151936, tied embeddings, rope_theta 1e6, mrope_section [16, 24, 24];
    vision depth 32, hidden 1280, intermediate 3420, 16 heads, out_hidden 2048, patch 14, merge 2,
    temporal patch 2, window 112, full-attention blocks [7, 15, 23, 31], tokens_per_second 2.
  * Qwen/Qwen2.5-VL-7B-Instruct: text hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944,
    vocab 152064, untied embeddings; vision as 3B with out_hidden 3584.
  * llava-hf/llava-onevision-qwen2-0.5b-ov-hf: text = Qwen2-0.5B (hidden 896, 24 layers, 14 heads,
    2 KV heads, intermediate 4864, vocab 151936, tied); vision = SigLIP so400m-patch14-384 (hidden 1152,
    26 layers used, 16 heads, intermediate 4304, image 384, patch 14).
  * llava-hf/llava-onevision-qwen2-7b-ov-hf: text = Qwen2-7B (hidden 3584, 28 layers, 28 heads, 4 KV heads,
    intermediate 18944, vocab 152064, untied); vision = SigLIP as above.
There is no released LLaVA-OneVision 3B: `--arch llava_onevision --size 3b` pairs SigLIP with the
Qwen2.5-3B text shape (a shape for comparison only). "small" for Qwen2.5-VL is the Qwen2.5-0.5B text
shape with the real Qwen2.5-VL vision tower (no such released model either); for LLaVA-OneVision it is
the real 0.5B. "tiny" is the test model of `actors.tiny_model`; "trained" is the shape of the shipped tiny
Qwen2.5-VL trained on the synthetic video-QA world (`bench.train_tiny`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

ARCHS = ("qwen2_5_vl", "llava_onevision")
SIZES = ("tiny", "trained", "small", "3b", "7b")


@dataclass(frozen=True)
class TextShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None        # None: the tiny tokenizer's size (tiny models only)
    tied: bool
    rope_theta: float = 1_000_000.0


@dataclass(frozen=True)
class VisionShape:
    depth: int
    hidden: int
    intermediate: int
    heads: int
    image_size: int = 384                 # SigLIP only
    fullatt: tuple[int, ...] = (7, 15, 23, 31)  # Qwen2.5-VL only: blocks with full (not windowed) attention
    tokens_per_second: int = 2            # Qwen2.5-VL only: temporal position step per second of video


@dataclass(frozen=True)
class ModelShape:
    arch: str
    size: str
    text: TextShape
    vision: VisionShape
    resolution: int          # default square frame side fed to the processor (a multiple of 28 for Qwen)
    source: str


_QWEN_VISION = VisionShape(depth=32, hidden=1280, intermediate=3420, heads=16)
_SIGLIP = VisionShape(depth=26, hidden=1152, intermediate=4304, heads=16, image_size=384)
_TEXT_0_5B = TextShape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tied=True)
_TEXT_3B = TextShape(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vocab=151936, tied=True)
_TEXT_7B = TextShape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064, tied=False)
_TRAINED_TEXT = TextShape(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vocab=None, tied=True,
                          rope_theta=10000.0)
_TINY_TEXT = TextShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=None, tied=True,
                       rope_theta=10000.0)

_TINY_QWEN_VISION = VisionShape(depth=2, hidden=32, intermediate=64, heads=2, fullatt=(1,))
_TINY_SIGLIP = VisionShape(depth=2, hidden=32, intermediate=64, heads=2, image_size=112)
# at 8 fps a temporal group spans 0.25 s → temporal position step 1
_TRAINED_QWEN_VISION = VisionShape(depth=2, hidden=64, intermediate=128, heads=2, fullatt=(1,), tokens_per_second=4)
_TRAINED_SIGLIP = VisionShape(depth=2, hidden=64, intermediate=128, heads=2, image_size=112)

SHAPES: dict[tuple[str, str], ModelShape] = {(s.arch, s.size): s for s in [
    # arch, size, text, vision, default frame side, where the numbers come from
    ModelShape("qwen2_5_vl", "tiny", _TINY_TEXT, _TINY_QWEN_VISION, 112, "actors.tiny_model"),
    ModelShape("qwen2_5_vl", "trained", _TRAINED_TEXT, _TRAINED_QWEN_VISION, 112,
               "bench.train_tiny (actors/assets/tiny-qwen2_5_vl-synthqa)"),
    ModelShape("qwen2_5_vl", "small", _TEXT_0_5B, _QWEN_VISION, 224,
               "Qwen2.5-0.5B text shape + Qwen2.5-VL vision (not a released model)"),
    ModelShape("qwen2_5_vl", "3b", _TEXT_3B, _QWEN_VISION, 448, "Qwen/Qwen2.5-VL-3B-Instruct config.json"),
    ModelShape("qwen2_5_vl", "7b", _TEXT_7B, _QWEN_VISION, 448, "Qwen/Qwen2.5-VL-7B-Instruct config.json"),
    ModelShape("llava_onevision", "tiny", _TINY_TEXT, _TINY_SIGLIP, 112, "actors.tiny_model"),
    ModelShape("llava_onevision", "trained", _TRAINED_TEXT, _TRAINED_SIGLIP, 112,
               "the trained Qwen2.5-VL's sizes with a SigLIP tower (a LLaVA-OneVision for the synthetic world)"),
    ModelShape("llava_onevision", "small", _TEXT_0_5B, _SIGLIP, 384, "llava-hf/llava-onevision-qwen2-0.5b-ov-hf config.json"),
    ModelShape("llava_onevision", "3b", _TEXT_3B, _SIGLIP, 384, "SigLIP + Qwen2.5-3B text shape (no released LLaVA-OV 3B)"),
    ModelShape("llava_onevision", "7b", _TEXT_7B, _SIGLIP, 384, "llava-hf/llava-onevision-qwen2-7b-ov-hf config.json"),
]}


def get_shape(arch: str, size: str | ModelShape) -> ModelShape:
    if isinstance(size, ModelShape):
        return size
    if arch not in ARCHS:
        raise ValueError(f"arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"size: unknown size {size!r}; choose one of {', '.join(SIZES)}")
    return SHAPES[(arch, size)]


@dataclass
class BuiltModel:
    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype
    shape: ModelShape
    layers: int                      # LLM layers actually built (may be < shape.text.layers with --layers)
    vision_layers: int               # vision blocks actually built
    attn: str
    params: int = 0
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """Flat fields every benchmark row carries, so a CSV line says what was measured."""
        t = self.shape.text
        return {"arch": self.shape.arch, "size": self.shape.size, "hidden": t.hidden, "layers": self.layers,
                "layers_full": t.layers, "heads": t.heads, "kv_heads": t.kv_heads, "intermediate": t.intermediate,
                "vocab": self.info.get("vocab"), "vision_layers": self.vision_layers,
                "vision_layers_full": self.shape.vision.depth, "params_m": round(self.params / 1e6, 1),
                "device": self.device.type, "device_name": device_name(self.device),
                "dtype": str(self.dtype).replace("torch.", ""),
                "attn": self.attn}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu x{torch.get_num_threads()} threads ({platform.machine()})"


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE splits head_dim/2 rotary frequencies over (t, h, w): [16, 24, 24] for head_dim 128."""
    half = head_dim // 2
    return [16, 24, 24] if half == 64 else [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]


def qwen_config(shape: ModelShape, tokenizer, layers: int, vision_layers: int):
    from transformers import Qwen2_5_VLConfig

    from actors.tiny_model import QWEN_SPECIAL

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    t, v = shape.text, shape.vision
    head_dim = t.hidden // t.heads
    mrope = mrope_section(head_dim)
    fullatt = [i for i in v.fullatt if i < vision_layers] or [vision_layers - 1]
    vocab = t.vocab or len(tokenizer)
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=t.hidden, intermediate_size=t.intermediate,
                         num_hidden_layers=layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
                         max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": mrope},
                         tie_word_embeddings=t.tied, bos_token_id=ids["<|im_start|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_layers, hidden_size=v.hidden, intermediate_size=v.intermediate,
                           num_heads=v.heads, out_hidden_size=t.hidden, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112 if v.hidden >= 256 else 56,
                           fullatt_block_indexes=fullatt, tokens_per_second=v.tokens_per_second),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=t.tied,
    ), vocab


def qwen_processor(tokenizer, resolution: int, min_side: int | None = None):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from actors.tiny_model import QWEN_CHAT_TEMPLATE

    # frames are fed at `resolution` (a multiple of 28): the pixel budget keeps them at that size; with
    # `min_side`, smaller frames are upscaled to at least min_side² pixels
    pix = dict(min_pixels=(min_side or 56) ** 2, max_pixels=max(224 * 224, resolution * resolution))
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pix), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(**pix), chat_template=QWEN_CHAT_TEMPLATE)


def llava_config(shape: ModelShape, tokenizer, layers: int, vision_layers: int):
    from transformers import LlavaOnevisionConfig

    from actors.tiny_model import LLAVA_SPECIAL

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in LLAVA_SPECIAL}
    t, v = shape.text, shape.vision
    vocab = t.vocab or len(tokenizer)
    return LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=vocab, hidden_size=t.hidden, intermediate_size=t.intermediate,
                         num_hidden_layers=layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
                         max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
                         tie_word_embeddings=t.tied, bos_token_id=ids["<|im_start|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=v.hidden, intermediate_size=v.intermediate,
                           num_hidden_layers=vision_layers, num_attention_heads=v.heads, image_size=v.image_size,
                           patch_size=14),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[v.image_size, v.image_size]], tie_word_embeddings=t.tied,
    ), vocab


def llava_processor(tokenizer, image_size: int):
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    from actors.tiny_model import LLAVA_CHAT_TEMPLATE

    size = {"height": image_size, "width": image_size}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[image_size, image_size]]),
        tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(image_size // 14) ** 2, vision_feature_select_strategy="full",
        chat_template=LLAVA_CHAT_TEMPLATE)


def build_model(arch: str, size: str | ModelShape, *, device: torch.device = torch.device("cpu"),
                dtype: torch.dtype = torch.float32, layers: int | None = None, vision_layers: int | None = None,
                resolution: int | None = None, attn: str = "sdpa", seed: int = 0) -> BuiltModel:
    """Random-weight model of `arch`/`size` (a name in SIZES or a ModelShape; optionally fewer LLM / vision
    layers) on `device` in `dtype`, with the offline tokenizer and the architecture's real processor."""
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    from actors.tiny_model import LLAVA_SPECIAL, QWEN_SPECIAL, build_tokenizer

    shape = get_shape(arch, size)
    n_layers = shape.text.layers if layers is None else int(layers)
    n_vision = shape.vision.depth if vision_layers is None else int(vision_layers)
    if n_layers < 1 or n_vision < 1:
        raise ValueError(f"layers and vision layers must be >= 1, got {n_layers} and {n_vision}")
    if arch == "qwen2_5_vl":
        tokenizer = build_tokenizer(QWEN_SPECIAL)
        config, vocab = qwen_config(shape, tokenizer, n_layers, n_vision)
        processor = qwen_processor(tokenizer, resolution or shape.resolution)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        tokenizer = build_tokenizer(LLAVA_SPECIAL)
        config, vocab = llava_config(shape, tokenizer, n_layers, n_vision)
        processor = llava_processor(tokenizer, shape.vision.image_size)
        cls = LlavaOnevisionForConditionalGeneration
    torch.manual_seed(seed)
    with torch.device(device):  # weights are created (and randomly initialised) directly on the device
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn)
    model = model.to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    return BuiltModel(model=model, processor=processor, device=device, dtype=dtype, shape=shape, layers=n_layers,
                      vision_layers=n_vision, attn=attn, params=params, info={"vocab": vocab})


def shape_dict(shape: ModelShape) -> dict:
    return asdict(shape)
