"""A controlled temporal video-QA benchmark: seeded synthetic clips, questions that need time, captions.

Every clip is `FRAMES` (16) frames of `SIZE`x`SIZE` (112) RGB at `FPS` (8): a low-saturation textured
background, static or panning (the camera moves), and one to four shapes with a colour, a shape and a
size, each moving in one direction, each appearing and disappearing at its own time (on temporal
group boundaries: Qwen2.5-VL merges frame pairs). Questions (all words in
`actors.tiny_model.VOCAB_WORDS`, answers too):

  count          how many distinct objects are in the video ?           one .. four
  appeared_last  which object appeared last ?                           <colour> <shape>
  appeared_first which object appeared first ?                          <colour> <shape>
  disappeared    which object disappeared ?                             <colour> <shape>
  direction      which direction does the <colour> <shape> move ?       left | right | up | down
  touch_edge     did the <colour> <shape> ever touch the edge ?         yes | no
  changed        what changed between the start and the end ?           <colour> <shape> appeared|disappeared
  background     is the background static or panning ?                  static | panning
  size           is the <colour> <shape> small or large ?               small | large

Each question comes as short answer (prompt = the question) and as multiple choice (prompt = the
question followed by `options : a , b , c .`); both carry `options`, the candidate answers used for
option log-likelihood scoring. Every clip also has a reference caption ("a small red square moves left .
... the background is static ."), the answer to the pipeline's default prompt "Describe this video.".

Splits: a clip is a pure function of (split, index, base seed) through `numpy.random.SeedSequence`
with a split code in the entropy, so train / val / test never share a clip (the tests check it).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

SIZE = 112
FRAMES = 16
FPS = 8
GROUP = 2  # Qwen2.5-VL temporal_patch_size: appear/disappear times fall on group boundaries

SPLITS = {"train": 1, "val": 2, "test": 3}
COLOURS = {
    "red": (220, 30, 30), "green": (30, 185, 45), "blue": (40, 70, 235), "yellow": (235, 220, 30),
    "white": (245, 245, 245), "orange": (245, 140, 20), "purple": (150, 40, 210), "cyan": (30, 215, 225),
}
SHAPES = ("square", "circle", "triangle")
SIZES = {"small": 20, "large": 32}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
TEXTURES = ("noise", "stripes", "checker", "waves", "gradient")
QUESTION_TYPES = ("count", "appeared_last", "appeared_first", "disappeared", "direction", "touch_edge", "changed",
                  "background", "size")
CAPTION_PROMPT = "Describe this video."


@dataclass
class SynthObject:
    colour: str
    shape: str
    size: str
    direction: str
    appear: int          # first visible frame
    disappear: int       # first frame no longer visible (FRAMES = stays to the end)
    touches_edge: bool
    track: list[tuple[float, float]] = field(default_factory=list)  # (x, y) top-left per visible frame

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def visible(self, t: int) -> bool:
        return self.appear <= t < self.disappear


@dataclass
class Question:
    qtype: str
    question: str
    answer: str
    options: list[str]   # candidate answers (the answer is one of them), in the order shown for MC

    def prompt(self, fmt: str = "short") -> str:
        if fmt == "short":
            return self.question
        if fmt == "mc":
            return f"{self.question} options : {' , '.join(self.options)} ."
        raise ValueError(f"format must be 'short' or 'mc', got {fmt!r}")


@dataclass
class SynthClip:
    split: str
    index: int
    seed: int
    frames: np.ndarray   # (FRAMES, SIZE, SIZE, 3) uint8
    texture: str
    panning: bool
    pan: tuple[float, float]
    objects: list[SynthObject]
    questions: list[Question]
    caption: str

    @property
    def clip_id(self) -> str:
        return f"{self.split}-{self.seed}-{self.index:06d}"

    @property
    def timestamps(self) -> list[float]:
        return [i / FPS for i in range(FRAMES)]

    def meta(self) -> dict:
        d = {"clip_id": self.clip_id, "split": self.split, "index": self.index, "seed": self.seed,
             "texture": self.texture, "panning": self.panning, "caption": self.caption,
             "objects": [{k: v for k, v in asdict(o).items() if k != "track"} for o in self.objects]}
        return d


# ------------------------------------------------------------------------------------------------ drawing

@lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) float32 coverage mask in [0, 1] (4x supersampled, so edges are antialiased)."""
    from PIL import Image, ImageDraw

    ss = 4
    n = side * ss
    img = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(img)
    if shape == "square":
        d.rectangle([0, 0, n - 1, n - 1], fill=255)
    elif shape == "circle":
        d.ellipse([0, 0, n - 1, n - 1], fill=255)
    elif shape == "triangle":
        d.polygon([(n / 2, 0), (n - 1, n - 1), (0, n - 1)], fill=255)
    elif shape == "star":
        c, r_out, r_in = (n - 1) / 2, n / 2, n / 5
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_in
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((c + r * math.cos(a), c + 1.08 * r * math.sin(a) + n * 0.06))
        d.polygon(pts, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    small = img.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    from PIL import Image

    low = rng.random((max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    img = Image.fromarray((low * 255).astype(np.uint8)).resize((w + 2 * cell, h + 2 * cell),
                                                                Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)[cell:cell + h, cell:cell + w] / 255.0


def make_background(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 low-saturation texture, values about 50..175 (objects stay distinct)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "noise":
        tex = 0.6 * _smooth_noise(rng, h, w, int(rng.integers(6, 16))) + 0.4 * _smooth_noise(rng, h, w, 4)
    elif kind == "stripes":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(8, 20)
        tex = 0.5 + 0.35 * np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period)
    elif kind == "checker":
        c = int(rng.integers(6, 15))
        tex = 0.3 + 0.4 * (((xx // c) + (yy // c)) % 2)
    elif kind == "waves":  # the look of pipeline.sample_videos.make_moving_shapes (the demo clips)
        fx, fy, ph = rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.2), rng.uniform(0, 2 * math.pi)
        tex = 0.5 + 0.25 * np.sin(xx * fx + ph) + 0.25 * np.cos(yy * fy - ph)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        g = (xx * math.cos(a) + yy * math.sin(a))
        tex = (g - g.min()) / max(1e-6, float(g.max() - g.min()))
    else:
        raise ValueError(f"unknown texture {kind!r}")
    tex = tex + rng.normal(0, 0.04, size=tex.shape).astype(np.float32)
    base = 55 + 115 * np.clip(tex, 0, 1)
    tint = rng.uniform(0.85, 1.12, size=3).astype(np.float32)
    return np.clip(base[..., None] * tint, 0, 255).astype(np.float32)


# ------------------------------------------------------------------------------------------------ scenes

def clip_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    return np.random.default_rng(np.random.SeedSequence([SPLITS[split], int(seed), int(index)]))


N_OBJECTS_P = (0.4, 0.25, 0.2, 0.15)  # P(1 object), P(2), P(3), P(4)


def _sample_objects(rng: np.random.Generator) -> list[SynthObject]:
    """1-4 objects with distinct colours. Timing keeps every temporal question well defined: with one object it
    may appear late or vanish early; with several, all are there from the start except at most one that
    appears late, and at most one other that vanishes before the end."""
    n = 1 + int(rng.choice(len(N_OBJECTS_P), p=N_OBJECTS_P))
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    groups = FRAMES // GROUP
    appear, disappear = [0] * n, [FRAMES] * n
    if n == 1:
        r = rng.random()
        if r < 0.3:
            appear[0] = GROUP * int(rng.integers(2, groups - 2))                 # frames 4..10
        elif r < 0.6:
            disappear[0] = GROUP * int(rng.integers(3, groups))                  # frames 6..14
    else:
        late = int(rng.integers(n)) if rng.random() < 0.6 else None
        if late is not None:
            appear[late] = GROUP * int(rng.integers(2, groups - 2))
        if rng.random() < 0.5:
            gone = int(rng.choice([i for i in range(n) if i != late]))
            disappear[gone] = GROUP * int(rng.integers(3, groups))
    objs = []
    for i in range(n):
        objs.append(SynthObject(colour=str(colours[i]), shape=str(rng.choice(SHAPES)),
                                size=str(rng.choice(list(SIZES))), direction=str(rng.choice(list(DIRECTIONS))),
                                appear=appear[i], disappear=disappear[i], touches_edge=bool(rng.random() < 0.5)))
    return objs


def _plan_track(rng: np.random.Generator, obj: SynthObject) -> None:
    """Straight motion at 2..4 px/frame; either stays >= 3 px inside the frame or runs into an edge."""
    side = SIZES[obj.size]
    dx, dy = DIRECTIONS[obj.direction]
    life = obj.disappear - obj.appear
    lo, hi = 8.0, SIZE - side - 8.0                                  # inside range of the top-left corner
    speed = float(rng.uniform(2.0, 4.0))
    travel = speed * (life - 1)
    if not obj.touches_edge and travel > (hi - lo):
        speed = (hi - lo) / max(1, life - 1) * 0.95
        travel = speed * (life - 1)
    cross = float(rng.uniform(lo, hi))                               # coordinate across the motion
    if obj.touches_edge:
        # reach the edge at some visible frame (at least a group before the end of its life when possible)
        # (early enough that it then sits half outside the frame for a few frames: a visible cue)
        hit = int(rng.integers(max(1, life // 3), max(2, life - 3))) if life > 1 else 0
        start = (0.0 + speed * hit) if (dx < 0 or dy < 0) else (SIZE - side - speed * hit)
    else:
        start = float(rng.uniform(lo + travel, hi)) if (dx < 0 or dy < 0) else float(rng.uniform(lo, hi - travel))
    track = []
    for k in range(life):
        along = start + speed * k * (dx + dy)
        # objects that run into the edge keep going until half of them is outside, then stop there
        along = min(max(along, -side / 2), SIZE - side / 2)
        track.append((along, cross) if dx else (cross, along))
    obj.track = track
    xs = [p[0] for p in track]
    ys = [p[1] for p in track]
    obj.touches_edge = bool(min(xs) <= 0.5 or min(ys) <= 0.5 or max(xs) >= SIZE - side - 0.5
                            or max(ys) >= SIZE - side - 0.5)


def _render(rng: np.random.Generator, texture: str, pan: tuple[float, float], objs: list[SynthObject]) -> np.ndarray:
    margin = int(math.ceil(max(abs(pan[0]), abs(pan[1])) * FRAMES)) + 2
    bg = make_background(rng, texture, SIZE + 2 * margin, SIZE + 2 * margin)
    frames = np.empty((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    grain = rng.integers(-3, 4, size=(FRAMES, SIZE, SIZE, 3), dtype=np.int8)  # sensor grain (cheap)
    jitter = {o.colour: np.clip(np.array(COLOURS[o.colour], np.float32) + rng.uniform(-12, 12, 3), 0, 255
                                ).astype(np.float32)
              for o in objs}
    for t in range(FRAMES):
        ox = margin + int(round(pan[0] * (t - FRAMES / 2)))
        oy = margin + int(round(pan[1] * (t - FRAMES / 2)))
        img = bg[oy:oy + SIZE, ox:ox + SIZE].copy()
        for o in objs:
            if not o.visible(t):
                continue
            x, y = o.track[t - o.appear]
            side = SIZES[o.size]
            m = shape_mask(o.shape, side)
            xi, yi = int(round(x)), int(round(y))
            x0, y0, x1, y1 = max(0, xi), max(0, yi), min(SIZE, xi + side), min(SIZE, yi + side)
            if x1 <= x0 or y1 <= y0:
                continue
            mm = m[y0 - yi:y1 - yi, x0 - xi:x1 - xi, None]
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - mm) + jitter[o.colour] * mm
        img += grain[t]
        np.clip(img, 0, 255, out=img)
        frames[t] = img
    return frames


def token_labels(clip: "SynthClip", cells: int = SIZE // 28, min_cover: float = 24.0) -> np.ndarray:
    """Per visual token (Qwen2.5-VL order: temporal group, row, column of a `cells` x `cells` grid of square
    cells; 4 = 28x28-pixel cells at 112 px, 6 when the model sees the clip upscaled to 168 px) the object that
    covers it most in the group's two frames: (N, 5) int64 of (colour id, shape id, size id, direction id, cut
    by the frame edge), 0 = no object (ids are 1 + the index in COLOURS / SHAPES / SIZES / DIRECTIONS; the last
    column is 1 when that object is partly outside the frame in this group). `min_cover` is in pixels of a
    28x28 cell, scaled to the cell's area. For auxiliary training losses."""
    g_n, c_n = FRAMES // GROUP, cells
    up = c_n // math.gcd(SIZE, c_n)           # coverage on a grid `up` times finer, so cells are whole pixels
    cell = SIZE * up // c_n
    min_cover = min_cover * (SIZE / c_n / 28) ** 2 * up * up
    cover = np.zeros((g_n, c_n, c_n, len(clip.objects)), np.float32)
    cut = np.zeros((g_n, len(clip.objects)), bool)
    for k, o in enumerate(clip.objects):
        side = SIZES[o.size]
        m = shape_mask(o.shape, side)
        for t in range(o.appear, o.disappear):
            x, y = o.track[t - o.appear]
            xi, yi = int(round(x)), int(round(y))
            x0, y0, x1, y1 = max(0, xi), max(0, yi), min(SIZE, xi + side), min(SIZE, yi + side)
            if x1 <= x0 or y1 <= y0:
                continue
            cut[t // GROUP, k] |= (x1 - x0) < side or (y1 - y0) < side
            full = np.zeros((SIZE, SIZE), np.float32)
            full[y0:y1, x0:x1] = m[y0 - yi:y1 - yi, x0 - xi:x1 - xi]
            if up > 1:
                full = full.repeat(up, axis=0).repeat(up, axis=1)
            cover[t // GROUP, :, :, k] += full.reshape(c_n, cell, c_n, cell).sum(axis=(1, 3))
    out = np.zeros((g_n * c_n * c_n, 5), np.int64)
    if clip.objects:
        best = cover.argmax(-1).reshape(-1)
        ok = cover.max(-1).reshape(-1) >= min_cover
        colours, dirs = list(COLOURS), list(DIRECTIONS)
        for i in np.nonzero(ok)[0]:
            o = clip.objects[best[i]]
            out[i] = (1 + colours.index(o.colour), 1 + SHAPES.index(o.shape), 1 + list(SIZES).index(o.size),
                      1 + dirs.index(o.direction), int(cut[i // (c_n * c_n), best[i]]))
    return out


# ------------------------------------------------------------------------------------------------ questions

def _options(rng: np.random.Generator, answer: str, pool: list[str], k: int) -> list[str]:
    others = [p for p in dict.fromkeys(pool) if p != answer]
    rng.shuffle(others)
    opts = [answer] + others[: k - 1]
    rng.shuffle(opts)
    return [str(o) for o in opts]


def _distractor_objects(rng: np.random.Generator, objs: list[SynthObject], k: int = 3) -> list[str]:
    names = [o.name for o in objs]
    extra = []
    while len(names) + len(extra) < k:
        cand = f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)}"
        if cand not in names and cand not in extra:
            extra.append(cand)
    return names + extra


def make_questions(rng: np.random.Generator, objs: list[SynthObject], panning: bool) -> list[Question]:
    qs: list[Question] = []
    n = len(objs)
    pool_obj = _distractor_objects(rng, objs, 3)
    qs.append(Question("count", "how many distinct objects are in the video ?", NUMBERS[n],
                       _options(rng, NUMBERS[n], list(NUMBERS[1:5]), 4)))
    appear = [o.appear for o in objs]
    if n >= 2 and appear.count(max(appear)) == 1 and max(appear) > min(appear):
        o = objs[appear.index(max(appear))]
        qs.append(Question("appeared_last", "which object appeared last ?", o.name, _options(rng, o.name, pool_obj, 3)))
    if n >= 2 and appear.count(min(appear)) == 1:
        o = objs[appear.index(min(appear))]
        qs.append(Question("appeared_first", "which object appeared first ?", o.name,
                           _options(rng, o.name, pool_obj, 3)))
    gone = [o for o in objs if o.disappear < FRAMES]
    if len(gone) == 1:
        o = gone[0]
        qs.append(Question("disappeared", "which object disappeared ?", o.name, _options(rng, o.name, pool_obj, 3)))
    for o in objs if n == 1 else []:  # several objects: the object questions would need retrieval by name
        qs.append(Question("direction", f"which direction does the {o.name} move ?", o.direction,
                           _options(rng, o.direction, list(DIRECTIONS), 4)))
        yn = "yes" if o.touches_edge else "no"
        qs.append(Question("touch_edge", f"did the {o.name} ever touch the edge ?", yn, _options(rng, yn, ["yes", "no"], 2)))
        qs.append(Question("size", f"is the {o.name} small or large ?", o.size, _options(rng, o.size, list(SIZES), 2)))
    changes = [(o, "appeared") for o in objs if not o.visible(0) and o.visible(FRAMES - 1)]
    changes += [(o, "disappeared") for o in objs if o.visible(0) and not o.visible(FRAMES - 1)]
    if len(changes) == 1:
        o, what = changes[0]
        ans = f"{o.name} {what}"
        pool = [f"{name} {w}" for name in pool_obj for w in ("appeared", "disappeared")]
        qs.append(Question("changed", "what changed between the start and the end ?", ans, _options(rng, ans, pool, 3)))
    bg = "panning" if panning else "static"
    qs.append(Question("background", "is the background static or panning ?", bg,
                       _options(rng, bg, ["static", "panning"], 2)))
    return qs


def make_caption(objs: list[SynthObject], panning: bool) -> str:
    parts = [f"a {o.size} {o.colour} {o.shape} moves {o.direction} ."
             for o in sorted(objs, key=lambda o: (o.appear, o.colour))]
    parts.append(f"the background is {'panning' if panning else 'static'} .")
    return " ".join(parts)


def make_clip(split: str, index: int, seed: int = 0) -> SynthClip:
    """The clip `index` of `split` for base `seed`: frames, objects, questions and caption (deterministic)."""
    rng = clip_rng(split, index, seed)
    texture = str(rng.choice(TEXTURES))
    panning = bool(rng.random() < 0.5)
    if panning:
        a = rng.uniform(0, 2 * math.pi)
        speed = rng.uniform(2.0, 3.5)
        pan = (float(speed * math.cos(a)), float(speed * math.sin(a)))
    else:
        pan = (0.0, 0.0)
    objs = _sample_objects(rng)
    for o in objs:
        _plan_track(rng, o)
    frames = _render(rng, texture, pan, objs)
    questions = make_questions(rng, objs, panning)
    return SynthClip(split=split, index=index, seed=seed, frames=frames, texture=texture, panning=panning, pan=pan,
                     objects=objs, questions=questions, caption=make_caption(objs, panning))


def eval_questions(clip: SynthClip, per_clip: int = 3, include: tuple[str, ...] = ()) -> list[Question]:
    """A fixed, type-balanced subset of a clip's questions for evaluation (deterministic per clip).

    `include`: question types picked first when the clip has them (the benchmark's counting share)."""
    rng = np.random.default_rng(np.random.SeedSequence([SPLITS[clip.split], clip.seed, clip.index, 7]))
    by_type: dict[str, list[Question]] = {}
    for q in clip.questions:
        by_type.setdefault(q.qtype, []).append(q)
    types = list(by_type)
    rng.shuffle(types)
    # rare, temporal types first so they are not crowded out by the always-present ones
    types.sort(key=lambda t: ("background", "size", "count").index(t) if t in ("background", "size", "count") else -1)
    types.sort(key=lambda t: t not in include)  # stable: the included types move to the front
    picked = []
    for t in types[:per_clip]:
        cands = by_type[t]
        picked.append(cands[int(rng.integers(len(cands)))])
    return picked


def answer_words() -> set[str]:
    """Every word any answer, option, question or caption can contain."""
    words = set("how many distinct objects are in the video ? which object appeared last first disappeared "
                "direction does move did ever touch the edge what changed between start and end is background "
                "static or panning small large options : , . a moves describe this".split())
    words |= set(COLOURS) | set(SHAPES) | set(SIZES) | set(DIRECTIONS) | set(NUMBERS) | {"yes", "no", "appeared"}
    return words


# ------------------------------------------------------------------------------------------------ files

def write_split(out_dir: str | Path, split: str, n: int, *, seed: int = 0, per_clip: int = 3,
                codec: str = "h264") -> Path:
    """Write `n` clips of `split` as video files plus `manifest.jsonl` (one line per question, the
    `bench.eval_manifest` format: uri, question, options, answer, qtype) and `clips.jsonl` (objects,
    caption). Returns the manifest path (uris relative to it). The question is the bare question: the
    eval harness's default prompt template adds the options the way `Question.prompt("mc")` does."""
    from pipeline.sample_videos import write_video

    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    suffix = {"h264": ".mp4", "mjpeg": ".avi", "vp9": ".webm"}.get(codec, ".mp4")
    manifest = out / "manifest.jsonl"
    with open(manifest, "w") as mf, open(out / "clips.jsonl", "w") as cf:
        for i in range(n):
            clip = make_clip(split, i, seed)
            rel = f"videos/{clip.clip_id}{suffix}"
            write_video(out / rel, clip.frames, fps=FPS, codec=codec)
            cf.write(json.dumps({"uri": rel, **clip.meta()}) + "\n")
            for q in eval_questions(clip, per_clip):
                mf.write(json.dumps({"uri": rel, "question": q.question, "options": q.options,
                                     "answer": q.answer, "qtype": q.qtype, "clip_id": clip.clip_id}) + "\n")
    return manifest


def write_demo_clips(out_dir: str | Path, n: int = 4, *, seed: int = 0) -> dict[str, str]:
    """The first `n` test clips as video files, cycling through the codecs PyAV can write here; returns
    {file name: reference caption} (what `framescribe demo` shows next to the model's caption)."""
    from pipeline.sample_videos import CODECS, available_codecs, write_video

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    codecs = available_codecs()
    refs = {}
    for i in range(n):
        clip = make_clip("test", i, seed)
        codec = codecs[i % len(codecs)]
        name = f"{clip.clip_id}_{codec}{CODECS[codec][1]}"
        write_video(out / name, clip.frames, fps=FPS, codec=codec)
        refs[name] = clip.caption
    return refs


if __name__ == "__main__":  # python -m bench.synthetic_qa OUT_DIR [split] [n]
    import sys

    out_dir = sys.argv[1] if len(sys.argv) > 1 else "synthqa"
    split = sys.argv[2] if len(sys.argv) > 2 else "test"
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    print(write_split(out_dir, split, n))
