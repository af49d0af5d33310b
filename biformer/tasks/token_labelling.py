"""Token labelling's model side: the student's dense head, the loss, MixToken, and a teacher's dense scores
(`biformer.tasks.labelling` runs a teacher over a data set).

Facts from LV-ViT (zihangJiang/TokenLabeling) and where ours differs, on purpose:
- The total loss is the class loss plus `weight` x the mean over tokens of each token's soft-target cross-entropy
  (the paper's beta = 0.5; its main.py's --dense-weight defaults to 1.0). Ours supervises the class output with
  the ground truth (smoothed); LV-ViT's default uses the teacher's crop-level score instead.
- MixToken: lambda ~ Beta(1, 1) once per batch, a CutMix box on the token grid, the partner the batch reversed,
  lambda recomputed from the clipped box. LV-ViT mixes patch-embedding tokens and swaps the dense outputs back;
  a hierarchical model has no single token grid to mix in, so ours mixes the images in boxes aligned to the final
  tokens and mixes the token labels the same way, which asks the same of each token.
- LV-ViT's eval output adds 0.5 x the dense head's max over tokens; ours evaluates and exports the class path
  alone, so a token-labelled model's weights file holds a plain classifier.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from timm.data.mixup import one_hot
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn

from ..data.token_labels import TokenTargets
from ..errors import UserError


class TokenLabelOutputs(NamedTuple):
    logits: Tensor  # (B, C) the class path's
    token_logits: Tensor  # (B, gh, gw, C) the dense head's, one per final token


def feature_map(model: nn.Module, images: Tensor, name: str) -> Tensor:
    """The model's final feature map (B, C, H, W); UserError for a model whose features are no such map."""
    features = model.forward_features(images)
    if features.ndim != 4 or features.shape[1] != model.num_features:
        raise UserError(f"{name}: token labels need a model whose forward_features gives a (batch, channels, height, "
                        f"width) map, as BiFormer's and ResNets' do; it gave {tuple(features.shape)}")
    return features


class TokenLabelledClassifier(nn.Module):
    """A timm classifier with a dense head on its final tokens (the paper's BiFormer-S* / B*): in training its
    forward gives TokenLabelOutputs, in eval the classifier's logits alone."""

    def __init__(self, classifier: nn.Module, name: str) -> None:
        super().__init__()
        if not hasattr(classifier, "forward_features") or not hasattr(classifier, "forward_head"):
            raise UserError(f"--token-label trains a dense head on the final tokens: {name} has no "
                            "forward_features / forward_head")
        self.classifier, self.name = classifier, name
        self.token_head = nn.Linear(classifier.num_features, classifier.num_classes)
        nn.init.trunc_normal_(self.token_head.weight, std=0.02)
        nn.init.zeros_(self.token_head.bias)
        self._grids: dict[int, tuple[int, int]] = {}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The classifier's names that take no weight decay (timm's rule reads them from the trained module)."""
        names = self.classifier.no_weight_decay() if hasattr(self.classifier, "no_weight_decay") else set()
        return {f"classifier.{name}" for name in names}

    def forward(self, images: Tensor) -> Tensor | TokenLabelOutputs:
        features = feature_map(self.classifier, images, self.name)
        logits = self.classifier.forward_head(features)
        if not self.training:
            return logits
        return TokenLabelOutputs(logits, self.token_head(features.permute(0, 2, 3, 1)))

    @torch.no_grad()
    def token_grid(self, img_size: int) -> tuple[int, int]:
        """(rows, columns) of the final tokens of an img_size square input (found by a forward pass, once)."""
        if img_size not in self._grids:
            was_training = self.training
            self.eval()  # BatchNorm statistics stay as they are
            try:
                probe = torch.zeros(1, 3, img_size, img_size, device=next(self.parameters()).device)
                rows, columns = feature_map(self.classifier, probe, self.name).shape[-2:]
            finally:
                self.train(was_training)
            self._grids[img_size] = int(rows), int(columns)
        return self._grids[img_size]


class TokenLabelLoss(nn.Module):
    """Class loss + weight x token loss, each timm's soft-target cross-entropy (the token one averaged over the
    tokens too); `parts` holds the last batch's two terms (detached)."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.soft_cross_entropy = SoftTargetCrossEntropy()
        self.parts: dict[str, Tensor] = {}

    def forward(self, outputs: TokenLabelOutputs, targets: TokenTargets) -> Tensor:
        class_loss = self.soft_cross_entropy(outputs.logits.float(), targets.labels)
        token_loss = self.soft_cross_entropy(outputs.token_logits.float(), targets.tokens)
        self.parts = {"class_loss": class_loss.detach(), "token_loss": token_loss.detach()}
        return class_loss + self.weight * token_loss


def smoothed(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B, C) targets: 1 - smoothing + smoothing / C for the label, smoothing / C elsewhere (timm's mixup targets)."""
    off = smoothing / num_classes
    return one_hot(labels, num_classes, on_value=1 - smoothing + off, off_value=off)


class MixToken:
    """CutMix on the student's final token grid: a box of tokens of each image comes from the batch's reversed
    order, in the image (a box of pixels aligned to those tokens) and in the token labels; the class targets mix
    by the area share. `box` is the last batch's (top, left, bottom, right) in tokens."""

    def __init__(self, grid: tuple[int, int], alpha: float = 1.0) -> None:
        self.grid, self.alpha = grid, alpha
        self.box: tuple[int, int, int, int] = (0, 0, 0, 0)

    def sample_box(self) -> tuple[int, int, int, int]:
        rows, columns = self.grid
        lam = np.random.beta(self.alpha, self.alpha)
        cut = np.sqrt(1.0 - lam)
        height, width = int(rows * cut), int(columns * cut)
        center_row, center_column = np.random.randint(rows), np.random.randint(columns)
        # the box is `height` tokens tall before clipping (timm's cutmix box, center -+ height // 2, is empty for a
        # height of 1, which on a grid of 2 or 3 tokens is most boxes)
        top, bottom = np.clip([center_row - height // 2, center_row - height // 2 + height], 0, rows)
        left, right = np.clip([center_column - width // 2, center_column - width // 2 + width], 0, columns)
        return int(top), int(left), int(bottom), int(right)

    def __call__(self, images: Tensor, targets: TokenTargets) -> tuple[Tensor, TokenTargets]:
        """images (B, 3, H, W), targets with (B, C) class distributions; the mixed pair."""
        self.box = top, left, bottom, right = self.sample_box()
        rows, columns = self.grid
        height, width = images.shape[-2:]
        y0, y1 = round(top * height / rows), round(bottom * height / rows)
        x0, x1 = round(left * width / columns), round(right * width / columns)
        images, tokens = images.clone(), targets.tokens.clone()
        images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
        tokens[:, top:bottom, left:right] = targets.tokens.flip(0)[:, top:bottom, left:right]
        share = (bottom - top) * (right - left) / (rows * columns)
        labels = (1 - share) * targets.labels + share * targets.labels.flip(0)
        return images, TokenTargets(labels, tokens)


@torch.no_grad()
def dense_scores(teacher: nn.Module, images: Tensor, name: str, *, check: bool = False) -> Tensor:
    """A teacher's class probabilities per cell of its final feature map, (B, G, G, C): its linear classifier
    applied at every position. check: first confirm that the mean of those logits is the teacher's own output
    (true of a linear head after average pooling), so that the map means what the classifier means."""
    features = feature_map(teacher, images, name)
    classifier = teacher.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise UserError(f"--teacher {name}: its classifier is a {type(classifier).__name__}, not a linear layer "
                        "over pooled features; a dense score map needs one")
    logits = classifier(features.permute(0, 2, 3, 1).float())
    if check:
        pooled = teacher.forward_head(features).float()
        if not torch.allclose(logits.mean((1, 2)), pooled, atol=1e-3, rtol=1e-3):
            raise UserError(f"--teacher {name}: its head is not a linear map of average-pooled features (the mean of "
                            "its per-position logits differs from its output), so its score map would not mean "
                            "what its classifier means")
    return logits.softmax(-1)

