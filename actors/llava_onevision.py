"""LLaVA-OneVision: per-frame visual tokens after the projector + pooling, 1-D positions, splice."""
from __future__ import annotations

import math

import numpy as np
import torch

from actors.generation import SplicedSequence
from actors.splice import EncodedVideo, PrunedVideo, VideoPromptIds, sequence_key_bias
from actors.vision_skip import encoded_groups, expand_groups, repeat_sources
from iwp import TokenLayout


# Frames of several videos go through SigLIP in one call; the tower keeps every layer's hidden states
# (B·T·729·1152 each), so a call is capped to bound that memory.
MAX_FRAMES_PER_VISION_CALL = 64


class LlavaOneVisionAdapter(VideoPromptIds):
    arch = "llava_onevision"

    def __init__(self, model, processor, *, original_positions: bool = True, skip_threshold: float | None = None):
        self.model = model
        self.skip_threshold = skip_threshold  # vision skip of repeated frames; None: encode every frame
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.video_token_id = model.config.video_token_index
        # keep each kept token's position from the full sequence (True) or renumber 0..L'-1 (False)
        self.original_positions = original_positions
        vc = model.config.vision_config
        side = math.ceil((vc.image_size // vc.patch_size) / 2)  # get_video_features pools 2x2 bilinear
        self.grid_hw = (side, side)

    @property
    def language_model(self):
        return self.model.model.language_model

    def preprocess(self, frames: list[np.ndarray]) -> torch.Tensor:
        """Pixel values (B, T, 3, S, S) of videos with equal frame counts. On a GPU the uint8 frames are moved
        first and resized/normalised there: 4x fewer bytes to copy and no CPU work on the actor's critical path."""
        kwargs = {"device": self.model.device} if self.model.device.type == "cuda" else {}
        return self.processor.video_processor(videos=list(frames), return_tensors="pt", **kwargs)["pixel_values_videos"]

    @torch.inference_mode()
    def encode(self, frames: list[np.ndarray], timestamps: list[list[float]]) -> list[EncodedVideo]:
        cfg = self.model.config
        per_frame = self.grid_hw[0] * self.grid_hw[1]
        videos: list[EncodedVideo | None] = [None] * len(frames)
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(frames):  # one vision call per frame count (videos may differ in length) ...
            groups.setdefault(len(f), []).append(i)
        calls = []
        for t, idx in groups.items():  # ... and at most MAX_FRAMES_PER_VISION_CALL frames per call
            step = max(1, MAX_FRAMES_PER_VISION_CALL // max(1, t))
            calls += [idx[k:k + step] for k in range(0, len(idx), step)]
        for idx in calls:
            pixels = self.preprocess([frames[i] for i in idx]).to(self.model.device, self.model.dtype)
            # SigLIP attends within one frame: only frames that do not repeat the last encoded one run the tower
            sources = [repeat_sources(frames[i], 1, self.skip_threshold) for i in idx]
            sources = [s if len(s) == pixels.shape[1] else list(range(pixels.shape[1])) for s in sources]
            unique = torch.cat([pixels[j, encoded_groups(s)] for j, s in enumerate(sources)])
            feats = self.model.model.get_video_features(
                unique[None], vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True).pooler_output
            per_frame_feats = feats[0, :-1].view(unique.shape[0], per_frame, -1)
            trailing = feats[0, -1:]  # the image newline, the same for every video
            start = 0
            for j, i in enumerate(idx):
                n_enc = len(encoded_groups(sources[j]))
                embeds = expand_groups(per_frame_feats[start:start + n_enc], sources[j])
                start += n_enc
                layout = TokenLayout(chunk_sizes=(per_frame,) * len(sources[j]), grid_hw=self.grid_hw)
                videos[i] = EncodedVideo(embeds=embeds, layout=layout, trailing=trailing,
                                         meta={"groups_encoded": n_enc})
        return videos

    @torch.inference_mode()
    def splice(self, video: EncodedVideo, pruned: PrunedVideo, prompt: str) -> SplicedSequence:
        ids = self.full_input_ids(video, prompt)
        embeds = self.model.get_input_embeddings()(ids)
        video_idx = torch.nonzero(ids == self.video_token_id).squeeze(1)
        frame_idx, trailing_idx = video_idx[:-video.trailing.shape[0]], video_idx[-video.trailing.shape[0]:]
        kept_idx = frame_idx[pruned.keep]
        embeds[kept_idx] = pruned.embeds.to(embeds.dtype)
        embeds[trailing_idx] = video.trailing.to(embeds.dtype)  # the newline token is never pruned
        keep_mask = ids != self.video_token_id
        keep_mask[kept_idx] = True
        keep_mask[trailing_idx] = True
        n_kept = int(keep_mask.sum())
        positions = (torch.nonzero(keep_mask).squeeze(1) if self.original_positions
                     else torch.arange(n_kept, device=ids.device))
        return SplicedSequence(embeds=embeds[keep_mask], positions=positions[None],
                               key_bias=sequence_key_bias(pruned, kept_idx, keep_mask))
