"""The typed config: YAML, overrides, validation errors that name the key, --print-config."""

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from diffusion_dist.config import Config, ConfigError, gradient_accumulation_steps, load_config, to_dict, to_yaml
from tests.conftest import CANARY_KEY_ID, CANARY_SECRET

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    assert isinstance(load_config(path), Config)


def test_defaults_and_yaml_and_overrides_layer(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  size: UNet-S\ntrain:\n  lr: 3.0e-4\n")
    config = load_config(
        path,
        [
            "model.num_classes=10",
            "train.lr=1e-3",
            "diffusion.schedule=cosine",
            "model.gradient_checkpointing=true",
            "data.storage_options.client_kwargs.endpoint_url=http://127.0.0.1:9000",
            "train.deepspeed.zero_optimization.reduce_bucket_size=5e8",
        ],
    )
    assert config.model.size == "UNet-S"  # from the YAML
    assert config.model.num_classes == 10 and config.train.lr == 1e-3  # overrides win
    assert config.diffusion.schedule == "cosine" and config.model.gradient_checkpointing is True
    assert config.train.zero_stage == 2  # default
    assert config.data.storage_options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert config.train.deepspeed["zero_optimization"]["reduce_bucket_size"] == 5e8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.sise=UNet-S"], r"unknown key model\.sise; did you mean model\.size\?"),
        (["modle.size=UNet-S"], r"unknown key modle; did you mean model\?"),
        (["train.max_steps=many"], r"invalid value for train\.max_steps"),
        (["train.zero_stage=1.5"], r"invalid value for train\.zero_stage"),
        (["diffusion.input_perturbation=-0.1"], r"diffusion\.input_perturbation=-0\.1: γ must be >= 0"),
        (["diffusion.p_uncond=1.0"], r"diffusion\.p_uncond=1\.0: must lie in \[0, 1\)"),
        (["diffusion.p_uncond=-0.2"], r"diffusion\.p_uncond=-0\.2: must lie in \[0, 1\)"),
        (["diffusion.schedule=quadratic"], r"diffusion\.schedule='quadratic': choose one of linear, cosine"),
        (["model.size=UNet-Q"], r"model\.size='UNet-Q': choose one of UNet-T, UNet-S"),
        (["train.precision=fp8"], r"train\.precision='fp8': choose one of fp32, bf16, fp16"),
        (["train.zero_stage=4"], r"train\.zero_stage=4"),
        (["train.precision=fp16", "train.zero_stage=0"], r"train\.zero_stage=0: fp16 needs ZeRO stage >= 1"),
        (["diffusion.variance=learned"], r"diffusion\.variance='learned'"),
        (["diffusion.sample_steps=2000"], r"diffusion\.sample_steps=2000: must lie in \[1, "),
        (["train.global_batch_size=100", "train.micro_batch_size=32"], r"train\.micro_batch_size=32: .* must divide"),
        (["train.max_steps"], r"not of the form section\.key=value"),
        (["seed=3"], r"not of the form section\.key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_yaml_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key train\.max_step; did you mean train\.max_steps\?"):
        load_config(path)
    path.write_text("diffusion:\n  p_uncond: lots\n")
    with pytest.raises(ConfigError, match=rf"{path}: invalid value for diffusion\.p_uncond"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_micro_batch_must_divide_global_batch_by_world_size():
    overrides = ["train.global_batch_size=64", "train.micro_batch_size=16"]
    assert gradient_accumulation_steps(load_config(None, overrides, world_size=2), 2) == 2
    assert gradient_accumulation_steps(load_config(None, overrides, world_size=4), 4) == 1
    with pytest.raises(ConfigError, match=r"16 × 8\) must divide train\.global_batch_size=64"):
        load_config(None, overrides, world_size=8)


def test_yaml_round_trip_redacts_credentials():
    config = load_config(
        None,
        [
            "data.storage_options.key=AKIACANARY",
            "data.storage_options.secret=canary-secret",
            "data.storage_options.client_kwargs.aws_session_token=canary-token",
            "data.storage_options.client_kwargs.endpoint_url=http://127.0.0.1:9000",
        ],
    )
    text = to_yaml(config)
    assert "CANARY" not in text.upper()
    tree = yaml.safe_load(text)
    assert tree["data"]["storage_options"]["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert tree["model"] == {
        "kind": "unet",
        "size": "UNet-B",
        "num_classes": 1000,
        "dropout": 0.0,
        "gradient_checkpointing": False,
        "text": False,
    }


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.train", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
    )


def test_print_config_cli():
    result = run_cli("configs/demo.yaml", "model.size=UNet-S", "data.storage_options.secret=canary", "--print-config")
    assert result.returncode == 0, result.stderr
    tree = yaml.safe_load(result.stdout)
    assert tree["model"]["size"] == "UNet-S" and tree["run"]["dir"] == "runs/demo"
    assert "canary" not in result.stdout


def test_cli_accepts_the_deepspeed_launchers_local_rank():
    from launch.train import parse_args

    args = parse_args(["configs/demo.yaml", "--local_rank=1", "train.max_steps=5"])
    assert args.overrides == ["train.max_steps=5"]


def test_cli_reports_config_errors_without_a_traceback():
    result = run_cli("configs/demo.yaml", "train.zero_stag=3", "--print-config")
    assert result.returncode == 2
    assert "unknown key train.zero_stag; did you mean train.zero_stage?" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_checks_the_batch_split_for_the_launcher_world_size():
    env = {**os.environ, "WORLD_SIZE": "3", "RANK": "0"}
    result = run_cli("configs/demo.yaml", "--print-config", env=env)
    assert result.returncode == 2 and "× 3) must divide train.global_batch_size=64" in result.stderr


FLOAT_KEYS = [
    f"{section.name}.{item.name}"
    for section in fields(Config)
    for item in fields(getattr(Config(), section.name))
    if item.type in (float, "float")
]


def test_every_float_key_is_audited():
    assert {"train.lr", "train.ema_decay", "train.grad_clip", "diffusion.p_uncond", "eval.cfg_scale"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_numbers_are_refused(key, value):
    """nan passes `not x < 0` checks and inf passes `x > 0`: every float key refuses both by name."""
    with pytest.raises(ConfigError, match=rf"^{key}={value}: must be a finite number$"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize(
    "signals, message",
    [
        ("[SIGKILL]", "SIGKILL cannot be caught"),
        ("[SIGUSR1,SIGSTOP]", "SIGSTOP cannot be caught"),
        ("[SIGSEGV]", "SIGSEGV reports a crash"),
        ("[SIGCHLD]", "SIGCHLD arrives whenever a data worker process ends"),
        ("[SIG_DFL]", "'SIG_DFL' is not a signal name"),
        ("[NSIG]", "'NSIG' is not a signal name"),
    ],
)
def test_preempt_signals_must_be_catchable_signals(signals, message):
    with pytest.raises(ConfigError, match=rf"^run\.preempt_signals=.*: {message}"):
        load_config(None, [f"run.preempt_signals={signals}"])
    assert load_config(None, ["run.preempt_signals=[SIGUSR2,SIGTERM]"]).run.preempt_signals == ["SIGUSR2", "SIGTERM"]
    assert load_config(None, ["run.preempt_signals=[]"]).run.preempt_signals == []


@pytest.mark.parametrize("url", ["", "  "])
def test_training_needs_a_data_url(url):
    with pytest.raises(ConfigError, match=r"^data\.url='.*': set the dataset"):
        load_config(None, [f"data.url={url}"], training=True)
    assert load_config(None, [f"data.url={url}"]).data.url == url.strip()  # an engine or export needs none
    assert load_config(None, ["tracking.uri="]).tracking.uri == ""  # `key=` is the empty string, not null


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  lr: [1\n", r", line 3, column 1: not valid YAML: did not find expected ',' or '\]' "
         r"\(while parsing a flow sequence at line 2, column 7\)"),
        ("train:\n\tlr: 1\n", r", line 2, column 1: not valid YAML: found character that cannot start any token"),
        ("train:\n  lr: 1\ntrain:\n  lr: 2\n", r", line 3, column 1: not valid YAML: found duplicate key train"),
        ("- model\n- train\n", r": the top level must map sections to keys"),
        ("data:\n  url:\n", r": invalid value for data\.url: no value given"),
        ("x: !!python/object/apply:os.system [ls]\n", r", line 1, column 4: not valid YAML: could not determine"),
    ],
)  # fmt: skip
def test_yaml_errors_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}{message}"):
        load_config(path)


def test_override_syntax_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"^override 'train\.lr=\[1': the value is not valid YAML"):
        load_config(None, ["train.lr=[1"])


def test_urls_in_any_value_lose_their_credentials_where_written():
    """user:password@ and query strings of every URL in the tree are redacted in to_dict / to_yaml (what
    config.yaml, checkpoints, MLflow, --print-config and --dry-run show); the Config keeps the real URLs."""
    tracking = f"http://trainer:{CANARY_SECRET}@mlflow.example:5000"
    data = f"s3://{CANARY_KEY_ID}:{CANARY_SECRET}@bucket/latents?token={CANARY_SECRET}"
    config = load_config(
        None,
        [
            f"data.url={data}",
            f"tracking.uri={tracking}",
            f"eval.reference=https://stats.example/ref.npz?X-Amz-Credential={CANARY_KEY_ID}&X-Amz-Signature=s",
            f"data.storage_options.client_kwargs.endpoint_url=http://u:{CANARY_SECRET}@s3.example",
            f"train.deepspeed.comms_logger.url=https://h/x#access_token={CANARY_SECRET}",
            f"checkpoint.dir=s3://{CANARY_KEY_ID}:{CANARY_SECRET}@bucket/run",
        ],
    )
    assert config.tracking.uri == tracking and config.data.url == data  # what the program uses
    text = to_yaml(config)
    assert CANARY_SECRET not in text and CANARY_KEY_ID not in text
    tree = to_dict(config)
    assert tree["data"]["url"] == "s3://bucket/latents?<redacted>"
    assert tree["tracking"]["uri"] == "http://mlflow.example:5000"
    assert tree["checkpoint"]["dir"] == "s3://bucket/run"
    assert tree["eval"]["reference"] == "https://stats.example/ref.npz?<redacted>"
    assert tree["data"]["storage_options"]["client_kwargs"]["endpoint_url"] == "http://s3.example"
    assert yaml.safe_load(text) == tree


def test_errors_show_no_credentials():
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"data.urll=s3://{CANARY_KEY_ID}:{CANARY_SECRET}@bucket/x?token={CANARY_SECRET}"])
    assert "override 'data.urll=s3://bucket/x?<redacted>': unknown key data.urll" in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"train.max_steps=http://u:{CANARY_SECRET}@h"])
    assert CANARY_SECRET not in str(error.value) and "train.max_steps" in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lr=inf"], "error: train.lr=inf: must be a finite number"),
        (["data.url="], "error: data.url='': set the dataset"),
        (["run.preempt_signals=[SIGKILL]"], "SIGKILL cannot be caught"),
    ],
)
def test_cli_refuses_bad_values_with_exit_2(overrides, message):
    result = run_cli("configs/demo.yaml", *overrides, "--print-config")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_cli_reports_a_yaml_syntax_error_with_its_line(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  size: UNet-T\n  num_classes: [10\n")
    result = run_cli(str(path), "--print-config")
    assert result.returncode == 2, result.stderr
    assert f"error: {path}, line 4, column 1: not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr
