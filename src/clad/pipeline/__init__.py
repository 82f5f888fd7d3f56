"""One streaming predict flow under every front end: a source of images, decoded lazily a few batches ahead,
predicted in batches, handed to sinks (CSV, ``.npy`` maps, explanations, an HTML report, the metrics).

    from clad.pipeline import Pipeline, from_folder, PredictionsCSV, MapsNpy
    summary = Pipeline(detector, [MapsNpy("out/maps"), PredictionsCSV("out/predictions.csv")]).run(from_folder("images"))

Outputs are held by one writer (``output_lock``), written whole or not at all, and kept up to what was finished
when a run is interrupted (``outputs``); a run folder records what made them and resumes an interrupted run
(``runs``).
"""
from clad.pipeline.flow import Pipeline, Prefetcher, Summary
from clad.pipeline.maps import MAP_FORMATS, read_map, write_map
from clad.pipeline.outputs import (Staging, atomic_write, folder_digest, output_lock, stop_on_signals,
                                   uninterrupted)
from clad.pipeline.runs import RunFolder, read_done
from clad.pipeline.sinks import (
    BaseSink,
    ErrorLog,
    ErrorsCSV,
    ExplanationsJSON,
    FileSink,
    HTMLReport,
    MapsNpy,
    PredictionsCSV,
    PredictionsParquet,
    RunRecord,
    Sink,
    parquet_available,
    write_parquet,
)
from clad.pipeline.sources import (Entry, LabelledEntry, Unusable, from_dataset, from_folder, from_manifest, from_paths,
                                   open_source)

__all__ = [
    "BaseSink",
    "Entry",
    "ErrorLog",
    "ErrorsCSV",
    "ExplanationsJSON",
    "FileSink",
    "HTMLReport",
    "LabelledEntry",
    "MAP_FORMATS",
    "MapsNpy",
    "Pipeline",
    "PredictionsCSV",
    "PredictionsParquet",
    "Prefetcher",
    "RunFolder",
    "RunRecord",
    "Sink",
    "Staging",
    "Summary",
    "Unusable",
    "atomic_write",
    "folder_digest",
    "from_dataset",
    "from_folder",
    "from_manifest",
    "from_paths",
    "open_source",
    "output_lock",
    "parquet_available",
    "read_map",
    "read_done",
    "stop_on_signals",
    "uninterrupted",
    "write_map",
    "write_parquet",
]
