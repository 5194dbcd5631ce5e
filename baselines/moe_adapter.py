"""Federated MoE-Adapter (after Yu et al., CVPR 2024, "Boosting Continual Learning of
Vision-Language Models via Mixture-of-Experts Adapters"), following the authors' code
(MoE-Adapters4CL, cil/clip/model.py) where the paper leaves choices open.

A CLIP model from transformers (ViT-B/16 by default, `openai/clip-vit-base-patch32` as an
option) gets a mixture-of-experts adapter in every transformer block of both the image and
the text encoder (`text_adapters`, on by default as upstream): each expert is down-projection
to a bottleneck of 64, ReLU, dropout 0.1, up-projection initialised to zero (biases zero),
output scale 0.1; it reads the block's residual stream after attention (before the MLP's
layer norm) and its output is added beside the MLP's. A noisy top-k router per block
(2 experts, top-2) routes each image (or text) as a whole from its first token (the class
token): clean logits x W_g, noise std softplus(x W_n) + 1e-2, training only. Only adapters
and routers train; classes are scored by cosine similarity to CLIP's text embeddings of the
seen classes' prompts. Federated: clients train adapters and routers on their images; the
server combines them by samples (or the run's aggregation rule).

DDAS (`ddas: true`), the distribution-discriminative auto-selector: one small autoencoder
per task on frozen CLIP image features, trained by the clients with the adapters and
averaged by the server; at test time an image whose reconstruction error exceeds
`ddas_threshold` under every task's autoencoder is treated as out of distribution and
classified by the frozen CLIP (adapters off), as upstream.

Differences from upstream that remain: upstream keeps one router per task id selected at
test time by DDAS (`step` routers), here one router per block (upstream's class-incremental
default, step 1); upstream's load-balancing loss is computed but unused in its CIL code, and
is not computed here; images are resized to the model's input size without a centre crop;
upstream trains with its own CLIP implementation and fp16 weights, here transformers' CLIP
in float32.

Real CLIP weights are used where the Hugging Face cache has them; otherwise the method
fails before any run with a message; `model: tiny-random` builds a tiny randomly
initialised CLIP for tests and smoke runs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bench.api import Client, ClientData, ClientUpdate, Message, MethodConfig, Server, TaskInfo, TrainContext, derive_seed, register
from bench.training import as_tensor, load_module_arrays, module_arrays, torch_generator, train_epochs

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY = "tiny-random"
NOISE_EPSILON = 1e-2  # upstream's floor on the router's noise std


class MoEAdapterConfig(MethodConfig):
    model: str = "openai/clip-vit-base-patch16"  # or openai/clip-vit-base-patch32, or "tiny-random"
    num_experts: int = Field(2, ge=1)
    top_k: int = Field(2, ge=1)
    bottleneck: int = Field(64, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    scale: float = 0.1
    noise: bool = True  # noisy top-k gating while training
    routing: Literal["image", "token"] = "image"  # upstream: one routing decision per image, from its class token
    adapter_input: Literal["residual", "normed"] = "residual"  # upstream: the residual stream before the MLP's norm
    text_adapters: bool = True  # adapters in the text encoder too (upstream)
    ddas: bool = False  # distribution-discriminative auto-selector (per-task autoencoders)
    ddas_hidden: int = Field(128, ge=1)
    ddas_threshold: float = Field(2.0, gt=0)  # out of distribution: reconstruction error above this many times the training error
    prompt: str = "a photo of a {}."
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)


class Adapter(nn.Module):
    """down (d -> r), ReLU, dropout, up (r -> d); up and both biases start at zero (upstream's "lora" init)."""

    def __init__(self, dim: int, bottleneck: int, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(F.relu(self.down(x))))


class MoEAdapter(nn.Module):
    """Noisy top-k mixture of adapters (Shazeer et al.'s gating, upstream's noise floor),
    routed per image from its first token or per token."""

    def __init__(self, dim: int, cfg: MoEAdapterConfig) -> None:
        super().__init__()
        self.experts = nn.ModuleList(Adapter(dim, cfg.bottleneck, cfg.dropout) for _ in range(cfg.num_experts))
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.noise = nn.Linear(dim, cfg.num_experts, bias=False)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.noise.weight)
        self.k, self.scale, self.use_noise = min(cfg.top_k, cfg.num_experts), cfg.scale, cfg.noise
        self.per_image = cfg.routing == "image"
        self.generator: torch.Generator | None = None
        self.enabled = True  # off: the frozen CLIP (DDAS's out-of-distribution path)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E) per image, from the first token; (B, L, E) per token."""
        r = x[:, 0] if self.per_image else x
        logits = self.gate(r)
        if self.training and self.use_noise:
            eps = torch.randn(logits.shape, generator=self.generator).to(x.device) if self.generator else torch.randn_like(logits)
            logits = logits + eps * (F.softplus(self.noise(r)) + NOISE_EPSILON)
        top = logits.topk(self.k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return torch.zeros_like(x)
        g = self.gates(x)
        g = g[:, None, :] if self.per_image else g  # one decision for all of an image's tokens
        out = sum(g[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))
        return self.scale * out


class Tap(nn.Module):
    """A block's MLP layer norm that keeps its input (the residual stream) for the adapter."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm, self.seen = norm, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.norm(x)


class ParallelMLP(nn.Module):
    """A transformer block's MLP with the MoE adapter beside it; the adapter reads the block's
    residual stream (kept by the tap on the MLP's layer norm) or, switched, the normed input."""

    def __init__(self, mlp: nn.Module, adapter: MoEAdapter, tap: Tap | None) -> None:
        super().__init__()
        self.mlp, self.adapter, self.tap = mlp, adapter, tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = x
        if self.tap is not None:
            source, self.tap.seen = self.tap.seen, None  # released: no graph kept beyond the block
        return self.mlp(x) + self.adapter(source)


def tiny_clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
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
    instead = "or set methods.moe_adapter.model=tiny-random"
    return load_hf(CLIPModel.from_pretrained, cfg.model, instead), load_hf(CLIPTokenizer.from_pretrained, cfg.model, instead)


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
                tap = None
                if cfg.adapter_input == "residual":
                    tap = layer.layer_norm2 = Tap(layer.layer_norm2)
                layer.mlp = ParallelMLP(layer.mlp, ad, tap)
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
        self.seed = env.run_seed
        self.autoencoders = nn.ModuleDict()  # DDAS: one per task, on frozen CLIP image features

    def ensure_autoencoders(self, tasks: int) -> None:
        """DDAS autoencoders for tasks 0..tasks-1 (each seeded, so server and clients agree)."""
        dim = self.model.config.projection_dim
        for t in range(len(self.autoencoders), tasks):
            with torch.random.fork_rng():
                torch.manual_seed(derive_seed(self.seed, "ddas", t))
                ae = nn.Sequential(nn.Linear(dim, self.cfg.ddas_hidden), nn.ReLU(), nn.Linear(self.cfg.ddas_hidden, dim))
            ae.register_buffer("train_error", torch.ones(1))  # mean reconstruction error on its task's data
            self.autoencoders[f"task{t}"] = ae.to(self.device)

    @contextlib.contextmanager
    def frozen(self):
        """The plain CLIP: every adapter (image and text towers) off inside the block."""
        for ad in self.adapters.values():
            ad.enabled = False
        try:
            yield
        finally:
            for ad in self.adapters.values():
                ad.enabled = True

    @torch.no_grad()
    def frozen_features(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised image features of the frozen CLIP."""
        with self.frozen():
            out = self.model.get_image_features(pixel_values=self.pixels(images))
        return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)

    @torch.no_grad()
    def zero_shot(self, feats: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
        """The frozen CLIP's class scores for frozen image features (text adapters off too)."""
        with self.frozen():
            return feats @ self.encode_text(classes).T

    def out_of_distribution(self, feats: torch.Tensor) -> torch.Tensor:
        """DDAS: True where every task's autoencoder reconstructs the features worse than
        `ddas_threshold` times its own error on its task's training data."""
        ratios = [((ae(feats) - feats) ** 2).mean(1) / ae.train_error for ae in self.autoencoders.values()]
        return torch.stack(ratios, 1).min(1).values > self.cfg.ddas_threshold

    def to(self, device: str) -> CLIPClassifier:
        """Move CLIP and its adapters (once; an actor keeps them on its GPU between rounds)."""
        if device != self.device:
            self.model.to(device)
            self.autoencoders.to(device)
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

    def encode_text(self, classes: tuple[int, ...]) -> torch.Tensor:
        """Normalised text embeddings of the classes' prompts (through whatever adapters are on)."""
        prompts = [self.cfg.prompt.format(self.names[c].replace("_", " ")) for c in classes]
        tokens = self.tok(prompts, padding=True, return_tensors="pt")
        out = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
        return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)

    def text_embeddings(self, classes: tuple[int, ...]) -> torch.Tensor:
        if self.cfg.text_adapters:  # the text tower trains: no cache
            return self.encode_text(classes)
        if classes not in self._text:
            with torch.no_grad():
                self._text[classes] = self.encode_text(classes)
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
        if self.config.ddas:
            clf.ensure_autoencoders(int(payload.meta["task"]) + 1)
            load_module_arrays(clf.autoencoders, payload.arrays, "ddas.")
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
        with torch.random.fork_rng():
            torch.manual_seed(ctx.seed)  # dropout draws
            loss = train_epochs(
                clf.trainable(), images, y, ctx, lambda xb, yb: F.cross_entropy(clf.logits(xb, seen), yb), gen,
                optimizer=opt, after_step=sched.step,
            )  # fmt: skip
        arrays = module_arrays(clf.adapters, "adapter.")
        if self.config.ddas:
            arrays.update(train_autoencoder(clf, images, payload.meta["task"], ctx, gen))
        return ClientUpdate(arrays=arrays, num_samples=len(y), loss=loss)


def train_autoencoder(
    clf: CLIPClassifier, images: torch.Tensor, task: int, ctx: TrainContext, gen: torch.Generator
) -> dict[str, np.ndarray]:
    """DDAS: this task's autoencoder on the client's frozen CLIP features (MSE, Adam, the run's
    epochs and batch size); returns its arrays, its training error included."""
    feats = torch.cat([clf.frozen_features(images[a : a + 256]) for a in range(0, len(images), 256)])
    ae = clf.autoencoders[f"task{task}"]
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3)
    for _ in range(ctx.train.local_epochs):
        for idx in torch.randperm(len(feats), generator=gen).split(ctx.train.batch_size):
            loss = F.mse_loss(ae(feats[idx.to(feats.device)]), feats[idx.to(feats.device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        ae.train_error.fill_(float(((ae(feats) - feats) ** 2).mean()))
    return module_arrays(ae, f"ddas.task{task}.")


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

            load_hf(
                CLIPModel.from_pretrained, config.model, "or set methods.moe_adapter.model=tiny-random"
            )  # fails fast, with the alternatives, when absent

    def setup(self) -> None:
        self.clf = CLIPClassifier(self.config, self.env, self.env.class_names)
        self.seen: tuple[int, ...] = ()
        self.trainable_params = sum(p.numel() for p in self.clf.trainable())
        self._payload: Message | None = None
        self.task = 0
        self.ood_share: list[float] = []

    def begin_task(self, task: TaskInfo) -> None:
        self.seen = task.seen_classes
        self.task = task.index
        if self.config.ddas:
            self.clf.ensure_autoencoders(task.index + 1)
        self._payload = None

    def payload_for(self, client_id: int) -> Message:
        if self._payload is None:
            arrays = {**module_arrays(self.clf.adapters, "adapter."), "seen": np.asarray(self.seen, dtype=np.int64)}
            if self.config.ddas:
                arrays.update(module_arrays(self.clf.autoencoders, "ddas."))
            self._payload = Message(arrays, {"task": self.task})
        return self._payload

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        reference = self.payload_for(0).arrays
        keys = [k for k in updates[0].arrays if k.startswith("adapter.")]
        load_module_arrays(self.clf.adapters, self.combine(updates, keys, reference=reference), "adapter.")
        if self.config.ddas:  # this task's autoencoder (its training error too), by the run's rule like the adapters
            ae = self.clf.autoencoders[f"task{self.task}"]
            prefix = f"ddas.task{self.task}."
            load_module_arrays(
                ae, self.combine(updates, [k for k in updates[0].arrays if k.startswith(prefix)], reference=reference), prefix
            )
        self._payload = None

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        self.clf.adapters.eval()
        out = []
        for a in range(0, len(x), 256):
            pred = self.clf.logits(x[a : a + 256], self.seen).argmax(1)
            if self.config.ddas:  # out-of-distribution images: the frozen CLIP's zero-shot answer
                feats = self.clf.frozen_features(x[a : a + 256])
                ood = self.clf.out_of_distribution(feats)
                self.ood_share.append(float(ood.float().mean()))
                if ood.any():
                    pred = torch.where(ood, self.clf.zero_shot(feats, self.seen).argmax(1), pred)
            out.append(pred)
        return np.asarray(self.seen)[torch.cat(out).numpy()]

    def stats(self) -> dict[str, float]:
        stats = {"trainable_params": self.trainable_params}
        if self.ood_share:  # DDAS: share of test images sent to the frozen CLIP at the last evaluation
            stats["ddas_ood_share"] = float(np.mean(self.ood_share))
            self.ood_share = []
        return stats
