"""Frozen backbones: what turns images into the features every feature method trains on.

`backbone.arch` picks the family:

* `resnet18` (default): torchvision's ResNet-18 or its CIFAR variant (`backbone.variant`),
  weights `none` (seeded random init), `imagenet`, or a state-dict path;
* any other torchvision classification model by name (`resnet50`, `vit_b_16`,
  `convnext_tiny`, ...): weights `none`, `imagenet` (the model's DEFAULT weights enum) or a
  state-dict path; features are the input of its last linear layer (the classifier removed);
* `hf:<model id or folder>`: a Hugging Face vision model through transformers (CLIP vision
  tower, ViT, DINOv2, ...), weights from the id or folder; features are the pooled output
  for CLIP and DINOv2 (their post-layernorm class token) and the class token of the last
  hidden state for ViT and other families.

Input size and normalisation come from the model's own preprocessing (the weights enum's
transforms, the Hugging Face image processor) unless `backbone.input_size/mean/std` are set
in the config; images are resized to that square (no centre crop). Offline, weights that are
not cached are one clear error.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.config import BackboneConfig, where
from bench.errors import UserError
from bench.progress import progress_bar

HF_PREFIX = "hf:"


class BackboneError(UserError, RuntimeError):
    """The backbone weights asked for cannot be had; the message lists the alternatives."""


def best_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def resnet18(variant: str, num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18, or its CIFAR variant (3x3 stride-1 stem, no max-pool)."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    if variant == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _require_cached_or_network(weights, advice: str) -> None:
    """A torchvision weights enum's file must be in the torch hub cache, or the download host
    reachable; otherwise one error in seconds (torchvision would retry, then fail deep inside)."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if cached.exists():
        return
    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=3).close()
    except OSError:
        raise BackboneError(f"the weights {weights} are not cached ({cached}) and there is no network to download them; {advice}") from None


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    _require_cached_or_network(
        weights,
        "use backbone.weights=none, a path to a state dict (e.g. one from `fedame-bench "
        "pretrain-backbone`), or set TORCH_HOME to a directory whose hub/checkpoints holds resnet18-f37072fd.pth",
    )
    return weights.get_state_dict(progress=True)


def family(cfg: BackboneConfig) -> str:
    """`resnet18`, `torchvision` (another torchvision model by name) or `hf`."""
    if cfg.arch.startswith(HF_PREFIX):
        return "hf"
    return "resnet18" if cfg.arch == "resnet18" else "torchvision"


def _torchvision_weights(arch: str):
    from torchvision.models import get_model_weights, list_models

    if arch not in list_models():
        raise BackboneError(
            f"backbone.arch {arch!r} is not a torchvision model; use resnet18, a name from "
            "torchvision.models.list_models() (e.g. resnet50, vit_b_16) or hf:<model id>"
        )
    return get_model_weights(arch).DEFAULT


def _hf_source(cfg: BackboneConfig) -> str:
    return cfg.arch[len(HF_PREFIX) :]


def _file_digest(path: Path) -> str:
    if path.is_dir():  # a Hugging Face folder: its weight files
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()[:16]
    return file_sha256(path)[:16]


def weights_digest(cfg: BackboneConfig) -> str:
    """What identifies the backbone's weights in the cache key (a file's content for a path)."""
    kind = family(cfg)
    if kind == "hf":
        src = _hf_source(cfg)
        if Path(src).expanduser().is_dir():
            return _file_digest(Path(src).expanduser())
        from transformers import AutoConfig

        from bench.hf import load_hf

        return f"{src}@{getattr(load_hf(AutoConfig.from_pretrained, src), '_commit_hash', None) or 'cached'}"
    if cfg.weights == "none":
        return "random-init-seed0"
    if cfg.weights == "imagenet":
        return "imagenet1k-v1" if kind == "resnet18" else f"{cfg.arch}-{_torchvision_weights(cfg.arch).name}"
    path = Path(cfg.weights).expanduser()
    if not path.exists():
        raise BackboneError(f"backbone.weights: no file {where(path)}; give imagenet, none, or an existing state dict path")
    return _file_digest(path)


def preprocessing(cfg: BackboneConfig) -> BackboneConfig:
    """`cfg` with input size, mean and std from the model's own preprocessing where the config
    does not set them (torchvision weights' transforms, a Hugging Face image processor)."""
    kind = family(cfg)
    if kind == "resnet18" or (kind == "torchvision" and cfg.weights != "imagenet"):
        return cfg
    if kind == "torchvision":
        t = _torchvision_weights(cfg.arch).transforms()
        size, mean, std = int(t.crop_size[0]), tuple(t.mean), tuple(t.std)
    else:
        from transformers import AutoImageProcessor

        from bench.hf import load_hf

        proc = load_hf(AutoImageProcessor.from_pretrained, _hf_source(cfg))
        dims = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
        dims = dims or proc.size
        size = int(dims.get("height") or dims.get("shortest_edge"))
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    own = {"input_size": size, "mean": mean, "std": std}
    return cfg.model_copy(update={k: v for k, v in own.items() if k not in cfg.model_fields_set})


class HFFeatures(nn.Module):
    """A Hugging Face vision model returning one feature vector per image."""

    POOLED = ("clip_vision_model", "dinov2", "siglip_vision_model")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.kind = model, model.config.model_type

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        if self.kind in self.POOLED and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return out.last_hidden_state[:, 0]  # the class token


def _load_hf(cfg: BackboneConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    from bench.hf import load_hf

    src = _hf_source(cfg)
    conf = load_hf(AutoConfig.from_pretrained, src)
    loader = CLIPVisionModel.from_pretrained if conf.model_type in ("clip", "clip_vision_model") else AutoModel.from_pretrained
    return HFFeatures(load_hf(loader, src))


def _load_torchvision(cfg: BackboneConfig) -> nn.Module:
    from torchvision.models import get_model

    weights = _torchvision_weights(cfg.arch)  # validates the name
    if cfg.weights == "imagenet":
        _require_cached_or_network(weights, "use backbone.weights=none or a state dict path, or set TORCH_HOME")
        model = get_model(cfg.arch, weights=weights)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = get_model(cfg.arch, weights=None)
        if cfg.weights != "none":
            state = torch.load(Path(cfg.weights).expanduser(), map_location="cpu", weights_only=True)
            try:
                model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
            except RuntimeError as e:
                raise BackboneError(f"backbone.weights {cfg.weights} does not fit {cfg.arch} ({str(e).splitlines()[0]})") from None
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]  # the classifier
    parent = model.get_submodule(last.rpartition(".")[0]) if "." in last else model
    setattr(parent, last.rpartition(".")[2], nn.Identity())
    return model


def _load_resnet18(cfg: BackboneConfig) -> nn.Module:
    with torch.random.fork_rng():  # a seeded init, so weights=none is the same network everywhere
        torch.manual_seed(0)
        model = resnet18(cfg.variant)
    if cfg.weights == "imagenet":
        if cfg.variant != "torchvision":
            raise BackboneError("ImageNet weights exist only for backbone.variant=torchvision")
        model.load_state_dict(_imagenet_state_dict())
    elif cfg.weights != "none":
        path = Path(cfg.weights).expanduser()
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatch: usually the stem of the other variant
            raise BackboneError(
                f"backbone.weights {path} does not fit resnet18 variant={cfg.variant!r} "
                f"({str(e).splitlines()[1].strip()}); check backbone.variant (torchvision | cifar)"
            ) from None
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise BackboneError(
                f"backbone.weights {path} does not fit resnet18 variant={cfg.variant!r} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); check backbone.variant"
            )
    model.fc = nn.Identity()
    return model


def load_backbone(cfg: BackboneConfig) -> tuple[nn.Module, str]:
    """The frozen feature extractor (classifier removed) and a digest of its weights."""
    digest = weights_digest(cfg)
    model = {"resnet18": _load_resnet18, "torchvision": _load_torchvision, "hf": _load_hf}[family(cfg)](cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, digest


def preprocess(images: np.ndarray, cfg: BackboneConfig, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW at the configured input size."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != cfg.input_size:
        x = nn.functional.interpolate(x, size=cfg.input_size, mode="bilinear", align_corners=False)
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def extract(model: nn.Module, images: np.ndarray, cfg: BackboneConfig, out: np.ndarray, label: str) -> None:
    device = best_device(cfg.device)
    model = model.to(device)
    with progress_bar() as bar:
        job = bar.add_task(f"features {label} ({device.type})", total=len(images))
        for a in range(0, len(images), cfg.batch_size):
            b = min(a + cfg.batch_size, len(images))
            out[a:b] = model(preprocess(images[a:b], cfg, device)).float().cpu().numpy()
            bar.advance(job, b - a)
