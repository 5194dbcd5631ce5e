"""Federated MoE-Adapter (after Yu et al., CVPR 2024, "Boosting Continual Learning of
Vision-Language Models via Mixture-of-Experts Adapters").

A CLIP model from transformers gets a mixture-of-experts adapter beside the MLP of every
transformer block of the image encoder (and, switchable, of the text encoder):
down-projection to a bottleneck, ReLU, dropout, up-projection initialised to zero, output
scale 0.1, and a noisy top-k router per block over the experts (the authors' class-
incremental setting: 2 experts, top-2). Only adapters and routers train; classes are scored
by cosine similarity to CLIP's text embeddings of the seen classes' prompts. Federated:
clients train adapters and routers on their images; the server averages them by samples.

The authors' optional DDAS (per-task autoencoders routing out-of-distribution inputs to
the frozen CLIP) is not implemented here.

Real CLIP weights are used where the Hugging Face cache has them; otherwise the method
fails before any run with a message; `model: tiny-random` builds a tiny randomly
initialised CLIP for tests and smoke runs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bench.api import Client, ClientData, ClientUpdate, Message, MethodConfig, Server, TaskInfo, TrainContext, derive_seed, register
from bench.training import as_tensor, load_module_arrays, module_arrays, torch_generator

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY = "tiny-random"


class MoEAdapterConfig(MethodConfig):
    model: str = "openai/clip-vit-base-patch32"  # or "tiny-random"
    num_experts: int = Field(2, ge=1)
    top_k: int = Field(2, ge=1)
    bottleneck: int = Field(64, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    scale: float = 0.1
    noise: bool = True  # noisy top-k gating while training
    text_adapters: bool = False
    prompt: str = "a photo of a {}."
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)


class Adapter(nn.Module):
    """down (d -> r), ReLU, dropout, up (r -> d) initialised to zero."""

    def __init__(self, dim: int, bottleneck: int, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(F.relu(self.down(x))))


class MoEAdapter(nn.Module):
    """Token-level noisy top-k mixture of adapters (Shazeer et al.'s gating)."""

    def __init__(self, dim: int, cfg: MoEAdapterConfig) -> None:
        super().__init__()
        self.experts = nn.ModuleList(Adapter(dim, cfg.bottleneck, cfg.dropout) for _ in range(cfg.num_experts))
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.noise = nn.Linear(dim, cfg.num_experts, bias=False)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.noise.weight)
        self.k, self.scale, self.use_noise = min(cfg.top_k, cfg.num_experts), cfg.scale, cfg.noise
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        if self.training and self.use_noise:
            eps = torch.randn(logits.shape, generator=self.generator).to(x.device) if self.generator else torch.randn_like(logits)
            logits = logits + eps * F.softplus(self.noise(x))
        top = logits.topk(self.k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))
        out = sum(gates[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))
        return self.scale * out


class ParallelMLP(nn.Module):
    """A transformer block's MLP with the MoE adapter beside it."""

    def __init__(self, mlp: nn.Module, adapter: MoEAdapter) -> None:
        super().__init__()
        self.mlp, self.adapter = mlp, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.adapter(x)


def tiny_clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )


def load_clip(cfg: MoEAdapterConfig, seed: int):
    """(model, tokenizer): real weights from the HF cache, or a tiny random CLIP."""
    from transformers import CLIPModel, CLIPTokenizer

    from bench.hf import load_hf

    if cfg.model == TINY:
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(seed, "tiny-clip"))
            model = CLIPModel(tiny_clip_config())
        return model, SimpleTokenizer()
    return load_hf(CLIPModel.from_pretrained, cfg.model), load_hf(CLIPTokenizer.from_pretrained, cfg.model)


class SimpleTokenizer:
    """Byte-level ids for the tiny random CLIP (no vocabulary files needed offline)."""

    def __call__(self, texts: list[str], padding: bool = True, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        ids = [[49406, *(min(b, 49000) for b in t.encode()[:30]), 49407] for t in texts]
        n = max(len(i) for i in ids)
        input_ids = torch.tensor([i + [49407] * (n - len(i)) for i in ids])
        mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])
        return {"input_ids": input_ids, "attention_mask": mask}


def add_adapters(model: nn.Module, cfg: MoEAdapterConfig, seed: int) -> nn.ModuleDict:
    """Insert MoE adapters beside every block's MLP; freeze everything else; return the adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = nn.ModuleDict()
    towers = [("vision", model.vision_model)] + ([("text", model.text_model)] if cfg.text_adapters else [])
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(seed, "moe-adapters"))
        for tower_name, tower in towers:
            for i, layer in enumerate(tower.encoder.layers):
                dim = layer.mlp.fc1.in_features
                ad = MoEAdapter(dim, cfg)
                layer.mlp = ParallelMLP(layer.mlp, ad)
                adapters[f"{tower_name}{i}"] = ad
    return adapters


class CLIPClassifier:
    """CLIP + adapters; scores images against the seen classes' text embeddings."""

    def __init__(self, cfg: MoEAdapterConfig, env, class_names: tuple[str, ...]) -> None:
        self.cfg = cfg
        self.model, self.tok = load_clip(cfg, env.run_seed)
        self.adapters = add_adapters(self.model, cfg, env.run_seed)
        self.size = self.model.config.vision_config.image_size
        self.names = class_names
        self._text: dict[tuple[int, ...], torch.Tensor] = {}
        self.device = "cpu"

    def to(self, device: str) -> CLIPClassifier:
        """Move CLIP and its adapters (once; an actor keeps them on its GPU between rounds)."""
        if device != self.device:
            self.model.to(device)
            self._text.clear()
            self.device = device
        return self

    def pixels(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = as_tensor(images, self.device).permute(0, 3, 1, 2).float().div(255)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def text_embeddings(self, classes: tuple[int, ...]) -> torch.Tensor:
        def encode() -> torch.Tensor:
            prompts = [self.cfg.prompt.format(self.names[c].replace("_", " ")) for c in classes]
            tokens = self.tok(prompts, padding=True, return_tensors="pt")
            out = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
            out = out if isinstance(out, torch.Tensor) else out.pooler_output
            return F.normalize(out, dim=-1)

        if self.cfg.text_adapters:  # the text tower trains: no cache
            return encode()
        if classes not in self._text:
            with torch.no_grad():
                self._text[classes] = encode()
        return self._text[classes]

    def logits(self, images: np.ndarray | torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=self.pixels(images))
        img = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
        return self.model.logit_scale.exp() * img @ self.text_embeddings(classes).T

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.adapters.parameters()]


class MoEAdapterClient(Client):
    config: MoEAdapterConfig

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        if not hasattr(self, "clf"):  # built once per worker, then reused
            self.clf = CLIPClassifier(self.config, self.env, self.env.class_names)
        clf = self.clf.to(ctx.device)
        load_module_arrays(clf.adapters, payload.arrays, "adapter.")
        seen = tuple(int(c) for c in payload.arrays["seen"])
        pos = {c: i for i, c in enumerate(seen)}
        y = torch.tensor([pos[int(c)] for c in np.asarray(data.y)], device=ctx.device)
        images = as_tensor(data.x, ctx.device)
        gen = torch_generator(ctx.seed)
        for ad in clf.adapters.values():
            ad.generator = gen
        clf.adapters.train()
        opt = torch.optim.AdamW(clf.trainable(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        steps = ctx.train.local_epochs * math.ceil(len(y) / ctx.train.batch_size)
        warm = max(1, int(self.config.warmup_fraction * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
        )
        total, count = 0.0, 0
        with torch.random.fork_rng():
            torch.manual_seed(ctx.seed)  # dropout draws
            for _ in range(ctx.train.local_epochs):
                for idx in torch.randperm(len(y), generator=gen).split(ctx.train.batch_size):
                    idx = idx.to(ctx.device)
                    loss = F.cross_entropy(clf.logits(images[idx], seen), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += float(loss.detach()) * len(idx)
                    count += len(idx)
        return ClientUpdate(arrays=module_arrays(clf.adapters, "adapter."), num_samples=len(y), loss=total / max(count, 1))


@register
class MoEAdapterFL(Server):
    name = "moe_adapter"
    summary = "MoE-Adapter (Yu et al. 2024): CLIP with noisy top-k adapter experts per block, federated by FedAvg"
    Config = MoEAdapterConfig
    ClientClass = MoEAdapterClient
    input = "images"
    config: MoEAdapterConfig

    @classmethod
    def preflight(cls, config: MoEAdapterConfig, dataset: Any, cache_dir: Any) -> None:
        if config.model != TINY:
            from transformers import CLIPModel

            from bench.hf import load_hf

            load_hf(CLIPModel.from_pretrained, config.model)  # fails fast, with the alternatives, when absent

    def setup(self) -> None:
        self.clf = CLIPClassifier(self.config, self.env, self.env.class_names)
        self.seen: tuple[int, ...] = ()
        self.trainable_params = sum(p.numel() for p in self.clf.trainable())
        self._payload: Message | None = None

    def begin_task(self, task: TaskInfo) -> None:
        self.seen = task.seen_classes
        self._payload = None

    def payload_for(self, client_id: int) -> Message:
        if self._payload is None:
            self._payload = Message({**module_arrays(self.clf.adapters, "adapter."), "seen": np.asarray(self.seen, dtype=np.int64)})
        return self._payload

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        keys = [k for k in updates[0].arrays if k.startswith("adapter.")]
        load_module_arrays(self.clf.adapters, self.combine(updates, keys, reference=self.payload_for(0).arrays), "adapter.")
        self._payload = None

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        self.clf.adapters.eval()
        idx = torch.cat([self.clf.logits(x[a : a + 256], self.seen).argmax(1) for a in range(0, len(x), 256)])
        return np.asarray(self.seen)[idx.numpy()]

    def stats(self) -> dict[str, float]:
        return {"trainable_params": self.trainable_params}
