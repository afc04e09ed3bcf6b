"""python -m launch.evaluate EXPORT --num-samples N --cfg-scale W[,W2,...] --steps S --reference REF
       [--sampler ddpm|ddim] [--classifier EXPORT --classifier-scale S] [--reference-samples N]
       [--save-reference-stats FILE.npz] [--feature-extractor NAME] [--feature-weights PATH]
       [--download-weights] [--out DIR] [--tracking-uri URI | --no-tracking]
       [--prompts-file F] [--text-encoder DIR] [--clip-model DIR]

FID (and Inception Score where the feature network has logits) of an export's samples, for
each classifier-free guidance scale w of ε̃ = (1 + w)·ε_c − w·ε_∅ (DiT's, GLIDE's and diffusers'
scale is s = 1 + w: their 1.5 is w = 0.5), against REF: an .npz of reference statistics (mu,
sigma), a latent dataset URL (its first --reference-samples samples, decoded with its codec),
or an image folder (center-cropped and resized to the samples' resolution). Runs as one
process, or under torchrun / srun with the samples split over the ranks (the same samples
whatever the number of ranks). Writes DIR/report.json and DIR/fid_vs_cfg.{png,svg}, and logs
both with the scores to MLflow, as a child of the training run where the export names it.
A text model samples from prompts: --prompts-file's lines, or the first caption of each of the
reference dataset's samples (a captioned latent dataset); with --clip-model (a transformers
CLIPModel and its CLIPProcessor in a local folder) the report also holds the CLIP score of the
samples against their prompts, 100 · max(cos, 0) averaged (Hessel et al. 2021, torchmetrics' scale).
Exit codes: 0 done; 2 bad input (before any sampling).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from data_tools.encode_latents import json_options
from data_tools.images import IMAGE_EXTENSIONS, BadImage, center_crop_resize, decode_image
from diffusion_dist.data.manifest import DatasetError, load_manifest
from diffusion_dist.data.storage import atomic_file, filesystem, read_bytes, redact_text, redact_url
from diffusion_dist.distributed import barrier, end_process_group, init_process_group, process_from_env
from diffusion_dist.evaluation import (
    INCEPTION,
    ClipScore,
    EvaluationError,
    FeatureNet,
    dataset_batches,
    dataset_captions,
    extract_features,
    image_resolution,
    load_statistics,
    sample_batches,
    sample_labels,
    save_statistics,
    scores,
    statistics,
)
from diffusion_dist.export import ExportInfo, load_null_text
from diffusion_dist.inference import Guidance
from diffusion_dist.pictures import styled_figure
from diffusion_dist.text import TextEncoder
from launch.sample import add_guidance_arguments, load_models

log = logging.getLogger("launch.evaluate")
# What the report's cfg_scale means: the seed's w, not DiT's, GLIDE's or diffusers' s.
CFG_CONVENTION = "w of ε̃ = (1 + w)·ε_c − w·ε_∅; DiT's, GLIDE's and diffusers' guidance scale is s = 1 + w"
# Said when a text model is evaluated without a CLIP model: the score is left out, not made up.
NO_CLIP = (
    "CLIP score not computed: no --clip-model given. To score how well the samples follow their prompts, "
    "pass --clip-model DIR, a local folder holding a transformers CLIPModel and its CLIPProcessor (e.g. "
    "openai/clip-vit-large-patch14 saved with save_pretrained on a machine with internet)"
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("export", help="an export folder, or a run directory holding export/")
    parser.add_argument("--num-samples", type=int, required=True, help="samples per guidance scale (50000 in papers)")
    parser.add_argument(
        "--cfg-scale",
        type=scales,
        default=None,
        help="w of ε̃ = (1 + w)·ε_c − w·ε_∅ (DiT's/diffusers' s = 1 + w), or a comma-separated sweep: "
        "0,0.5,1,3 (default: the export's diffusion.guidance_scale)",
    )
    parser.add_argument("--reference", required=True, help="statistics .npz, latent dataset URL, or image folder")
    parser.add_argument("--reference-samples", type=int, default=50_000, help="samples of a dataset or folder")
    parser.add_argument("--save-reference-stats", default=None, help="write the reference statistics to this .npz")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward per rank")
    parser.add_argument("--feature-extractor", default=INCEPTION, help=f"{INCEPTION} or module:Class")
    parser.add_argument("--feature-weights", default=None, help="the feature network's weights (offline machines)")
    parser.add_argument(
        "--download-weights",
        action="store_true",
        help="download missing weights, the feature network's or a --clip-model hub id's (needs internet)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval/<time>)")
    parser.add_argument("--storage-options", type=json_options, default={}, help="fsspec options for REF as JSON")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: MLFLOW_TRACKING_URI, else the run's)"
    )
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the training run's)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument(
        "--prompts-file",
        default=None,
        help="a text model's prompts, one per line, cycled (default: the captions of --reference, a captioned dataset)",
    )
    parser.add_argument("--text-encoder", default=None, help="a local copy of the export's text encoder")
    parser.add_argument(
        "--clip-model",
        default=None,
        help="a text model's CLIP score with this CLIP model: a local folder holding a transformers CLIPModel "
        "and its CLIPProcessor files (default: no CLIP score)",
    )
    add_guidance_arguments(parser)
    return parser.parse_args(argv)


def scales(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: guidance scales must be finite and >= 0")
    return values


def text_prompts(args: argparse.Namespace, reference: Reference) -> list[str]:
    """--num-samples prompts for a text model: --prompts-file's lines, or the reference dataset's captions."""
    if args.prompts_file:
        try:
            lines = [line.strip() for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise EvaluationError(f"--prompts-file {args.prompts_file}: cannot read it ({e})") from None
        lines = [line for line in lines if line]
        if not lines:
            raise EvaluationError(f"--prompts-file {args.prompts_file}: holds no prompt (one per line)")
        return [lines[i % len(lines)] for i in range(args.num_samples)]
    if reference.kind != "dataset":
        raise EvaluationError(
            "a text model needs prompts: give --prompts-file, or a captioned latent dataset as --reference"
        )
    return dataset_captions(args.reference, args.num_samples, args.storage_options)


def run_dir_of(export: str) -> Path | None:
    """The run directory an export lives in (RUN_DIR/export), if it does."""
    path = Path(export)
    if (path / "export" / "config.json").is_file():
        return path
    return path.parent if path.name == "export" else None


class Reference:
    """REF resolved before any work: its kind, and for datasets and folders what to read."""

    def __init__(self, source: str, resolution: int, storage_options: dict[str, Any]) -> None:
        self.source, self.resolution, self.storage_options = source, resolution, storage_options
        self.files: list[str] = []
        if source.endswith(".npz"):
            if not Path(source).is_file():
                raise EvaluationError(f"--reference {source}: no such statistics file")
            self.kind = "statistics"
            return
        fs, root = filesystem(source, storage_options)
        if fs.isfile(root.rstrip("/") + "/manifest.json"):
            manifest = load_manifest(source, storage_options)
            theirs = image_resolution(manifest["codec"], manifest["latent"]["shape"])
            if theirs != resolution:
                raise EvaluationError(
                    f"--reference {redact_url(source)}: decodes to {theirs} px, the samples are {resolution} px; "
                    "use a reference at the samples' resolution"
                )
            self.kind = "dataset"
            return
        if not fs.isdir(root):
            raise EvaluationError(
                f"--reference {redact_url(source)}: neither a statistics .npz, a latent dataset (manifest.json) "
                "nor an image folder"
            )
        self.kind, self.fs = "images", fs
        self.files = sorted(p for p in fs.find(root) if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
        if len(self.files) < 2:
            raise EvaluationError(f"--reference {redact_url(source)}: holds {len(self.files)} images, FID needs >= 2")

    def batches(
        self, limit: int, batch_size: int, rank: int, world_size: int, device: str
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.kind == "dataset":
            yield from dataset_batches(
                self.source,
                limit=limit,
                batch_size=batch_size,
                rank=rank,
                world_size=world_size,
                device=device,
                storage_options=self.storage_options,
            )
            return
        files = self.files[:limit]
        for start in list(range(0, len(files), batch_size))[rank::world_size]:
            images, indices = [], []
            for index, path in enumerate(files[start : start + batch_size], start):
                try:
                    image = decode_image(read_bytes(self.fs, path))
                except BadImage as e:
                    log.warning("reference image %s skipped: %s", path, e)
                    continue
                images.append(torch.from_numpy(center_crop_resize(image, self.resolution).copy()))
                indices.append(index)
            if images:
                yield torch.tensor(indices), torch.stack(images).permute(0, 3, 1, 2)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    process = process_from_env()
    logging.basicConfig(
        level=logging.INFO if process.rank == 0 else logging.WARNING,
        format=f"%(asctime)s rank{process.rank} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if args.device in (None, "cuda") and torch.cuda.is_available():  # one GPU per rank
        args.device = f"cuda:{process.local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(args.device)
    try:
        # Everything that can be wrong is found here, before any sampling.
        model, diffusion, info, classifier, num_classes = load_models(args, need_classes=False)
        device = torch.device(args.device)
        if args.num_samples < 2:
            raise EvaluationError(f"--num-samples {args.num_samples}: FID needs at least 2")
        if args.batch_size < 1 or args.reference_samples < 2:
            raise EvaluationError("--batch-size must be >= 1 and --reference-samples >= 2")
        cfg_scales = args.cfg_scale or [info.diffusion.guidance_scale]
        out = output_folder(args)
        resolution = image_resolution(info.codec, list(info.latent_shape))
        reference = Reference(args.reference, resolution, args.storage_options)
        features = FeatureNet(args.feature_extractor, args.feature_weights, device, download=args.download_weights)
        if reference.kind == "statistics":
            reference_stats = load_statistics(args.reference, features.name)
            features.check(reference_stats, resolution)
        prompts = encoder = null_text = clip = None
        if info.text_encoder is not None:
            prompts = text_prompts(args, reference)
            encoder = TextEncoder.from_record(info.text_encoder, args.text_encoder, device)
            null_text = load_null_text(args.export, info)
            clip = ClipScore(args.clip_model, device, download=args.download_weights) if args.clip_model else None
            if clip is None and process.rank == 0:
                log.warning(NO_CLIP)
        elif args.prompts_file or args.clip_model:
            raise EvaluationError(f"{args.export} is not a text model: --prompts-file and --clip-model need one")
    except (EvaluationError, DatasetError, FileNotFoundError, ValueError) as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    if process.world_size > 1:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        init_process_group(process, device)
    steps = args.steps or info.diffusion.sample_steps
    sampler = args.sampler or info.diffusion.sampler
    rank, world = process.rank, process.world_size

    started = time.perf_counter()
    if reference.kind != "statistics":
        batches = reference.batches(args.reference_samples, args.batch_size, rank, world, args.device)
        gathered = extract_features(batches, features)
        reference_stats = (
            None if gathered is None else {**statistics(gathered["fid"]), "num_samples": len(gathered["fid"])}
        )
    if rank == 0:
        reference_count = int(reference_stats.get("num_samples", 0))
        log.info(
            "reference: %s, %d samples (%.1f s)",
            redact_url(args.reference),
            reference_count,
            time.perf_counter() - started,
        )
        if args.save_reference_stats and reference.kind != "statistics":
            meta = {"reference": redact_url(args.reference), "num_samples": reference_count}
            save_statistics(args.save_reference_stats, reference_stats, features.name, **meta)

    labels = sample_labels(args.num_samples, max(1, num_classes))  # an unconditional model: all ∅ anyway
    if prompts is not None:
        labels = [info.model.num_classes] * args.num_samples  # ∅ labels: the prompts condition a text model
    results = []
    for scale in cfg_scales:
        started = time.perf_counter()
        batches = sample_batches(
            model,
            diffusion,
            info,
            labels,
            Guidance(scale, classifier, args.classifier_scale if classifier is not None else 0.0),
            steps=steps,
            sampler=sampler,
            seed=args.seed,
            batch_size=args.batch_size,
            rank=rank,
            world_size=world,
            device=args.device,
            progress=rank == 0,
            prompts=prompts,
            encoder=encoder,
            null_text=null_text,
        )
        if clip is not None:
            clip.reset()
            batches = clip.observe(batches, prompts)
        gathered = extract_features(batches, features)
        clip_score = clip.result() if clip is not None else None  # a collective
        if rank == 0:
            result = {"cfg_scale": scale, **scores(gathered, reference_stats)}
            if clip_score is not None:
                result["clip_score"] = clip_score
            result["seconds"] = time.perf_counter() - started
            results.append(result)
            log.info("w = %g (s = 1 + w = %g): FID %.3f (%.0f s)", scale, 1 + scale, result["fid"], result["seconds"])
    if rank == 0:
        report = {
            "export": str(Path(args.export).resolve()),
            "step": info.step,
            "num_samples": args.num_samples,
            "steps": steps,
            "sampler": sampler,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "world_size": world,
            "classifier": str(Path(args.classifier).resolve()) if args.classifier else None,
            "classifier_scale": args.classifier_scale if args.classifier else None,
            "cfg_scale_convention": CFG_CONVENTION,
            "feature_extractor": features.name,
            "reference": {"source": redact_url(args.reference), "kind": reference.kind, "num_samples": reference_count},
            "results": results,
            "best": min(results, key=lambda r: r["fid"]),
        }
        if prompts is not None:
            report["text"] = {
                "prompts": str(Path(args.prompts_file).resolve()) if args.prompts_file else "reference captions",
                "clip_model": args.clip_model,  # None: no CLIP score
            }
        write_report(out, report)
        if not args.no_tracking:
            report["mlflow_run_id"] = log_to_mlflow(args, info, report, out)
            write_report(out, report)
        print_summary(report, out)
    if process.world_size > 1:
        barrier()
        end_process_group()
    return 0


def output_folder(args: argparse.Namespace) -> Path:
    """--out, or RUN_DIR/eval/<UTC time>; never one that holds a report already (nothing is overwritten)."""
    if args.out:
        out = Path(args.out)
    else:
        out = (run_dir_of(args.export) or Path(".")) / "eval" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if (out / "report.json").exists():
        raise EvaluationError(f"--out {out} holds a report already; choose another folder")
    return out


def write_report(out: Path, report: dict[str, Any]) -> None:
    """report.json and the sweep plot, FID (and IS) against w, each point labelled with its value."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "report.json") as temporary:
        temporary.write_text(json.dumps(report, indent=1) + "\n")
    results = report["results"]
    ws = [r["cfg_scale"] for r in results]
    with styled_figure(out / "fid_vs_cfg", suffixes=("png", "svg")) as figure:
        axis = figure.subplots()
        axis.plot(ws, [r["fid"] for r in results], "o-", color="tab:blue", label="FID")
        for w, r in zip(ws, results, strict=True):
            label = axis.annotate(f"{r['fid']:.2f}", (w, r["fid"]), textcoords="offset points", xytext=(0, 6))
            label.set(ha="center", gid=f"fid-w{w:g}")  # the SVG group id: the report's number can be found
        axis.set(xlabel="classifier-free guidance scale w (DiT's s = 1 + w)", ylabel="FID (lower is better)")
        axis.margins(x=0.1, y=0.15)  # room for the labels
        handles = axis.get_lines()
        if "inception_score" in results[0]:
            right = axis.twinx()
            right.grid(False)  # one grid, the left axis's
            right.plot(ws, [r["inception_score"] for r in results], "s--", color="tab:orange", label="IS")
            right.set_ylabel("Inception Score")
            handles += right.get_lines()
        axis.legend(handles=handles, loc="best")
        axis.set_title(f"{report['num_samples']} samples, {report['sampler']} {report['steps']} steps", fontsize=10)


def log_to_mlflow(args: argparse.Namespace, info: ExportInfo, report: dict[str, Any], out: Path) -> str | None:
    """One MLflow run with the scores per w, the best, and the report and plots as artifacts."""
    from diffusion_dist.train.tracking import Tracker, local_store

    training = info.tracking or {}
    run_dir = run_dir_of(args.export)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifact_root = None
    if not uri:
        if run_dir is None:
            log.info("no MLflow tracking: pass --tracking-uri (the export is not inside a run directory)")
            return None
        uri, artifact_root = local_store(run_dir)
    experiment = args.experiment or training.get("experiment") or "diffusion-dist-eval"
    tags = {"mlflow.source.name": "launch.evaluate", "export": report["export"]}
    if training.get("run_id") and experiment == training.get("experiment"):
        tags["mlflow.parentRunId"] = training["run_id"]  # shown under the training run
    params = {
        key: str(report[key])
        for key in ("step", "num_samples", "steps", "sampler", "seed", "classifier", "classifier_scale")
    }
    params.update(
        {
            "feature_extractor": report["feature_extractor"],
            "reference": report["reference"]["source"],
            "reference_samples": str(report["reference"]["num_samples"]),
            "cfg_scales": ",".join(f"{r['cfg_scale']:g}" for r in report["results"]),
        }
    )
    if "text" in report:
        params.update({f"text_{key}": str(value) for key, value in report["text"].items()})
    tracker = Tracker(
        uri, experiment, f"eval step {report['step']}", params=params, tags=tags, artifact_root=artifact_root
    )
    metrics = {"fid_best": report["best"]["fid"], "cfg_scale_best": report["best"]["cfg_scale"]}
    for r in report["results"]:
        for key in ("fid", "inception_score", "clip_score"):
            if key in r:
                metrics[f"{key}/cfg_{r['cfg_scale']:g}"] = r[key]
    tracker.log_metrics(metrics, report["step"] or 0)
    tracker.log_artifacts(out, "eval")
    outcome = tracker.close("FINISHED", timeout=120)
    if any(outcome.values()):
        log.warning("MLflow: some records were not delivered (%s); the report is in %s", outcome, out)
    return tracker.run_id


def print_summary(report: dict[str, Any], out: Path) -> None:
    clip = any("clip_score" in r for r in report["results"])
    header = f"{'w':>6} {'FID':>10} {'IS':>8}" + (f" {'CLIP':>7}" if clip else "")
    print(f"{header}  ({report['num_samples']} samples, {report['feature_extractor']})")
    for r in report["results"]:
        inception = f"{r['inception_score']:8.2f}" if "inception_score" in r else f"{'-':>8}"
        print(f"{r['cfg_scale']:6g} {r['fid']:10.3f} {inception}" + (f" {r['clip_score']:7.2f}" if clip else ""))
    best, s = report["best"], 1 + report["best"]["cfg_scale"]
    print(f"best: w = {best['cfg_scale']:g} (s = 1 + w = {s:g}), FID {best['fid']:.3f}; report in {out}")
    if "text" in report and not clip:
        print(NO_CLIP)


if __name__ == "__main__":
    sys.exit(main())
