"""Networks: a ResNet backbone that gives a pooled vector *and* a feature map, BYOL's MLP heads,
PixPro's pixel projector and Pixel Propagation Module, and the online/target pair with the one
forward pass that every trainer here shares and each method's loss, composed in one place
(:meth:`BYOLNetworks.loss`).

The target network is a real, separate copy (``copy.deepcopy``) whose parameters never receive
gradients; it only moves through :func:`byol_nb.ema.ema_update_`. All heads are built in
``__init__``, before any optimizer or DDP wrapper exists, so they are trained and synchronised,
and only the heads a method uses are built: DDP waits for a gradient of every parameter.
"""

from __future__ import annotations

import copy
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
import torchvision
from einops import rearrange
from torch import Tensor, nn

from byol_nb.augment import View
from byol_nb.config import BACKBONES, PIXEL_METHODS, TrainConfig, backbone_stride
from byol_nb.distributed import gather
from byol_nb.losses import cell_distances, multi_crop_byol_loss, symmetric_pixel_contrast_loss, symmetric_pixpro_loss


class Backbone(nn.Module):
    """A torchvision ResNet without its classifier.

    ``small_stem`` swaps the 7x7/2 convolution and the max-pool for one 3x3/1 convolution, the usual
    change for 32-64 px images (the feature map is then 8x smaller than the input instead of 32x).
    """

    def __init__(self, name: str = "resnet18", small_stem: bool = False, pretrained: bool = False) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
        weights = "DEFAULT" if pretrained else None
        resnet = getattr(torchvision.models, name)(weights=weights)
        if small_stem:
            resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            resnet.maxpool = nn.Identity()
        self.name, self.small_stem = name, small_stem
        self.dim = resnet.fc.in_features
        self.body = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                  resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)

    def stride(self) -> int:
        """Input pixels per feature-map cell."""
        return backbone_stride(self.small_stem)

    def feature_map(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, dim, S / stride, S / stride)."""
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, dim), global-average-pooled."""
        return self.body(images).mean(dim=(2, 3))


class MLP(nn.Module):
    """BYOL's projector and predictor: Linear, BatchNorm, ReLU, Linear."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PixelProjector(nn.Module):
    """PixPro's pixel projector, the MLP applied at every cell: 1x1 conv, BatchNorm, ReLU, 1x1 conv."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.BatchNorm2d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1))

    def forward(self, fmap: Tensor) -> Tensor:
        """(B, in_dim, H, W) -> (B, out_dim, H, W)."""
        return self.net(fmap)


class PixelPropagation(nn.Module):
    """PixPro's Pixel Propagation Module (PPM): each pixel becomes a similarity-weighted sum of the
    transformed pixels of its own view, which smooths features inside an object::

        s_ij = max(cos(x_i, x_j), 0) ** gamma        y_i = sum_j s_ij g(x_j)        output y_i / |y_i|

    ``g`` is a 1x1 convolution (the paper's best transform). As in the official code, g's outputs are
    L2-normalised per pixel *before* the sum, so every pixel's vote has the same length and only the
    similarity decides its weight.
    """

    def __init__(self, dim: int, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.transform = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W), unit length at every cell."""
        height, width = x.shape[-2:]
        values = rearrange(F.normalize(self.transform(x), dim=1), "b c h w -> b c (h w)")  # g(x_j)
        unit = rearrange(F.normalize(x, dim=1), "b c h w -> b c (h w)")
        similarity = torch.einsum("bci,bcj->bij", unit, unit).clamp(min=0) ** self.gamma  # s_ij
        propagated = torch.einsum("bij,bcj->bci", similarity, values)  # y_i = sum_j s_ij g(x_j)
        return rearrange(F.normalize(propagated, dim=1), "b c (h w) -> b c h w", h=height, w=width)


class Encoder(nn.Module):
    """Backbone followed by the projector(s): the part that has a target (EMA) twin.

    With ``pixel=True`` it also holds PixPro's :class:`PixelProjector`, so the target's copy of it is
    made and EMA-updated together with the rest.
    """

    def __init__(self, backbone: Backbone, hidden_dim: int, out_dim: int, pixel: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = MLP(backbone.dim, hidden_dim, out_dim)
        self.pixel_projector = PixelProjector(backbone.dim, hidden_dim, out_dim) if pixel else None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (feature map, projection of the pooled features)."""
        fmap = self.backbone.feature_map(images)
        return fmap, self.projector(fmap.mean(dim=(2, 3)))


class Outputs(NamedTuple):
    """Both networks' outputs for a batch of views (every view of the batch stacked on dim 0)."""

    fmap: Tensor  # online feature maps (N, dim, H, W)
    projection: Tensor  # online projections (N, out_dim)
    target_fmap: Tensor  # target feature maps, no gradient
    target_projection: Tensor  # target projections, no gradient


class BYOLNetworks(nn.Module):
    """Online encoder + predictor, and the target encoder (an EMA copy of the online one).

    ``method`` decides the pixel heads: the pixel methods add PixPro's pixel projector to both
    encoders, and ``pixpro`` adds the online-only PPM (``propagation``), the pixel branch's
    counterpart of the predictor. Pixel contrast compares the pixel projections directly.
    """

    def __init__(self, backbone: Backbone, hidden_dim: int = 4096, out_dim: int = 256, method: str = "byol",
                 ppm_gamma: float = 2.0) -> None:
        super().__init__()
        self.online = Encoder(backbone, hidden_dim, out_dim, pixel=method in PIXEL_METHODS)
        self.predictor = MLP(out_dim, hidden_dim, out_dim)
        self.propagation = PixelPropagation(out_dim, ppm_gamma) if method == "pixpro" else None
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)
        for module in self.target.modules():
            # The target normalises with batch statistics (train mode, as in the paper), but its
            # running statistics move only through the EMA of the online network's, like its weights.
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.0

    @classmethod
    def from_config(cls, config: TrainConfig) -> "BYOLNetworks":
        """The networks of a run: its backbone, head sizes, method and PPM."""
        backbone = Backbone(config.backbone, small_stem=config.small_stem, pretrained=config.pretrained)
        return cls(backbone, config.proj_hidden, config.proj_dim, method=config.method, ppm_gamma=config.ppm_gamma)

    @property
    def backbone(self) -> Backbone:
        return self.online.backbone

    def forward(self, views: Tensor) -> Outputs:
        """The views of a batch (stacked on dim 0) through the online and the target network, one
        forward pass each, so that BatchNorm sees every view of the batch together."""
        fmap, projection = self.online(views)
        with torch.no_grad():
            target_fmap, target_projection = self.target(views)
        return Outputs(fmap, projection, target_fmap, target_projection)

    def instance_loss(self, outputs: Outputs, local: Sequence[Tensor] = (), use_predictor: bool = True,
                      stop_gradient: bool = True) -> Tensor:
        """BYOL's loss for :meth:`forward`'s outputs of the two views: each view's prediction
        against the other view's target projection, summed (``byol_nb.losses``).

        ``local``: the online projections of each extra multi-crop view, which predict both main
        views' targets (through the predictor in one pass, as the module computes them).
        ``use_predictor=False`` and ``stop_gradient=False`` are lesson 02's collapse ablations.
        """
        predict = self.predictor if use_predictor else nn.Identity()
        p1, p2 = predict(outputs.projection).chunk(2)
        z1, z2 = outputs.target_projection.chunk(2)
        local_predictions = predict(torch.cat(list(local))).chunk(len(local)) if local else ()
        return multi_crop_byol_loss(p1, p2, z1, z2, local_predictions, stop_gradient)

    def pixel_loss(self, outputs: Outputs, view1: View, view2: View, config: TrainConfig) -> Tensor:
        """PixPro's or pixel contrast's loss on the feature maps of both views (stacked on the batch).

        Which cells match comes from this step's own crop boxes and flips, sample by sample.
        """
        projection = self.online.pixel_projector(outputs.fmap)
        with torch.no_grad():
            target = self.target.pixel_projector(outputs.target_fmap)
        t1, t2 = target.chunk(2)
        distance = cell_distances(view1.boxes, view1.flips, view2.boxes, view2.flips, tuple(outputs.fmap.shape[-2:]))
        if config.method == "pixpro":
            y1, y2 = self.propagation(projection).chunk(2)
            return symmetric_pixpro_loss(y1, y2, t1, t2, distance < config.pixel_threshold)
        q1, q2 = projection.chunk(2)
        # The one place where the pixel branch crosses processes: every process's target pixels are
        # negatives (the global batch); no gradient flows into them. The positive pairs stay local.
        return symmetric_pixel_contrast_loss(q1, q2, t1, t2, distance, config.pixel_temperature,
                                             gather(t1), gather(t2),
                                             config.pixel_threshold, config.pixel_negative_distance)

    def loss(self, outputs: Outputs, view1: View, view2: View, config: TrainConfig,
             local: Sequence[Tensor] = ()) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss of ``config.method`` and its parts, for the logs.

        byol: :meth:`instance_loss` (with the multi-crop views' projections ``local``). The pixel
        methods: :meth:`pixel_loss` plus ``instance_weight`` times BYOL's loss on the pooled features
        (PixPro's "+ instance" variant; weight 0 is the paper's pixel-only recipe).
        """
        if not config.pixel:
            return self.instance_loss(outputs, local), {}
        loss = pixel = self.pixel_loss(outputs, view1, view2, config)
        parts = {"pixel_loss": pixel}
        if config.instance_weight > 0:
            parts["instance_loss"] = instance = self.instance_loss(outputs)
            loss = pixel + config.instance_weight * instance
        return loss, parts
