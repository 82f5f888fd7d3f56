"""The built-in detectors, backbones, text encoders and dataset schemes: the one list of them.

Each is a lazy ``"module:attr"`` reference, loaded by ``clad.registry`` on first use, so listing the names
imports no model code. Other packages add theirs through entry points of the same groups (see ``clad.registry``).
This module imports nothing.
"""

DETECTORS = {
    "patch_knn": "clad.detectors.patch_knn:PatchKNN",
    "patchcore": "clad.detectors.patchcore:PatchCore",
    "padim": "clad.detectors.padim:PaDiM",
    "spade": "clad.detectors.spade:SPADE",
    "winclip": "clad.detectors.winclip:WinCLIP",
    "clad": "clad.detectors.clad:CLAD",
    "clad_plus": "clad.detectors.clad:CLADPlus",
}

# name -> fn(argument?, **params) -> Backbone; the argument is what follows "name:" in a spec ("clip:PATH")
BACKBONES = {
    "efficientnet_lite0": "clad.backbones.efficientnet:efficientnet_lite0",
    "efficientnet_lite1": "clad.backbones.efficientnet:efficientnet_lite1",
    "efficientnet_lite2": "clad.backbones.efficientnet:efficientnet_lite2",
    "tiny_cnn": "clad.backbones.tiny:tiny_cnn",
    "clip": "clad.backbones.clip:clip",
}

# name -> fn(argument or None) -> TextEncoder
TEXT_ENCODERS = {
    "minilm": "clad.backbones.text:minilm",
    "clip": "clad.backbones.text:clip_text",
}

# scheme -> DatasetScheme (clad.data.datasets): how "scheme:LOCATION" opens and lists its categories
DATASETS = {
    "mvtec": "clad.data.datasets:MVTEC",
    "visa": "clad.data.datasets:VISA",
    "folder": "clad.data.datasets:FOLDER",
}
