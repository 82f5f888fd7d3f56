"""The settings of CLAD and CLAD+ (docs/method.md says why each default was chosen)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CLADConfig:
    backbone: str = "efficientnet_lite0"
    text_encoder: str = "auto"  # "minilm", "clip:PATH"; auto = the backbone's CLIP text tower, else MiniLM
    category: str | None = None
    object_name: str | None = None
    descriptions: dict | None = None  # {"normal": [...], kind: [...]} with "{}" for the object name
    image_size: int = 256
    layers: tuple[str, ...] = ("stage2", "stage3")
    embed_dim: int = 128
    hidden: int = 256
    finetune_stages: int = 1  # 0 = frozen visual encoder (the paper's "without fine-tuning" ablation)
    finetune_text_layers: int = 1
    loss: str = "contrastive"  # "supervised": the "without contrastive loss" ablation
    alpha: float = 0.1
    beta: float = 1.0
    lam: float = 0.1  # weight of the reconstruction loss (Eq. 6)
    epochs: int = 20
    n_train_images: int = 64
    anomaly_ratio: float = 0.5
    batch_size: int = 16
    lr: float = 1e-3
    backbone_lr: float = 1e-4
    # Labelled defects of other categories to train on too ("mvtec:ROOT", "visa:ROOT", ...), and at most how many.
    # Without aux, neither changes anything, so they stay out of the bench's cache keys (runs made before they
    # existed stay valid).
    aux: str | None = field(default=None, metadata={"omit_from_key_when": {"aux": None}})
    aux_images: int = field(default=32, metadata={"omit_from_key_when": {"aux": None}})
    memory: bool = False  # CLAD+: fuse with a few-shot patch memory
    # The memory map's weight in CLAD+'s fusion (the language map has 1 - memory_weight). None: chosen at fit by
    # the self-check on held-out views of the references (``calibration.choose_language_weight``); a number fixes it.
    memory_weight: float | None = None
    # The language map: "contrast" = 1 - softmax over the class descriptions at the normal one (Eq. 4's kernel,
    # normalised over the descriptions); "normal" = Eq. 4 literally, 1 - S against the normal description alone.
    language_score: str = "contrast"
    # The patch memory keeps ceil(memory_ratio * N) of the references' N patches, at least memory_min (all of
    # them when fewer) and at most memory_max, by PatchCore's greedy k-center coreset. Neither changes anything
    # without the memory (``clad``), so there they stay out of the bench's cache keys.
    memory_ratio: float = field(default=0.25, metadata={"omit_from_key_when": {"memory": False}})
    memory_min: int = field(default=1024, metadata={"omit_from_key_when": {"memory": False}})
    memory_max: int = 16384
    image_score: str = "pooled"  # "pooled": Eq. 4 on the image embedding; "max": largest value of the map
    localization: str = "dense"  # or "gradcam" (Eq. 5)
    map_sigma: float = 4.0
    seed: int = 0

    def __post_init__(self):
        self.layers = tuple(self.layers)
        for key, allowed in (("loss", ("contrastive", "supervised")), ("image_score", ("pooled", "max")),
                             ("localization", ("dense", "gradcam")),
                             ("language_score", ("contrast", "normal"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if len(self.layers) != 2:
            raise ValueError(f"layers must name two stages (frozen, fine-tuned), got {self.layers}")
        if self.memory_weight is not None and not 0.0 <= self.memory_weight <= 1.0:
            raise ValueError(f"memory_weight must be None (chosen at fit) or in [0, 1], got {self.memory_weight}")
        if not 0.0 < self.memory_ratio <= 1.0:
            raise ValueError(f"memory_ratio must be in (0, 1], got {self.memory_ratio}")
        if not 1 <= self.memory_min <= self.memory_max:
            raise ValueError(f"need 1 <= memory_min <= memory_max, got {self.memory_min} and {self.memory_max}")


@dataclass
class CLADPlusConfig(CLADConfig):
    memory: bool = True
    image_score: str = "max"
    # CLAD+ keeps the visual and text encoders frozen and trains the heads only: in the 1-shot ablation that was
    # as accurate as fine-tuning, fits in half the time and predicts without a second pass of the last stage
    # (benchmarks/README.md, ``results/ablations``: clad_plus-no-finetune). ``clad``, the paper's method, fine-tunes.
    finetune_stages: int = 0
    finetune_text_layers: int = 0
