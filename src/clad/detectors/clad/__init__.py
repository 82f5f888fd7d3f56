"""CLAD: contrastive cross-modal anomaly detection (the paper's method), and CLAD+ (beyond the paper).

In parts, each read top to bottom: ``config`` (the settings), ``model`` (encoders, heads, descriptions),
``training`` (views, patch labels, the loop), ``calibration`` (sigma, memory, scales, threshold) and ``detector``
(the registered ``clad`` and ``clad_plus``).

Reading of the paper used here (it leaves the details unsaid; docs/method.md says why each choice was made):
- f_v: a backbone of the feature contract. Dense patch features = stage ``layers[0]`` (frozen) and stage
  ``layers[1]`` (its weights fine-tuned when ``finetune_stages`` = 1), 3x3-aggregated and concatenated on the
  ``layers[0]`` grid; a projection head g_v maps each patch into the shared space (L2-normalised).
  The image embedding is the normalised mean of the patch embeddings.
- f_t: a sentence encoder (all-MiniLM-L6-v2 by default, the CLIP text tower with a CLIP backbone), its last
  ``finetune_text_layers`` layers fine-tuned; a head g_t maps each description into the shared space. A class's
  embedding is the normalised mean over its description ensemble.
- Training pairs (Eq. 3): normal patches/images with the normal descriptions, synthetic-anomaly patches/images
  (``clad.synthesis``, made on the k references only) with the description of their kind; optionally (``aux``)
  real labelled defects of other categories, each with the description its defect type maps to (``aux_kind``).
- Eq. 6-7: L = L_contrastive + lambda * (||dec_v(z_v) - f_v||^2 + ||dec_t(z_t) - f_t||^2), the decoders mapping the
  shared space back to the frozen encoders' features (normal patches only on the visual side).
- Eq. 4: S = exp(-||z_v - z_t||^2 / sigma), sigma = mean squared distance of the references' patches to the normal
  class embedding; anomaly score 1 - the normal class's share of S over all class embeddings (``language_score``
  "contrast"; "normal": 1 - S against the normal class alone, Eq. 4 literally), per patch for the map and for the
  image embedding.
- The self-check at fit: held-out views of the references against synthetic anomalies made on them; each half's
  AUROC is kept (``self_check_``), a language map under 0.6 is warned about.
- CLAD+ (``memory=True``): the language map is fused with a few-shot patch memory of the references' frozen
  features (nearest-neighbour distance, as PatchCore / WinCLIP+ do): each map is divided by its 99th percentile on
  held-out augmented normal views of the references, then averaged; the language weight is chosen from the
  self-check (``memory_weight`` None) or given. Teaching (``add_references``) grows the memory as PatchCore's and
  sets its scale again; the language half and its weight stay.
"""
from clad.detectors.clad.calibration import memory_size
from clad.detectors.clad.config import CLADConfig, CLADPlusConfig
from clad.detectors.clad.detector import CLAD, CLADPlus
from clad.detectors.clad.model import CLADModel

__all__ = ["CLAD", "CLADConfig", "CLADModel", "CLADPlus", "CLADPlusConfig", "memory_size"]
