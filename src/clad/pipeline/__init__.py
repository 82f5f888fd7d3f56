"""One streaming predict flow under every front end: a source of images, decoded lazily a few batches ahead,
predicted in batches, handed to sinks (CSV, ``.npy`` maps, explanations, an HTML report, the metrics).

    from clad.pipeline import Pipeline, from_folder, PredictionsCSV, MapsNpy
    summary = Pipeline(detector, [PredictionsCSV("out/predictions.csv"), MapsNpy("out/maps")]).run(from_folder("images"))
"""
from clad.pipeline.flow import Pipeline, Prefetcher, Summary
from clad.pipeline.sinks import (
    BaseSink,
    ErrorLog,
    ErrorsCSV,
    ExplanationsJSON,
    FileSink,
    HTMLReport,
    MapsNpy,
    PredictionsCSV,
    Sink,
)
from clad.pipeline.sources import Entry, LabelledEntry, from_dataset, from_folder, from_manifest, from_paths, open_source

__all__ = [
    "BaseSink",
    "Entry",
    "ErrorLog",
    "ErrorsCSV",
    "ExplanationsJSON",
    "FileSink",
    "HTMLReport",
    "LabelledEntry",
    "MapsNpy",
    "Pipeline",
    "PredictionsCSV",
    "Prefetcher",
    "Sink",
    "Summary",
    "from_dataset",
    "from_folder",
    "from_manifest",
    "from_paths",
    "open_source",
]
