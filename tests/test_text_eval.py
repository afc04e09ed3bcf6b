"""launch.evaluate on text-to-image models (issue 18). ClipScore against two independent computations
on a tiny, seeded, randomly initialised CLIPModel saved with its CLIPProcessor (no download):
torchmetrics' CLIPScore, and the CLIP score formula (Hessel et al. 2021) from the model's raw forward
(its logits are the scaled cosines). Then launch.evaluate on a small text model trained here: FID per
guidance scale against the captioned reference, the CLIP score with --clip-model and a clear word
when it is left out, and exit code 2 before any sampling for a CLIP model that cannot be loaded, text
options on a class model, and a text model with no prompts to sample from."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools import encode_latents
from data_tools.make_digits import digit_captions, write_captions, write_digits
from data_tools.make_text_encoder import BOS, EOS, build_text_encoder, write_clip_tokenizer
from diffusion_dist.evaluation import ClipScore, EvaluationError
from launch import evaluate
from tests.fid_features import SPEC, digit_images
from tests.test_evaluation import run_evaluate
from tests.test_train import overrides, train

CLIP_POSITIONS = 32  # the tiny CLIP's text positions: a long prompt must be cut to them
CLIP_IMAGE = 32  # its image side: the 8 px digits are resized to it by its processor


# A tiny CLIP model and the oracles.


def tiny_clip_model(vocab: dict[str, int], seed: int):
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=CLIP_POSITIONS, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=CLIP_IMAGE,
        patch_size=8,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def paper_cosines(model, processor, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """cos(E_image, E_text) of each pair from CLIPModel's forward: its logits_per_image are
    exp(logit_scale) · cos over all image-text pairs (Radford et al. 2021); the pairs are the diagonal."""
    inputs = processor(
        text=prompts, images=list(images), return_tensors="pt", padding=True, truncation=True,
        max_length=CLIP_POSITIONS,
    )  # fmt: skip
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
        return (torch.diagonal(logits) / model.logit_scale.exp()).double()


def score_pairs() -> tuple[torch.Tensor, list[str]]:
    """24 digit images (uint8 (N, 3, 8, 8)), each with one of its digit's phrasings."""
    images, labels = digit_images()
    images, labels = images[:24], labels[:24]
    return images, [digit_captions(int(label))[i % 5] for i, label in enumerate(labels.tolist())]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A CLIPModel (32 wide, 2 layers, 16-d projections, 32 px images, 32 text positions) and its CLIPProcessor
    (the tiny CLIP tokenizer of data_tools.make_text_encoder, a 32 px CLIPImageProcessor) in a folder. The
    first seed whose cosines on score_pairs() have both signs, so that the clamp at 0 is exercised."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    out = tmp_path_factory.mktemp("tiny-clip")
    vocab = write_clip_tokenizer(out)
    crop = {"height": CLIP_IMAGE, "width": CLIP_IMAGE}
    image_processor = CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE}, crop_size=crop)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(out))
    images, prompts = score_pairs()
    for seed in range(50):
        model = tiny_clip_model(vocab, seed)
        cosines = paper_cosines(model, processor, images, prompts)
        if (cosines < -0.01).sum() >= 3 and (cosines > 0.01).sum() >= 3:
            break
    else:
        pytest.fail("no seed in 0..49 gives a tiny CLIP with cosines of both signs")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def torchmetrics_clip(folder: Path):
    """torchmetrics' model_name_or_path as a callable: its string form takes only its listed hub ids,
    not a local folder. The model is wrapped only to return the projected embeddings as tensors, as
    torchmetrics expects; transformers 5 returns them in an output object (pooler_output)."""
    from transformers import CLIPModel, CLIPProcessor

    class Projections(torch.nn.Module):
        def __init__(self, model) -> None:
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs) -> torch.Tensor:
            return tensor(self.model.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs) -> torch.Tensor:
            return tensor(self.model.get_text_features(*args, **kwargs))

    def tensor(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    return lambda: (Projections(CLIPModel.from_pretrained(folder).eval()), CLIPProcessor.from_pretrained(folder))


@pytest.mark.filterwarnings("ignore:`max_length` is ignored:UserWarning")  # torchmetrics' tokenizer call
def test_clip_score_matches_torchmetrics_and_the_clip_papers_formula(tiny_clip):
    """Fed in two uneven batches as launch.evaluate does: the mean of 100 · max(cos, 0) over the pairs,
    as the paper defines it and as torchmetrics computes it pair by pair. torchmetrics' CLIPScore over
    a batch clamps the mean instead of each pair: over the pairs of positive cosine the two agree."""
    pytest.importorskip("torchmetrics", reason="torchmetrics is the oracle (pip install -e '.[dev]')")
    from torchmetrics.functional.multimodal import clip_score
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    images, prompts = score_pairs()
    state = torch.get_rng_state()
    clip = ClipScore(str(tiny_clip), "cpu")
    assert torch.equal(torch.get_rng_state(), state), "loading must not draw from the global RNG"
    batches = [(torch.arange(0, 10), images[:10]), (torch.arange(10, 24), images[10:])]
    passed = list(clip.observe(batches, prompts))
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(passed, batches, strict=True))
    ours = clip.result()

    # The paper's formula, from the forward's logits.
    cosines = paper_cosines(
        CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip), images, prompts
    )
    assert (cosines < 0).any() and (cosines > 0).any()
    assert ours == pytest.approx(float((100 * cosines.clamp(min=0)).mean()), abs=1e-4)
    torch.testing.assert_close(clip.cosines(images, prompts).double(), cosines, atol=1e-5, rtol=0)

    # torchmetrics, pair by pair: max(100 · cos, 0) each.
    load = torchmetrics_clip(tiny_clip)
    pairs = [float(clip_score(image, prompt, load).detach()) for image, prompt in zip(images, prompts, strict=True)]
    assert ours == pytest.approx(float(np.mean(pairs)), abs=1e-4)

    # torchmetrics' metric over the positive pairs, updated batch by batch.
    positive = (cosines > 0).nonzero().flatten().tolist()
    metric = CLIPScore(model_name_or_path=load)
    for chunk in (positive[: len(positive) // 2], positive[len(positive) // 2 :]):
        metric.update(list(images[chunk]), [prompts[i] for i in chunk])
    clip.reset()
    clip.add(images[positive], [prompts[i] for i in positive])
    assert clip.result() == pytest.approx(float(metric.compute()), abs=1e-4)
    assert 0 < clip.result() <= 100


def test_clip_score_cuts_long_prompts_to_the_models_positions(tiny_clip):
    """A prompt of more tokens than the model has positions is cut (the end marker kept), not an error."""
    from transformers import CLIPModel, CLIPProcessor

    images, prompts = score_pairs()
    long = " ".join(["a blurry photo of a small white digit drawn by hand"] * 6)
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    assert len(processor.tokenizer(long)["input_ids"]) > CLIP_POSITIONS
    pairs = [long, prompts[1]]
    clip = ClipScore(str(tiny_clip), "cpu")
    clip.add(images[:2], pairs)
    cosines = paper_cosines(CLIPModel.from_pretrained(tiny_clip), processor, images[:2], pairs)
    assert clip.result() == pytest.approx(float((100 * cosines.clamp(min=0)).mean()), abs=1e-4)


def test_a_clip_model_that_cannot_be_loaded_is_refused_naming_it_and_what_to_do(tiny_clip, tmp_path):
    """A missing folder, a text encoder (not a CLIPModel), a model without its processor files, one with
    weights missing, a hub id not in the cache (never downloaded unasked): EvaluationError naming it."""
    text_encoder = build_text_encoder(tmp_path / "text-encoder", kind="clip", seed=0)
    no_processor = tmp_path / "no-processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_clip / name, no_processor / name)
    partial = tmp_path / "partial"
    shutil.copytree(tiny_clip, partial)
    from safetensors.torch import load_file, save_file

    weights = load_file(partial / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("visual_projection")}, partial / "model.safetensors"
    )

    cases = {
        str(tmp_path / "missing"): "no such folder",
        str(text_encoder): "cannot load a CLIP model",
        str(no_processor): "cannot load a CLIP model",
        str(partial): "not a complete CLIPModel",
        "nobody/no-such-clip-model": "--download-weights",
    }
    for name, expected in cases.items():
        with pytest.raises(EvaluationError) as raised:
            ClipScore(name, "cpu")
        message = str(raised.value)
        assert message.startswith(f"--clip-model {name}: ") and expected in message, message
        assert "pass a local folder holding a transformers CLIPModel" in message
        assert "leave --clip-model out" in message


# launch.evaluate on a text model.


@dataclass
class TextData:
    captioned: Path  # latents with captions, encoded by the tiny CLIP text encoder
    plain: Path  # the same images without captions
    images: Path  # the image folder
    encoder: Path


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> TextData:
    root = tmp_path_factory.mktemp("text-eval")
    images, encoder = root / "images", root / "encoder"
    write_digits(images, limit=300)
    write_captions(images, root / "captions.jsonl")
    build_text_encoder(encoder, kind="clip", seed=0)
    common = ["--input", str(images), "--vae", "pixel", "--resolution", "8", "--shard-size", "100"]
    common += ["--num-workers", "0"]
    captions = ["--captions", str(root / "captions.jsonl"), "--text-encoder", str(encoder), "--text-max-length", "16"]
    assert encode_latents.main([*common, "--output", str(root / "captioned"), *captions]) == 0
    assert encode_latents.main([*common, "--output", str(root / "plain")]) == 0
    return TextData(root / "captioned", root / "plain", images, encoder)


# The in-training FID's settings, and launch.evaluate's flags for the same evaluation.
TRAINING_FID = {"num_samples": 40, "cfg_scale": 1.0, "sample_steps": 4, "sampler": "ddim", "batch_size": 16}


@pytest.fixture(scope="module")
def text_run(text_data, digit_weights, tmp_path_factory) -> Path:
    """A text-only model (no classes) trained 10 steps on the captioned digits, one process, with an
    in-training FID at step 10 (against the captioned data, from its captions)."""
    run_dir = tmp_path_factory.mktemp("text-run")
    evaluation = {f"eval__{k}": v for k, v in TRAINING_FID.items()}
    evaluation.update(eval__every=10, eval__reference_samples=300, eval__feature_extractor=SPEC)
    args = overrides(
        run_dir, text_data.captioned, model__text="true", model__num_classes=0, tracking__log_every=5,
        eval__feature_weights=digit_weights, **evaluation,
    )  # fmt: skip
    result = train(args, ranks=0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def class_run(text_data, tmp_path_factory) -> Path:
    """A class-conditional model trained 2 steps on the digits without captions."""
    run_dir = tmp_path_factory.mktemp("class-run")
    result = train(overrides(run_dir, text_data.plain, train__max_steps=2), ranks=0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def eval_arguments(text_data: TextData, digit_weights: Path, out: Path) -> list:
    return [
        "--num-samples", 40, "--batch-size", 16, "--steps", 4, "--sampler", "ddim", "--cfg-scale", "0,1",
        "--reference", text_data.captioned, "--reference-samples", 300, "--feature-extractor", SPEC,
        "--feature-weights", digit_weights, "--no-tracking", "--out", out,
    ]  # fmt: skip


@pytest.mark.slow
def test_evaluate_a_text_model_gives_fid_per_scale_and_the_clip_score(text_run, text_data, digit_weights, tiny_clip):
    out = text_run / "eval" / "clip"
    result = run_evaluate(text_run, *eval_arguments(text_data, digit_weights, out), "--clip-model", tiny_clip)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["reference"] == {"source": str(text_data.captioned), "kind": "dataset", "num_samples": 300}
    assert report["text"] == {"prompts": "reference captions", "clip_model": str(tiny_clip)}
    assert [r["cfg_scale"] for r in report["results"]] == [0.0, 1.0]
    for r in report["results"]:
        assert math.isfinite(r["fid"]) and r["fid"] > 0
        assert math.isfinite(r["clip_score"]) and 0 <= r["clip_score"] <= 100
    assert "CLIP" in result.stdout.splitlines()[0]  # the summary's column
    assert "CLIP score not computed" not in result.stdout + result.stderr


@pytest.mark.slow
def test_in_training_fid_of_a_text_model_equals_launch_evaluate_on_the_export(text_run, text_data, digit_weights):
    """Both sample from the reference's first captions with ∅ labels: the same samples, the same FID."""
    (record,) = [r for r in map(json.loads, (text_run / "metrics.jsonl").read_text().splitlines()) if "fid" in r]
    assert record["step"] == 10 and math.isfinite(record["fid"]) and record["fid"] > 0
    settings = TRAINING_FID
    out = text_run / "eval" / "same-settings"
    result = run_evaluate(
        text_run, "--num-samples", settings["num_samples"], "--cfg-scale", settings["cfg_scale"],
        "--steps", settings["sample_steps"], "--sampler", settings["sampler"], "--seed", 0,
        "--batch-size", settings["batch_size"], "--reference", text_data.captioned, "--reference-samples", 300,
        "--feature-extractor", SPEC, "--feature-weights", digit_weights, "--no-tracking", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["results"][0]["fid"] == pytest.approx(record["fid"], rel=1e-9)


@pytest.mark.slow
def test_evaluate_a_text_model_without_a_clip_model_says_the_score_was_not_computed(
    text_run, text_data, digit_weights, tmp_path
):
    """From --prompts-file's prompts (cycled): FID as before; no CLIP score, and output that says so and how."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the digit 3\n\na handwritten seven\n")
    out = text_run / "eval" / "no-clip"
    result = run_evaluate(text_run, *eval_arguments(text_data, digit_weights, out), "--prompts-file", prompts)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["text"] == {"prompts": str(prompts), "clip_model": None}
    assert all(math.isfinite(r["fid"]) and "clip_score" not in r for r in report["results"])
    for stream in (result.stdout, result.stderr):  # the summary, and the log before sampling
        assert "CLIP score not computed: no --clip-model given" in stream and "pass --clip-model DIR" in stream


@pytest.fixture
def refuse(monkeypatch, capsys, tmp_path):
    """launch.evaluate in this process, expected to exit 2 before sampling anything: its stderr."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.setenv(name, "")  # main sets defaults for these; restored after the test
        monkeypatch.delenv(name)

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(evaluate, "sample_batches", no_sampling)
    monkeypatch.setattr(evaluate, "extract_features", no_sampling)

    def run(export: Path, *args) -> str:
        out = tmp_path / "out"
        code = evaluate.main([str(export), "--num-samples", "8", "--no-tracking", "--out", str(out), *map(str, args)])
        assert code == 2
        assert not out.exists()
        return capsys.readouterr().err

    return run


@pytest.mark.slow
def test_a_bad_clip_model_is_refused_before_sampling(text_run, text_data, digit_weights, tiny_clip, refuse, tmp_path):
    reference = ["--reference", text_data.captioned, "--feature-extractor", SPEC, "--feature-weights", digit_weights]
    missing = tmp_path / "no-clip-here"
    message = refuse(text_run, *reference, "--clip-model", missing)
    assert f"error: --clip-model {missing}: no such folder" in message
    assert "pass a local folder holding a transformers CLIPModel" in message
    message = refuse(text_run, *reference, "--clip-model", text_data.encoder)  # the text encoder is no CLIPModel
    assert f"error: --clip-model {text_data.encoder}: cannot load a CLIP model" in message
    assert "Traceback" not in message


@pytest.mark.slow
def test_an_export_with_a_damaged_null_text_is_refused(text_run, text_data, digit_weights, refuse, tmp_path, capsys):
    """A null_text.safetensors without its mask, or of another length than the recorded encoder's: exit 2
    from launch.evaluate and launch.sample, naming the file, before any sampling."""
    from safetensors.torch import load_file, save_file

    from launch import sample

    export = tmp_path / "export"
    shutil.copytree(text_run / "export", export)
    null = load_file(export / "null_text.safetensors")
    features = ["--reference", text_data.captioned, "--feature-extractor", SPEC, "--feature-weights", digit_weights]
    for damaged in ({"embedding": null["embedding"]}, {k: v[:-1] for k, v in null.items()}):
        save_file(damaged, export / "null_text.safetensors")
        message = refuse(export, *features)
        assert f"{export / 'null_text.safetensors'} holds" in message and "export the run again" in message
        assert sample.main([str(export), "--prompt", "the digit 3", "--out", str(tmp_path / "samples")]) == 2
        assert f"{export / 'null_text.safetensors'} holds" in capsys.readouterr().err
        assert not (tmp_path / "samples.png").exists()


@pytest.mark.slow
def test_text_options_on_a_class_model_are_refused(class_run, text_data, digit_weights, tiny_clip, refuse, tmp_path):
    reference = ["--reference", text_data.plain, "--feature-extractor", SPEC, "--feature-weights", digit_weights]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the digit 3\n")
    for option in (["--prompts-file", prompts], ["--clip-model", tiny_clip]):
        message = refuse(class_run, *reference, *option)
        assert "is not a text model: --prompts-file and --clip-model need one" in message


@pytest.mark.slow
def test_a_text_model_without_prompts_is_refused(text_run, text_data, digit_weights, refuse, tmp_path):
    """A reference without captions and no --prompts-file: nothing to prompt the samples with."""
    features = ["--feature-extractor", SPEC, "--feature-weights", digit_weights]
    message = refuse(text_run, "--reference", text_data.plain, *features)
    assert f"{text_data.plain} holds no captions: a text model is evaluated on a captioned dataset" in message
    message = refuse(text_run, "--reference", text_data.images, *features)  # an image folder has no captions
    assert "a text model needs prompts: give --prompts-file, or a captioned latent dataset as --reference" in message
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    message = refuse(text_run, "--reference", text_data.captioned, *features, "--prompts-file", empty)
    assert f"--prompts-file {empty}: holds no prompt" in message
