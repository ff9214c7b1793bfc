"""Qwen2.5-VL: visual tokens out of the vision tower + merger, full-sequence M-RoPE positions, splice."""
from __future__ import annotations

import numpy as np
import torch

from actors.generation import SplicedSequence
from actors.splice import EncodedVideo, PrunedVideo, VideoPromptIds, sequence_key_bias
from actors.vision_skip import encoded_groups, expand_groups, repeat_sources
from iwp import TokenLayout


class Qwen25VLAdapter(VideoPromptIds):
    arch = "qwen2_5_vl"

    def __init__(self, model, processor, *, skip_threshold: float | None = None):
        self.model = model
        self.skip_threshold = skip_threshold  # vision skip of repeated temporal groups; None: encode every group
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.video_token_id = model.config.video_token_id
        self.merge = model.config.vision_config.spatial_merge_size
        self.temporal_patch = model.config.vision_config.temporal_patch_size

    @property
    def language_model(self):
        return self.model.model.language_model

    def preprocess(self, frames: list[np.ndarray]) -> dict:
        """Pixel patches for a batch of videos, done once per video. On a GPU the uint8 frames are moved first
        and resized/normalised/patchified there: 4x fewer bytes to copy than float patches, and the actor's
        CPU work (~100 ms per 16-frame 448x448 video on one core) leaves the critical path."""
        kwargs = {"device": self.model.device} if self.model.device.type == "cuda" else {}
        return self.processor.video_processor(videos=list(frames), return_tensors="pt", do_sample_frames=False,
                                              **kwargs)

    @torch.inference_mode()
    def encode(self, frames: list[np.ndarray], timestamps: list[list[float]]) -> list[EncodedVideo]:
        inputs = self.preprocess(frames)
        device = self.model.device
        pixels = inputs["pixel_values_videos"].to(device)
        grid = inputs["video_grid_thw"].to(device)
        thws = grid.tolist()
        sources = []
        for f, (t, _, _) in zip(frames, thws):
            s = repeat_sources(f, self.temporal_patch, self.skip_threshold)
            sources.append(s if len(s) == t else list(range(t)))  # a frame count the processor changed: no skip
        # the tower attends within one temporal group (cu_seqlens per grid_t): run only the encoded groups
        per_video = pixels.split([t * h * w for t, h, w in thws])
        keep_pixels, keep_grid = [], []
        for px, (t, h, w), s in zip(per_video, thws, sources):
            enc = encoded_groups(s)
            keep_pixels.append(px if len(enc) == t else px.view(t, h * w, -1)[enc].reshape(len(enc) * h * w, -1))
            keep_grid.append([len(enc), h, w])
        feats = self.model.model.get_video_features(torch.cat(keep_pixels), torch.tensor(keep_grid, device=device),
                                                    return_dict=True).pooler_output
        videos = []
        for emb, thw, s, ts in zip(feats, thws, sources, timestamps):
            t, h, w = thw
            hm, wm = h // self.merge, w // self.merge
            emb = expand_groups(emb.view(-1, hm * wm, emb.shape[-1]), s)
            layout = TokenLayout(chunk_sizes=(hm * wm,) * t, grid_hw=(hm, wm))
            videos.append(EncodedVideo(embeds=emb, layout=layout,
                                       meta={"grid_thw": thw, "second_per_grid": self._seconds_per_grid(ts),
                                             "groups_encoded": len(encoded_groups(s))}))
        return videos

    def _seconds_per_grid(self, timestamps: list[float]) -> float:
        # one temporal token group spans `temporal_patch_size` sampled frames
        if len(timestamps) < 2 or timestamps[-1] <= timestamps[0]:
            return float(self.temporal_patch)
        step = (timestamps[-1] - timestamps[0]) / (len(timestamps) - 1)
        return float(self.temporal_patch * step)

    @torch.inference_mode()
    def splice(self, video: EncodedVideo, pruned: PrunedVideo, prompt: str) -> SplicedSequence:
        """Full sequence → M-RoPE positions on it → drop the pruned video tokens, keep everyone's positions."""
        ids = self.full_input_ids(video, prompt)
        token_type = (ids == self.video_token_id).int() * 2  # 0 text, 2 video
        grid = torch.tensor([video.meta["grid_thw"]], device=ids.device)
        positions, _ = self.model.model.get_rope_index(
            ids[None], token_type[None], video_grid_thw=grid,
            second_per_grid_ts=torch.tensor([video.meta["second_per_grid"]], device=ids.device))
        embeds = self.model.get_input_embeddings()(ids)
        video_idx = torch.nonzero(ids == self.video_token_id).squeeze(1)
        kept_idx = video_idx[pruned.keep]
        embeds[kept_idx] = pruned.embeds.to(embeds.dtype)
        keep_mask = ids != self.video_token_id
        keep_mask[kept_idx] = True
        return SplicedSequence(embeds=embeds[keep_mask], positions=positions[:, 0, keep_mask],
                               key_bias=sequence_key_bias(pruned, kept_idx, keep_mask))
