"""Sample grids (gaps, integer enlargement, row labels, every codec alike) and training-curve plots."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_dist.codecs import AutoencoderKLCodec, PixelCodec
from diffusion_dist.pictures import (
    BACKGROUND,
    GAP,
    MIN_CELL,
    TEXT,
    GridLayout,
    grid_image,
    grid_layout,
    metric_series,
    plot_training_curves,
    read_metrics,
    row_labels,
    save_grid,
    styled_figure,
)


def cells(grid: np.ndarray, layout: GridLayout, count: int) -> np.ndarray:
    """The samples of a grid back at their own size (N, H, W, 3): every factor-th pixel of each cell."""
    origins = [layout.origin(i) for i in range(count)]
    f = layout.factor
    return np.stack([grid[y : y + layout.cell_h : f, x : x + layout.cell_w : f] for y, x in origins])


def cell_mask(layout: GridLayout, count: int) -> np.ndarray:
    """True on the pixels of the grid that belong to a cell."""
    mask = np.zeros(layout.shape, dtype=bool)
    for i in range(count):
        y, x = layout.origin(i)
        mask[y : y + layout.cell_h, x : x + layout.cell_w] = True
    return mask


def random_images(n: int, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_small_samples_are_enlarged_with_gaps_and_labels():
    images = random_images(80, 8, 8)
    labels = row_labels(range(10))
    grid = grid_image(images, rows=10, labels=labels)
    layout = grid_layout(80, 8, 8, rows=10, labels=labels)

    assert grid.dtype == np.uint8 and grid.shape == (*layout.shape, 3)
    assert (layout.rows, layout.columns, layout.factor) == (10, 8, 8)
    assert layout.cell_h >= MIN_CELL and layout.cell_w >= MIN_CELL
    # Nearest-neighbour: each cell is its sample with every pixel an f × f block, nothing smoothed.
    for i, (y, x) in enumerate(layout.origin(i) for i in range(80)):
        block = grid[y : y + layout.cell_h, x : x + layout.cell_w]
        assert np.array_equal(block, images[i].repeat(8, axis=0).repeat(8, axis=1))
    np.testing.assert_array_equal(cells(grid, layout, 80), images)

    # Gaps: background-coloured strips between rows and between columns, and a border around.
    cell_area = grid[:, layout.left - GAP :]
    for r in range(11):
        y = r * (layout.cell_h + GAP)
        assert (cell_area[y : y + GAP] == BACKGROUND).all()
    for c in range(9):
        x = layout.left - GAP + c * (layout.cell_w + GAP)
        assert (grid[:, x : x + GAP] == BACKGROUND).all()

    # Labels: ink in the margin of every row, and nothing else there.
    margin = grid[:, : layout.left - GAP]
    assert set(map(tuple, margin.reshape(-1, 3))) == {BACKGROUND, TEXT}
    for r in range(10):
        y = layout.origin(r * layout.columns)[0]
        assert (margin[y : y + layout.cell_h] == TEXT).all(axis=-1).any(), f"row {r} has no label"
    assert not np.array_equal(margin, grid_image(images, 10, row_labels(range(10, 20)))[:, : layout.left - GAP])


def test_grid_is_deterministic_and_saved_as_is(tmp_path):
    images = random_images(12, 8, 8)
    grid = save_grid(tmp_path / "sub" / "grid.png", images, rows=3, labels=["cat", "dog", "n01440764"])
    assert np.array_equal(grid, grid_image(images, 3, ["cat", "dog", "n01440764"]))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "grid.png")), grid)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]  # no partial file left


def test_without_labels_the_margin_is_one_gap():
    grid = grid_image(random_images(6, 8, 8), rows=2)
    assert grid_layout(6, 8, 8, rows=2).left == GAP
    assert grid.shape == (GAP + 2 * (64 + GAP), GAP + 3 * (64 + GAP), 3)


@pytest.mark.parametrize(("size", "factor"), [(8, 8), (28, 3), (32, 2), (64, 1), (256, 1)])
def test_enlargement_is_the_smallest_integer_reaching_the_minimum(size, factor):
    layout = grid_layout(4, size, size, rows=2)
    assert layout.factor == factor and layout.cell_h == size * factor >= MIN_CELL


def test_gray_samples_look_like_their_rgb_copies():
    gray = random_images(6, 8, 8, c=1)
    assert np.array_equal(grid_image(gray, 2, ["a", "b"]), grid_image(gray.repeat(3, axis=-1), 2, ["a", "b"]))


def test_long_and_non_latin_labels_fit_their_row():
    prompt = "a photograph of an astronaut riding a horse on the moon, highly detailed, 35 mm " * 3
    layout = grid_layout(2, 8, 8, rows=2, labels=[prompt, "猫 cat"])
    grid = grid_image(random_images(2, 8, 8), rows=2, labels=[prompt, "猫 cat"])
    ink = (grid[:, : layout.left - GAP] == TEXT).all(axis=-1)
    rows = np.nonzero(ink.any(axis=1))[0]
    assert rows.min() >= GAP and rows.max() < layout.shape[0] - GAP  # labels stay inside the rows
    assert layout.left < 400  # wrapped, not one line as wide as the prompt


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="3 labels for 2 rows"):
        grid_image(random_images(4, 8, 8), 2, ["a", "b", "c"])
    with pytest.raises(ValueError, match="uint8"):
        grid_image(random_images(4, 8, 8).astype(np.float32), 2)


def test_row_labels_add_names_that_say_more_than_the_id():
    assert row_labels([0, 3]) == ["0", "3"]
    assert row_labels([0, 3], [str(i) for i in range(10)]) == ["0", "3"]
    assert row_labels([0, 1], ["tench", "goldfish"]) == ["0 tench", "1 goldfish"]


@pytest.fixture(scope="module")
def tiny_vae_codec(tmp_path_factory) -> AutoencoderKLCodec:
    """A 4-channel AutoencoderKL built from a config (downsampling 2), loaded as the codec loads a hub one."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return AutoencoderKLCodec(str(path))


def test_one_three_and_four_channel_codecs_give_the_same_layout(tiny_vae_codec):
    """8 × 8 samples decoded from 1-channel and 3-channel pixel latents and 4-channel VAE latents (4 × 4)."""
    generator = torch.Generator().manual_seed(0)
    latents = {
        "pixel-1": (PixelCodec(), torch.rand(20, 1, 8, 8, generator=generator) * 2 - 1),
        "pixel-3": (PixelCodec(), torch.rand(20, 3, 8, 8, generator=generator) * 2 - 1),
        "vae-4": (tiny_vae_codec, torch.randn(20, 4, 4, 4, generator=generator)),
    }
    labels = row_labels(range(4), ["0", "1", "bird", "cat"])
    grids = {}
    for name, (codec, z) in latents.items():
        images = codec.decode(z).permute(0, 2, 3, 1).numpy()  # (N, 8, 8, C) uint8
        assert images.shape[1:3] == (8, 8), name
        grids[name] = grid_image(images, rows=4, labels=labels)
        np.testing.assert_array_equal(
            cells(grids[name], grid_layout(20, 8, 8, 4, labels), 20), np.broadcast_to(images, (20, 8, 8, 3))
        )
    layout = grid_layout(20, 8, 8, 4, labels)
    outside = ~cell_mask(layout, 20)
    first = grids["pixel-1"]
    for name, grid in grids.items():
        assert grid.shape == first.shape, name
        assert np.array_equal(grid[outside], first[outside]), name  # same gaps, margin and labels


def write_metrics(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))


def test_training_curves_survive_resumes_and_a_partial_last_line(tmp_path):
    records = [{"step": s, "loss": 1 / s, **{f"loss_q{q}": (4 - q) / s for q in range(4)}} for s in (20, 40, 60)]
    resumed = [{"step": s, "loss": 2 / s, "loss_q0": 4 / s, "loss_q3": 1 / s} for s in (40, 60, 80)]
    fid = [{"step": 40, "fid": 80.0, "eval_time_s": 3.0}, {"step": 40, "fid": 70.0}, {"step": 80, "fid": 60.0}]
    lines = [*records[:2], fid[0], records[2], resumed[0], fid[1], *resumed[1:], fid[2], '{"step": 100, "lo']
    write_metrics(tmp_path / "metrics.jsonl", lines)

    written = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "loss_by_timestep.png", "fid.png"]
    for path in written:
        assert Image.open(path).size == (720, 480)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in written)

    steps, loss = metric_series(read_metrics(tmp_path / "metrics.jsonl"), "loss")
    assert steps == [20, 40, 60, 80] and loss == [1 / 20, 2 / 40, 2 / 60, 2 / 80]  # the resumed run replaces
    assert metric_series(read_metrics(tmp_path / "metrics.jsonl"), "loss_q1")[0] == [20]  # not 40, 60
    assert metric_series(read_metrics(tmp_path / "metrics.jsonl"), "fid") == ([40, 80], [70.0, 60.0])


def test_training_curves_without_data_write_nothing(tmp_path):
    assert plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "plots") == []
    write_metrics(tmp_path / "empty.jsonl", [])
    assert plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "plots") == []
    write_metrics(tmp_path / "partial.jsonl", ['{"step": 20, "lo'])
    assert plot_training_curves(tmp_path / "partial.jsonl", tmp_path / "plots") == []
    write_metrics(tmp_path / "loss.jsonl", [{"step": 20, "loss": 0.5}, {"step": 40, "loss": None}, "[1, 2]\n"])
    assert [p.name for p in plot_training_curves(tmp_path / "loss.jsonl", tmp_path / "plots")] == ["loss.png"]


def test_styled_figure_saves_reproducibly_and_only_on_success(tmp_path):
    for out in ("a", "b"):
        with styled_figure(tmp_path / out / "sweep", suffixes=("png", "svg")) as figure:
            figure.subplots().plot([0, 1, 2], [30.0, 20.0, 25.0], "o-")
    assert (tmp_path / "a" / "sweep.svg").read_bytes() == (tmp_path / "b" / "sweep.svg").read_bytes()
    assert (tmp_path / "a" / "sweep.png").read_bytes() == (tmp_path / "b" / "sweep.png").read_bytes()
    with pytest.raises(RuntimeError), styled_figure(tmp_path / "c" / "sweep") as figure:
        raise RuntimeError("failed while plotting")
    assert list((tmp_path / "c").iterdir()) == []
