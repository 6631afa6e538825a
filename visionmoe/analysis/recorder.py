"""Recording routing decisions against what the images show: class, object size and domain of each routed item.

Per-image routing (indices [B, k]): an image counts once for every class and every size present in it, so a
matrix row total can exceed the number of images; an image without objects counts in the 'background' row.
Token routing (indices [B, T, k], tokens in raster order over a grid of the input image): a token whose centre lies
inside a ground-truth box counts for that box's class and size (for each distinct one, if boxes overlap); other
tokens are 'background'; tokens on the letterbox padding count nowhere. Every top-k choice is one assignment, also
the choices a full expert dropped (the drop rate is reported beside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from ultralytics.utils import ops

from ..nn.blocks import MoEBlock
from .domains import UNTAGGED
from .utilisation import UtilisationTracker

BACKGROUND = "background"
SIZES = ("small", "medium", "large")
# COCO's small/medium/large limits (32^2 and 96^2 px) on a 640x640 image, as fractions of the image area, so that
# the split does not depend on the resolution the dataset was stored at
SIZE_THRESHOLDS = ((32 / 640) ** 2, (96 / 640) ** 2)
THUMBNAIL = 160  # longest side of stored example images, px


@dataclass
class LayerRouting:
    """Routing of one MoE layer accumulated over the dataset.

    Attributes:
        tokens: Whether the layer routes tokens ([B, T, k]) rather than images ([B, k]).
        num_experts: E.
        top_k: k.
        matrices: factor ('class', 'size', 'domain') -> [rows, E] counts of assignments.
        entropy_sum: Sum over routed items of the router's probability entropy (nats).
        items: Routed items (images or tokens).
        examples: Per-image layers: per expert, ids of example images whose top-1 choice it was.
            Token layers: (image id, [h, w] top-1 expert per token, [h, w] top-1 dropped) per example image.
    """

    tokens: bool
    num_experts: int
    top_k: int
    matrices: dict[str, np.ndarray]
    entropy_sum: float = 0.0
    items: int = 0
    examples: list = field(default_factory=list)


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the raster token grid with h * w == tokens and the input's aspect ratio (one stride for both axes)."""
    stride = math.sqrt(height * width / tokens)
    h, w = round(height / stride), round(width / stride)
    if h * w != tokens:
        raise ValueError(f"{tokens} tokens do not tile a {height}x{width} input as a grid with one stride")
    return h, w


def box_size_index(area_fraction: torch.Tensor) -> torch.Tensor:
    """[n] size row (0 small, 1 medium, 2 large) from each box's share of the image area."""
    return torch.bucketize(area_fraction, torch.tensor(SIZE_THRESHOLDS, device=area_fraction.device))


def points_in_boxes(points: torch.Tensor, xyxy: torch.Tensor) -> torch.Tensor:
    """[n, P] bool, point j ([P, 2] xy) lies in box i ([n, 4] xyxy, right and bottom edges excluded)."""
    return ((points[None] >= xyxy[:, None, :2]) & (points[None] < xyxy[:, None, 2:])).all(-1)


def membership(item_box: torch.Tensor, box_rows: torch.Tensor, valid: torch.Tensor, rows: int) -> torch.Tensor:
    """[N, rows] 0/1 rows an item counts for: the rows of the boxes it belongs to, else the last (background) row.

    Args:
        item_box: [N, n] bool, item i belongs to box j.
        box_rows: [n] row of each box, < rows - 1.
        valid: [N] bool, items that count at all.
        rows: Number of rows including the background row.
    """
    hits = (item_box.float() @ F.one_hot(box_rows, rows - 1).float()) > 0  # [N, rows-1]
    background = ~hits.any(1, keepdim=True)
    return (torch.cat((hits, background), 1) & valid[:, None]).float()


class RoutingRecorder:
    """Accumulates every MoE layer's routing per batch: utilisation (via UtilisationTracker), router entropy,
    routing matrices by class, size and domain, and example images for routing maps."""

    def __init__(
        self,
        named_blocks: list[tuple[str, MoEBlock]],
        names: dict[int, str],
        domains: dict[str, str] | None = None,
        examples: int = 8,
    ):
        """
        Args:
            named_blocks: (name, block) of every MoE layer, as `MoEModel.named_moe_blocks()` gives them.
            names: Class names by index.
            domains: {image stem: domain} tags, or None if the dataset has none (see analysis.domains).
            examples: Example images to keep per expert (per-image routing) or per layer (token routing); 0 keeps none.
        """
        self.blocks = named_blocks
        self.domains = domains
        self.examples = examples
        self.rows: dict[str, list[str]] = {
            "class": [names[i] for i in range(len(names))] + [BACKGROUND],
            "size": [*SIZES, BACKGROUND],
        }
        if domains is not None:
            self.rows["domain"] = sorted(set(domains.values()) - {UNTAGGED}) + [UNTAGGED]
        self.utilisation = UtilisationTracker()
        self.layers: dict[str, LayerRouting] = {}
        self.thumbnails: dict[int, np.ndarray] = {}  # image id -> RGB uint8 thumbnail of an example image
        self.images = 0

    @torch.no_grad()
    def update(self, batch: dict[str, Any]) -> None:
        """Add the blocks' last routing, which must come from the forward pass on this preprocessed val batch."""
        self.utilisation.update(self.blocks)
        img = batch["img"]
        b, _, height, width = img.shape
        boxes = self._boxes(batch, height, width)
        for name, block in self.blocks:
            if block.routing is not None:
                self._update_layer(name, block, batch, boxes, height, width)
        self.images += b

    def _boxes(self, batch: dict[str, Any], height: int, width: int) -> dict[str, torch.Tensor]:
        """Ground truth in input pixels, with class and size rows, plus each image's domain row and content area."""
        device = batch["img"].device
        xyxy = ops.xywh2xyxy(batch["bboxes"].float()) * torch.tensor([width, height, width, height], device=device)
        # the letterboxed content region of each image: resized original, offset by the padding
        gains = torch.tensor([rp[0] for rp in batch["ratio_pad"]], device=device, dtype=torch.float32)  # [B, 2] h, w
        pads = torch.tensor([rp[1] for rp in batch["ratio_pad"]], device=device, dtype=torch.float32)  # [B, 2] w, h
        ori = torch.tensor([list(s) for s in batch["ori_shape"]], device=device, dtype=torch.float32)  # [B, 2] h, w
        size = (ori * gains).flip(1)  # [B, 2] content w, h
        content = torch.cat((pads, pads + size), 1)  # [B, 4] xyxy
        img_idx = batch["batch_idx"].long()
        wh = xyxy[:, 2:] - xyxy[:, :2]
        area = (wh[:, 0] * wh[:, 1]) / size[img_idx].prod(1).clamp(min=1)
        boxes = {
            "xyxy": xyxy,
            "image": img_idx,
            "class": batch["cls"].view(-1).long(),
            "size": box_size_index(area),
            "content": content,
        }
        if self.domains is not None:
            rows = self.rows["domain"]
            domain = [rows.index(self.domains.get(Path(f).stem, UNTAGGED)) for f in batch["im_file"]]
            boxes["domain"] = torch.tensor(domain, device=device)
        return boxes

    def _update_layer(
        self, name: str, block: MoEBlock, batch: dict, boxes: dict[str, torch.Tensor], height: int, width: int
    ) -> None:
        routing = block.routing
        e, k = block.router.num_experts, routing.indices.shape[-1]
        tokens = routing.indices.dim() == 3
        layer = self.layers.get(name)
        if layer is None:
            matrices = {f: np.zeros((len(rows), e), dtype=np.int64) for f, rows in self.rows.items()}
            examples = [] if tokens else [[] for _ in range(e)]
            layer = self.layers[name] = LayerRouting(tokens, e, k, matrices, examples=examples)
        b = routing.indices.shape[0]
        indices = routing.indices.reshape(-1, k)  # [N, k], N = B or B*T, image-major
        chosen = F.one_hot(indices, e).sum(1).float()  # [N, E] assignments per item
        probs = routing.probs.reshape(-1, e).float()
        layer.entropy_sum += float(-(probs * probs.clamp(min=1e-12).log()).sum())
        layer.items += indices.shape[0]

        n_images = torch.arange(b, device=indices.device)
        in_image = n_images[:, None] == boxes["image"][None]  # [B, n]
        if tokens:
            h, w = token_grid(routing.indices.shape[1], height, width)
            ys, xs = torch.meshgrid(
                (torch.arange(h, device=indices.device) + 0.5) * height / h,
                (torch.arange(w, device=indices.device) + 0.5) * width / w,
                indexing="ij",
            )
            centres = torch.stack((xs.flatten(), ys.flatten()), 1)  # [T, 2]
            inside = points_in_boxes(centres, boxes["xyxy"])  # [n, T]
            item_box = (in_image[:, None, :] & inside.T[None]).reshape(-1, inside.shape[0])  # [B*T, n]
            valid = points_in_boxes(centres, boxes["content"]).reshape(-1)  # [B*T], off the padding
            item_image = n_images.repeat_interleave(h * w)
            grid = (h, w)
        else:
            item_box, valid, item_image = in_image, torch.ones(b, dtype=torch.bool, device=indices.device), n_images
            grid = (1,)
        for factor, matrix in layer.matrices.items():
            if factor == "domain":
                member = F.one_hot(boxes["domain"][item_image], matrix.shape[0]).float() * valid[:, None]
            else:
                member = membership(item_box, boxes[factor], valid, matrix.shape[0])
            matrix += (member.T @ chosen).round().long().cpu().numpy()
        if self.examples:
            self._keep_examples(layer, block, batch, indices[:, 0].view(b, *grid))

    def _keep_examples(self, layer: LayerRouting, block: MoEBlock, batch: dict, top1: torch.Tensor) -> None:
        """Keep example images: per expert for per-image routing, the first images for token maps.

        top1: top-1 expert per image [B, 1], or per token on its grid [B, h, w].
        """
        for i in range(top1.shape[0]):
            image_id = self.images + i
            if layer.tokens:
                if len(layer.examples) >= self.examples:
                    return
                kept = getattr(block, "kept", None)
                dropped = ~kept[i, :, 0].view_as(top1[i]) if kept is not None else torch.zeros_like(top1[i]).bool()
                layer.examples.append((image_id, top1[i].cpu().numpy(), dropped.cpu().numpy()))
            else:
                chosen = layer.examples[int(top1[i, 0])]
                if len(chosen) >= self.examples:
                    continue
                chosen.append(image_id)
            if image_id not in self.thumbnails:
                self.thumbnails[image_id] = thumbnail(batch["img"][i])


def thumbnail(img: torch.Tensor, size: int = THUMBNAIL) -> np.ndarray:
    """[3, H, W] RGB float image in [0, 1] -> [h, w, 3] uint8 with its longest side at most `size`."""
    array = (img.float().clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
    scale = size / max(array.shape[:2])
    if scale < 1:
        dsize = (round(array.shape[1] * scale), round(array.shape[0] * scale))
        array = cv2.resize(array, dsize, interpolation=cv2.INTER_AREA)
    return array
