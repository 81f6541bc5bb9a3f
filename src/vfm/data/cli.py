"""`vfm shard` and `vfm make-imagenet-c`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)

SPLIT_OF = {"in1k-val": "validation", "imagenet-r": "validation", "imagenet-c": "validation"}


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def _already_complete(dest: str, dataset: str, seed: int, endpoint_url: str | None,
                      subset: dict | None = None) -> bool:
    from vfm import storage
    from vfm.data.manifest import MANIFEST_NAME, Manifest

    url = storage.join(dest, MANIFEST_NAME)
    if not storage.exists(url, endpoint_url):
        return False
    m = Manifest.load(url, endpoint_url)
    if (m.dataset, m.seed) != (dataset, seed):
        from vfm.errors import UserError

        raise UserError(f"{url} already holds dataset {m.dataset!r} (seed {m.seed}); choose another --dest")
    drawn = {k: m.class_subset[k] for k in ("num_classes", "fraction", "seed", "classes") if k in m.class_subset}
    if drawn != (subset or {}):
        from vfm.errors import UserError

        raise UserError(f"{url} already holds {m.dataset!r} drawn as subset {drawn or 'none (whole)'}, not "
                        f"{subset or 'the whole dataset'}; choose another --dest")
    console.print(f"{url}: already complete ({m.num_samples:,} samples in {len(m.shards)} shards); nothing to do")
    return True


def run_sharding(write, dest: str, endpoint_url: str | None) -> None:
    """Drive `write(on_plan, on_shard)` with a progress bar and print the outcome."""
    with _progress() as bar:
        task = bar.add_task("shards", total=None)

        def on_plan(n_shards: int, n_samples: int) -> None:
            bar.update(task, total=n_shards, description=f"shards ({n_samples:,} samples)")

        def on_shard(rec: dict) -> None:
            bar.advance(task)

        report = write(on_plan, on_shard)
    if report.manifest is None:
        console.print(f"stopped with {report.remaining} shards still to write ({report.written} written, "
                      f"{report.resumed} verified and kept); rerun the same command to continue")
        return
    m = report.manifest
    console.print(f"wrote {report.written} shards, kept {report.resumed} verified ones: {m.num_samples:,} samples, "
                  f"{len(m.shards)} shards, manifest {m.location}")
    for reason, count in m.failure_counts().items():
        console.print(f"  {count:>8,}  {reason}")


def register(app: typer.Typer) -> None:
    @app.command("shard")
    def shard_cmd(
        dataset: Annotated[str, typer.Argument(help="in22k-fall11 | in21k-winter21 | in1k | in1k-val | imagenet-r | "
                                                    "imagenet-c | folder | ade20k | coco2017")],
        source: Annotated[str, typer.Option("--source", help="Archive, directory of tarballs, or folder tree; ade20k: "
                                            "ADEChallengeData2016.zip; coco2017: train2017.zip / val2017.zip (or "
                                            "either extracted).")],
        dest: Annotated[str, typer.Option("--dest", help="s3://bucket/prefix or a local directory.")],
        shard_size: Annotated[str, typer.Option("--shard-size", help="Target bytes per shard, e.g. 1GB, 300MB.")] = "1GB",
        workers: Annotated[int | None, typer.Option("--workers", min=1, help="Parallel shard writer processes "
                                                    "(default: the CPUs this process may use, e.g. the pod's limit).")] = None,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the global shuffle.")] = 0,
        endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3 endpoint (else AWS_ENDPOINT_URL_S3).")] = None,
        labels: Annotated[str | None, typer.Option("--labels", help="in1k-val: LOC_val_solution.csv or devkit tar.gz; "
                                                   "coco2017: annotations_trainval2017.zip (or its instances_*.json).")] = None,
        classes: Annotated[str | None, typer.Option("--classes", help="Class list file (one wnid per line; label = line).")] = None,
        split: Annotated[str | None, typer.Option("--split", help="Split name in _info.json (train / validation); "
                                                  "ade20k and coco2017 (required): train or val, the release's "
                                                  "training / validation and train2017 / val2017.")] = None,
        drop_unannotated: Annotated[bool, typer.Option("--drop-unannotated", help="coco2017: leave out images without "
                                                       "annotations (as detectron2 does for training); by default "
                                                       "they are kept.")] = False,
        repair: Annotated[bool, typer.Option("--repair/--skip-bad", help="Repair gzip/PNG/CMYK members instead of skipping them (both are reported).")] = False,
        spool_dir: Annotated[str | None, typer.Option("--spool-dir", help="Where a .tar.gz source is decompressed once.")] = None,
        max_shards: Annotated[int | None, typer.Option("--max-new-shards", help="Write at most N shards this run (time-boxed jobs); rerun to continue.")] = None,
        max_samples: Annotated[int | None, typer.Option("--max-samples-per-shard", help="Also cut shards at this many samples.")] = None,
        verify: Annotated[str, typer.Option("--verify", help="header: bytes, markers and header of each image; "
                                            "decode: also decode it (several times slower).")] = "header",
        subset_classes: Annotated[int | None, typer.Option("--subset-classes", min=1, help="Shard only N classes, "
                                  "drawn with --subset-seed from the sorted class list (train and val draw alike).")] = None,
        subset_fraction: Annotated[float, typer.Option("--subset-fraction", help="With --subset-classes: this "
                                   "fraction of each class's images, chosen by name hash.")] = 1.0,
        subset_seed: Annotated[int, typer.Option("--subset-seed", help="Seed of the class draw and the fraction.")] = 0,
        subset_class_file: Annotated[str | None, typer.Option("--subset-class-file", help="Keep exactly these "
                                     "classes (one wnid per line) instead of drawing --subset-classes.")] = None,
    ) -> None:
        """Shard a dataset into WebDataset tars (original JPEG bytes) with a manifest written last; resumable.

        Dense datasets: `vfm shard ade20k --source ADEChallengeData2016.zip --split train --dest D` (image + .seg.png
        mask), `vfm shard coco2017 --source train2017.zip --labels annotations_trainval2017.zip --split train
        --dest D` (image + .json annotations)."""
        from vfm.data.classes import read_class_file
        from vfm.data.shard import available_cpus, parse_size, write_dataset
        from vfm.data.sources import DENSE_DATASETS, index_source, subset_index

        dense = dataset in DENSE_DATASETS
        if dense:
            from vfm.data.dense_sources import dense_split

            split = dense_split(dataset, split)[0]  # the release's split it selects, named train / validation
            if subset_classes or subset_class_file:
                raise typer.BadParameter(f"--subset-classes / --subset-class-file draw classes of a classification "
                                         f"dataset; {dataset} is sharded whole (its samples have no single class)")
        if drop_unannotated and dataset != "coco2017":
            raise typer.BadParameter("--drop-unannotated is for coco2017")

        try:
            listed = sorted(read_class_file(subset_class_file)) if subset_class_file else []
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"--subset-class-file: {exc}") from None
        if listed and subset_classes and subset_classes != len(listed):
            raise typer.BadParameter(f"--subset-classes {subset_classes} but --subset-class-file lists {len(listed)} "
                                     "classes; pass one of them")
        subset = ({"num_classes": len(listed) or subset_classes, "fraction": subset_fraction, "seed": subset_seed,
                   **({"classes": listed} if listed else {})} if subset_classes or listed else None)
        if subset is None and subset_fraction != 1.0:
            raise typer.BadParameter("--subset-fraction needs --subset-classes (the number of classes to keep) "
                                     "or --subset-class-file")
        if _already_complete(dest, dataset, seed, endpoint_url, subset):
            return
        with _progress() as bar:
            task = bar.add_task(f"indexing {source}", total=None)
            index = index_source(dataset, source, labels=labels, class_file=classes, spool_dir=spool_dir,
                                 progress=lambda msg: bar.update(task, advance=1, description=f"indexing {msg}"),
                                 **({"split": split, "drop_unannotated": drop_unannotated} if dense else {}))
        console.print(f"indexed {len(index):,} samples in {len(index.classes):,} classes "
                      f"({len(index.failures):,} rejected while indexing)")
        if subset is not None:
            index = subset_index(index, **subset)
            console.print(f"subset: {len(index):,} samples of {len(index.classes):,} classes "
                          f"({', '.join(index.classes[:5])}{', …' if len(index.classes) > 5 else ''})")
        run_sharding(lambda on_plan, on_shard: write_dataset(
            index, dest, split=split or SPLIT_OF.get(dataset, "train"), seed=seed, shard_size=parse_size(shard_size),
            max_samples_per_shard=max_samples, workers=workers or available_cpus(), repair=repair,
            endpoint_url=endpoint_url, source=source, max_new_shards=max_shards, on_shard=on_shard, on_plan=on_plan,
            verify=verify), dest, endpoint_url)

    @app.command("make-imagenet-c")
    def make_imagenet_c_cmd(
        source: Annotated[str, typer.Option("--source", help="IN-1K val: an in1k-val manifest (path/s3://) or a folder per wnid.")],
        dest: Annotated[str, typer.Option("--dest", help="s3://bucket/prefix or a local directory.")],
        corruptions: Annotated[str, typer.Option("--corruptions", help="Comma list; default: the 15 benchmark + 4 extra.")] = "all",
        severities: Annotated[str, typer.Option("--severities", help="Comma list of 1..5.")] = "1,2,3,4,5",
        shard_size: Annotated[str, typer.Option("--shard-size")] = "1GB",
        workers: Annotated[int | None, typer.Option("--workers", min=1, help="Processes corrupting and writing "
                                                    "shards (default: the CPUs this process may use).")] = None,
        seed: Annotated[int, typer.Option("--seed", help="Seeds every image's corruption RNG.")] = 0,
        endpoint_url: Annotated[str | None, typer.Option("--endpoint-url")] = None,
    ) -> None:
        """Regenerate ImageNet-C (resize 256, crop 224, corrupt, JPEG q85) as shards; resumable like `vfm shard`."""
        from vfm.data.imagenet_c import ALL_CORRUPTIONS, make_imagenet_c
        from vfm.data.shard import available_cpus, parse_size

        names = list(ALL_CORRUPTIONS) if corruptions == "all" else [c.strip() for c in corruptions.split(",") if c.strip()]
        try:
            sevs = [int(s) for s in severities.split(",") if s.strip()]
        except ValueError as e:
            raise typer.BadParameter(f"--severities must be integers 1..5: {severities!r}") from e
        if _already_complete(dest, "imagenet-c", seed, endpoint_url):
            return
        run_sharding(lambda on_plan, on_shard: make_imagenet_c(
            source, dest, corruptions=names, severities=sevs, seed=seed, workers=workers or available_cpus(),
            shard_size=parse_size(shard_size), endpoint_url=endpoint_url, on_plan=on_plan, on_shard=on_shard),
            dest, endpoint_url)


def main() -> None:
    """`python -m vfm.data.cli ...`: the data commands without the rest of the CLI."""
    import sys

    from vfm.errors import USER_ERRORS

    app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    register(app)
    try:
        app(standalone_mode=False)
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
