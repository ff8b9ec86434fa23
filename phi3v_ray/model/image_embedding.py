"""The image side of Phi-3.5-vision: CLIP crops → HD feature map with separators → projector.

Weight names follow the official checkpoint under `model.vision_embed_tokens.`:
`img_processor` (a CLIPVisionModel), `glb_GN`, `sub_GN` and `img_projection.{0,2}`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import CLIPVisionModel

from ..constants import CROP_SIZE, GRID
from .configuration import Phi3VConfig

MERGE = 2  # 2×2 neighbouring patches are concatenated into one feature


def tokens_per_image(h_crops: int, w_crops: int, grid: int = GRID) -> int:
    """Sequence length of one image: sub-grid rows with separators, glb_GN, global rows with separators."""
    return (h_crops * w_crops + 1) * grid * grid + 1 + (h_crops + 1) * grid


class Phi3VImageEmbedding(nn.Module):
    """Turns `pixel_values` (n_img, crops, 3, 336, 336) into one feature sequence per image."""

    # CLIP output used as the feature: hidden_states[-2], i.e. the output of the second-to-last
    # encoder layer, before post_layernorm. The last layer and post_layernorm never run.
    FEATURE_LAYER = -2

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        vision_config = config.vision_config
        vision_config._attn_implementation = config._attn_implementation or "sdpa"
        if vision_config.image_size != CROP_SIZE:
            raise ValueError(f"the HD transform needs {CROP_SIZE}px crops; vision_config.image_size is {vision_config.image_size}")
        clip = CLIPVisionModel(vision_config)
        if hasattr(clip, "vision_model"):  # transformers < 5.2x nests the transformer one level down
            self.img_processor = clip
        else:  # keep the checkpoint's `img_processor.vision_model.*` names
            self.img_processor = nn.Module()
            self.img_processor.vision_model = clip
        self.grid = vision_config.image_size // vision_config.patch_size // MERGE  # 12 for ViT-L/14-336
        self.image_dim_out = config.image_dim_out
        if self.image_dim_out != vision_config.hidden_size:
            raise ValueError(
                f"img_processor.image_dim_out ({self.image_dim_out}) must equal the CLIP hidden size "
                f"({vision_config.hidden_size})"
            )
        dim = self.image_dim_out * MERGE * MERGE
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.img_projection = nn.Sequential(
            nn.Linear(dim, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        for module in clip.modules():  # lets the parent's _init_weights apply CLIP's own scheme
            object.__setattr__(module, "_phi3v_clip_owner", clip)
        layer_params = inspect.signature(self.vision_transformer.encoder.layers[0].forward).parameters
        self._layer_takes_causal_mask = "causal_attention_mask" in layer_params
        self.num_feature_layers = vision_config.num_hidden_layers + 1 + self.FEATURE_LAYER  # 23 of 24 for ViT-L

    @property
    def vision_transformer(self) -> CLIPVisionModel | nn.Module:
        """The module holding embeddings / pre_layrnorm / encoder / post_layernorm."""
        return self.img_processor.vision_model

    def unused_parameters(self) -> list[nn.Parameter]:
        """CLIP's last layer and post_layernorm: kept for the checkpoint layout, never in the graph."""
        vm = self.vision_transformer
        unused = list(vm.post_layernorm.parameters())
        for layer in vm.encoder.layers[self.num_feature_layers :]:
            unused += list(layer.parameters())
        return unused

    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """CLIP patch features of each crop, CLS dropped: (n, 3, 336, 336) → (n, 576, 1024)."""
        vm = self.vision_transformer
        crops = crops.to(dtype=vm.embeddings.patch_embedding.weight.dtype)
        hidden = vm.pre_layrnorm(vm.embeddings(crops))  # (n, 577, 1024)
        for layer in vm.encoder.layers[: self.num_feature_layers]:
            if self._layer_takes_causal_mask:
                hidden = layer(hidden, None, None)
            else:
                hidden = layer(hidden, None)
            if isinstance(hidden, tuple):  # older transformers return (hidden_states,)
                hidden = hidden[0]
        return hidden[:, 1:]  # (n, 576, 1024)

    def merge_2x2(self, feats: torch.Tensor) -> torch.Tensor:
        """(n, 576, C) → (n, 12, 12, 4C); channels hold the 2×2 block in (dy, dx) order (0,0),(0,1),(1,0),(1,1)."""
        n, _, c = feats.shape
        g = self.grid
        x = feats.reshape(n, g, MERGE, g, MERGE, c)  # (n, gy, dy, gx, dx, C)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (n, gy, gx, dy, dx, C)
        return x.reshape(n, g, g, MERGE * MERGE * c)  # (n, 12, 12, 4C)

    def with_row_separators(self, grid_feats: torch.Tensor) -> torch.Tensor:
        """Append sub_GN at the end of every row and flatten: (rows, cols, D) → (rows·(cols+1), D)."""
        rows, _, d = grid_feats.shape
        sep = self.sub_GN.reshape(1, 1, d).expand(rows, 1, d).to(grid_feats.dtype)  # (rows, 1, D)
        return torch.cat([grid_feats, sep], dim=1).reshape(-1, d)  # (rows·(cols+1), D)

    def hd_sequence(self, merged: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """One image's features in `sub_glb` order.

        merged: (1 + h·w, 12, 12, 4C) for [global, crops row-major]. Returns (tokens_per_image(h, w), 4C).
        """
        g, d = self.grid, merged.shape[-1]
        glb = self.with_row_separators(merged[0])  # (12·13, 4C)
        sub = merged[1 : 1 + h * w].reshape(h, w, g, g, d)  # (h, w, 12, 12, 4C)
        sub = sub.permute(0, 2, 1, 3, 4).reshape(h * g, w * g, d)  # (12h, 12w, 4C)
        sub = self.with_row_separators(sub)  # (12h·(12w+1), 4C)
        return torch.cat([sub, self.glb_GN.reshape(1, d).to(sub.dtype), glb], dim=0)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (n_img, max_crops+1, 3, 336, 336), image_sizes (n_img, 2) → list of (tokens_i, hidden)."""
        crop_counts = []
        valid = []
        for i, (height, width) in enumerate(image_sizes.tolist()):
            h, w = int(height) // CROP_SIZE, int(width) // CROP_SIZE
            if 1 + h * w > pixel_values.shape[1]:
                raise ValueError(
                    f"image {i}: image_sizes {height}x{width} needs {1 + h * w} crops, pixel_values has {pixel_values.shape[1]}"
                )
            crop_counts.append((h, w))
            # Padding crops beyond 1 + h·w would be discarded after CLIP; skip computing them at all.
            valid.append(pixel_values[i, : 1 + h * w])
        merged = self.merge_2x2(self.crop_features(torch.cat(valid, dim=0)))  # (Σ crops, 12, 12, 4C)
        sequences = []
        offset = 0
        for h, w in crop_counts:
            sequences.append(self.hd_sequence(merged[offset : offset + 1 + h * w], h, w))
            offset += 1 + h * w
        lengths = [s.shape[0] for s in sequences]
        projected = self.img_projection(torch.cat(sequences, dim=0).to(self.glb_GN.dtype))
        return list(projected.split(lengths, dim=0))
