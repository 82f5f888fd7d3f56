"""``clad bench``'s arguments and command: the benchmark, a blind rating sheet, or the rating table."""
from __future__ import annotations

import re
from pathlib import Path

from clad.bench.ratings import export_rating_sheet, import_ratings, ratings_markdown
from clad.bench.runner import run_bench
from clad.cluster import add_engine_args
from clad.errors import SpecError
from clad.pipeline.outputs import atomic_write, output_lock
from clad.specs import argument_type, parse_int

POSITIVE = argument_type(parse_int, 1)
NATURAL = argument_type(parse_int, 0)


def add_parser(sub) -> None:
    """Add ``clad bench`` to the ``clad`` command's subparsers."""
    p = sub.add_parser(
        "bench", help="run the paper's benchmark grid (cached, resumable) and write its tables",
        description="Three modes: the benchmark (--out), a blind rating sheet (--rating-sheet) and the rating "
                    "table from filled sheets (--ratings + --key).")
    p.add_argument("--data", help="comma-separated datasets: mvtec:ROOT, visa:ROOT, folder:GOOD[,DEFECT[,MASKS]]")
    p.add_argument("--categories", default="all", help="'all' (default) or a comma-separated list")
    p.add_argument("--detectors", default="clad,patchcore,padim,spade",
                   help="comma-separated NAME[key=value;key=value]@LABEL, e.g. "
                        "'clad,clad[loss=supervised]@clad-no-contrastive,patchcore' (default clad,patchcore,padim,spade)")
    p.add_argument("--shots", default="1", help="comma-separated reference counts or 'all' (default 1)")
    p.add_argument("--runs", type=POSITIVE, default=5, help="runs per cell; run r uses seed r (default 5)")
    p.add_argument("--out", help="bench folder: runs/ (cache), results.json, report.md, plots/")
    p.add_argument("--aux", metavar="SPEC", help="labelled defects of other categories for CLAD to train on too, "
                   "e.g. mvtec:ROOT (the evaluated category is always left out)")
    p.add_argument("--corruptions", metavar="NAME[:S,S...],...|all",
                   help="also evaluate every cell on corrupted test images, e.g. 'gaussian_noise:1,2,3,blur,jpeg:2' "
                        "(a bare name: severities 1-3) or 'all' (every corruption of clad.data.corruptions at 1-3)")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="predict and backbone-timing batch (default 16)")
    p.add_argument("--pixel-eval-size", type=NATURAL, default=256, help="longer side for pixel metrics (0 = native)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_engine_args(p, "the runs one after another in this process", "each run (runs sharing a fit together) as a "
                    "Ray task, written here as it finishes",
                    lambda q: q.add_argument("--cpus-per-run", type=POSITIVE, default=1, metavar="N",
                                             help="with --engine ray: CPUs (and threads) each task declares "
                                                  "(default 1)"))
    p.add_argument("--rating-sheet", metavar="DIR", help="write a blind human-rating sheet to DIR instead")
    p.add_argument("--n-images", type=POSITIVE, default=20, help="defective images per category in the sheet (default 20)")
    p.add_argument("--seed", type=NATURAL, default=0, help="seed of the rating sheet's references and images (default 0)")
    p.add_argument("--rating-scale", choices=("per_map", "shared"), default="per_map",
                   help="overlay colour scale in the sheet (default per_map; see clad.bench.export_rating_sheet)")
    p.add_argument("--ratings", metavar="CSV[,CSV...]", help="filled sheets, one per rater: print Table 3")
    p.add_argument("--key", help="key.json of the rating sheet (with --ratings)")
    p.set_defaults(func=cmd_bench)


def _command(args) -> list[str]:
    """The bench command line, rebuilt from the parsed arguments (recorded in results.json and the report)."""
    out = ["bench", "--data", args.data, "--categories", args.categories, "--detectors", args.detectors,
           "--shots", args.shots, "--runs", str(args.runs), "--out", args.out]
    if args.batch_size != 16:
        out += ["--batch-size", str(args.batch_size)]
    if args.pixel_eval_size != 256:
        out += ["--pixel-eval-size", str(args.pixel_eval_size or 0)]
    if args.aux:
        out += ["--aux", args.aux]
    if args.corruptions:
        out += ["--corruptions", args.corruptions]
    if args.engine != "local":
        out += ["--engine", args.engine]
        for flag, value in (("--address", args.address), ("--num-cpus", args.num_cpus)):
            out += [flag, str(value)] if value is not None else []
        out += ["--cpus-per-run", str(args.cpus_per_run)] if args.cpus_per_run != 1 else []
    return [f"'{a}'" if re.search(r"[\s\[\];@]", a) else a for a in out]


def cmd_bench(args) -> int:
    """Errors in what was given are CladErrors (``clad: error:`` from ``clad.cli.main``); an interrupted bench keeps
    every finished run in its cache and returns 130."""
    pes = args.pixel_eval_size or None
    if args.ratings:
        if not args.key:
            raise SpecError("bench: --ratings needs --key KEY.json")
        dest = Path(args.out) / "table3.md" if args.out else Path(args.key).with_name("table3.md")
        with output_lock(dest, "file"):
            md = ratings_markdown(import_ratings(args.ratings, args.key))
            print(md)
            atomic_write(dest, md)
        print(f"written {dest}")
        return 0
    if not args.data:
        raise SpecError("bench: --data is needed")
    if args.rating_sheet:
        with output_lock(args.rating_sheet, "folder", "--rating-sheet"):
            export_rating_sheet(args.rating_sheet, args.data, args.categories, args.detectors, args.shots,
                                n_images=args.n_images, seed=args.seed, scale=args.rating_scale,
                                batch_size=args.batch_size)
        return 0
    if not args.out:
        raise SpecError("bench: --out DIR is needed (or --rating-sheet DIR, or --ratings with --key)")
    with output_lock(args.out, "folder"):
        summary = run_bench(args.out, args.data, args.categories, args.detectors, args.shots, args.runs,
                            batch_size=args.batch_size, pixel_eval_size=pes, plots=not args.no_plots,
                            argv=_command(args), aux=args.aux, corruptions=args.corruptions,
                            engine=args.engine, address=args.address, num_cpus=args.num_cpus,
                            cpus_per_run=args.cpus_per_run)
    if summary["interrupted"]:
        return 130
    return 1 if summary["failed"] else 0
