"""Pictures for people: labelled sample grids and training-curve plots (issue 19).

Every grid that is saved or logged goes through `grid_image`: cells separated by background-coloured
gaps, samples enlarged by an integer nearest-neighbour factor (no smoothing: the pixels are the data)
so that a cell is at least MIN_CELL px on a side, and a label per row in a left margin, drawn with
PIL's bitmap font so that the output is the same bytes on every machine. The raw samples are kept
elsewhere (.npz); a grid is only for looking at.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data.storage import atomic_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MIN_CELL = 64  # px: an 8 px digit is unreadable on a screen
GAP = 4  # px between cells and around the grid
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
TEXT_SCALE = 2  # the bitmap font is 11 px tall: doubled next to cells of 64 px and more
LABEL_CHARS = 24  # per line; longer labels (prompts) wrap onto the lines the row has room for

# Shared by every plot of the project (training curves, launch.evaluate's CFG sweep).
PLOT_STYLE = {
    "figure.figsize": (6.0, 4.0),
    "figure.constrained_layout.use": True,
    "savefig.dpi": 120,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "lines.linewidth": 1.2,
    "svg.fonttype": "none",  # SVG text stays text: the numbers can be read back
    "svg.hashsalt": "diffusion-dist",  # fixed SVG ids: the same data gives the same file
}


class GridLayout(NamedTuple):
    """Where `grid_image` puts the cells, in pixels; cells fill the grid row by row."""

    rows: int
    columns: int
    factor: int  # the nearest-neighbour enlargement of each sample
    cell_h: int
    cell_w: int
    left: int  # x of the first column: the label margin (or one gap without labels)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the whole grid."""
        return GAP + self.rows * (self.cell_h + GAP), self.left + self.columns * (self.cell_w + GAP)

    def origin(self, i: int) -> tuple[int, int]:
        """(y, x) of the top-left pixel of cell i."""
        row, column = divmod(i, self.columns)
        return GAP + row * (self.cell_h + GAP), self.left + column * (self.cell_w + GAP)


def _font() -> ImageFont.ImageFont:
    # The bitmap font renders identically everywhere; since Pillow 10.1 load_default() is a
    # FreeType font whose antialiased pixels depend on the FreeType version.
    if hasattr(ImageFont, "load_default_imagefont"):
        return ImageFont.load_default_imagefont()
    return ImageFont.load_default()


def _label_masks(labels: Sequence[str], cell_h: int) -> list[np.ndarray]:
    """Each label as a boolean (h, w) mask of its ink, enlarged TEXT_SCALE times, at most cell_h tall.

    A label is wrapped to LABEL_CHARS a line and cut to the lines the row has room for; characters
    outside Latin-1 (the bitmap font's range) become '?'.
    """
    font = _font()
    line_h = font.getbbox("A")[3]
    room = max(1, cell_h // (line_h * TEXT_SCALE))
    masks = []
    for label in labels:
        lines = textwrap.wrap(label.encode("latin-1", "replace").decode("latin-1"), LABEL_CHARS) or [""]
        if len(lines) > room:
            lines = lines[:room]
            lines[-1] = lines[-1][: LABEL_CHARS - 3] + "..."
        text = Image.new("L", (max(1, *(font.getbbox(line)[2] for line in lines)), line_h * len(lines)))
        draw = ImageDraw.Draw(text)
        for k, line in enumerate(lines):
            draw.text((0, k * line_h), line, fill=255, font=font)
        masks.append(np.asarray(text).repeat(TEXT_SCALE, axis=0).repeat(TEXT_SCALE, axis=1) > 0)
    return masks


def grid_layout(count: int, height: int, width: int, rows: int, labels: Sequence[str] | None = None) -> GridLayout:
    """The layout of `count` samples of height × width px in `rows` rows, with these row labels."""
    if count < 1 or rows < 1:
        raise ValueError(f"a grid needs samples and rows, got {count} samples in {rows} rows")
    if labels is not None and len(labels) != rows:
        raise ValueError(f"{len(labels)} labels for {rows} rows")
    factor = math.ceil(MIN_CELL / min(height, width))
    left = GAP
    if labels:
        left = max(mask.shape[1] for mask in _label_masks(labels, height * factor)) + 2 * GAP
    return GridLayout(rows, -(-count // rows), factor, height * factor, width * factor, left)


def grid_image(images: np.ndarray, rows: int, labels: Sequence[str] | None = None) -> np.ndarray:
    """uint8 (N, H, W, C), C = 1 or 3 -> one uint8 RGB image: `rows` rows filled in order, labels on the left."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"grid_image takes uint8 (N, H, W, 1 or 3) images, got {images.dtype}{list(images.shape)}")
    n, h, w, _ = images.shape
    layout = grid_layout(n, h, w, rows, labels)
    grid = np.empty((*layout.shape, 3), dtype=np.uint8)
    grid[:] = BACKGROUND
    # (N, H·f, W·f, 3): each pixel becomes an f × f block; gray samples are repeated over RGB.
    cells = images.repeat(layout.factor, axis=1).repeat(layout.factor, axis=2)
    for i, cell in enumerate(cells):
        y, x = layout.origin(i)
        grid[y : y + layout.cell_h, x : x + layout.cell_w] = cell
    if labels:
        for row, mask in enumerate(_label_masks(labels, layout.cell_h)):
            y = layout.origin(row * layout.columns)[0] + (layout.cell_h - mask.shape[0]) // 2  # centred on the row
            grid[y : y + mask.shape[0], GAP : GAP + mask.shape[1]][mask] = TEXT
    return grid


def row_labels(classes: Sequence[int], class_names: Sequence[str] | None = None) -> list[str]:
    """One label per class row: the id, followed by the dataset's class name when it says more than the id."""
    labels = []
    for c in classes:
        name = class_names[c] if class_names and 0 <= c < len(class_names) else None
        labels.append(f"{c} {name}" if name is not None and name != str(c) else str(c))
    return labels


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a uint8 image as PNG atomically (a reader never sees half a file); returns the path."""
    with atomic_file(path) as temporary:
        Image.fromarray(image).save(temporary, format="PNG")
    return Path(path)


def save_grid(path: str | Path, images: np.ndarray, rows: int, labels: Sequence[str] | None = None) -> np.ndarray:
    """`grid_image` of these samples written to `path` as PNG; returns the grid (for MLflow)."""
    grid = grid_image(images, rows, labels)
    save_png(path, grid)
    return grid


@contextmanager
def styled_figure(path: str | Path, suffixes: Sequence[str] = ("png",)) -> Iterator[Figure]:
    """A matplotlib Figure in PLOT_STYLE, saved to path.<suffix> for each suffix (atomically) when the block ends.

    Drawn with the Agg canvas and no pyplot: no display, no global figure list, nothing to close.
    """
    # Imported here: matplotlib costs a second at import, and most users of this module only write grids.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(PLOT_STYLE):
        figure = Figure()
        FigureCanvasAgg(figure)
        yield figure
        for suffix in suffixes:
            target = path.with_name(f"{path.name}.{suffix}")
            # No creation date in the file: the same curves give the same bytes.
            metadata = {"Date": None} if suffix in ("svg", "pdf") else {}
            with atomic_file(target) as temporary:
                figure.savefig(temporary, format=suffix, metadata=metadata)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl that the run's latest attempt stands by, in order.

    Lines that are not whole JSON objects with a step (a run killed mid-write) are skipped. A
    training record (or FID record) at or before the previous one of its kind means a resumed run
    logs again from its checkpoint: every record from that step on is replaced.
    """
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    last: dict[bool, int] = {}  # the newest step of each kind (FID or not)
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        kind, step = "fid" in record, record["step"]
        if step <= last.get(kind, -1):
            records = [r for r in records if r["step"] < step]
            last = {"fid" in r: r["step"] for r in records}
        records.append(record)
        last[kind] = step
    return records


def metric_series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that have a number for it."""
    values = [(r["step"], r.get(key)) for r in records]
    points = [(s, float(v)) for s, v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return [s for s, _ in points], [v for _, v in points]


def _log_scale_over_a_decade(axis: Any, *series: list[float]) -> None:
    """Losses fall by decades early in a run: a log axis when the positive values span one at least."""
    values = [v for s in series for v in s if math.isfinite(v)]
    if values and min(values) > 0 and max(values) >= 10 * min(values):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        axis.set_yscale("log")
        # Ticks at 1, 2, 5 × 10^k written as plain numbers (0.05, not 5 × 10⁻²): at least three in a decade.
        axis.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.yaxis.set_minor_formatter(NullFormatter())


def plot_training_curves(metrics_jsonl: str | Path, out_dir: str | Path) -> list[Path]:
    """loss.png, loss_by_timestep.png and (when measured) fid.png from a run's metrics.jsonl; returns those written.

    Plots without data are not written (an empty or missing file writes nothing).
    """
    records = read_metrics(metrics_jsonl)
    out_dir = Path(out_dir)
    written = []

    steps, loss = metric_series(records, "loss")
    if steps:
        with styled_figure(out_dir / "loss") as figure:
            axis = figure.subplots()
            axis.plot(steps, loss, color="tab:blue")
            axis.set(xlabel="step", ylabel="loss", title=f"training loss (last {loss[-1]:.4g} at step {steps[-1]})")
            _log_scale_over_a_decade(axis, loss)
        written.append(out_dir / "loss.png")

    quartiles = [metric_series(records, f"loss_q{q}") for q in range(4)]
    if any(s for s, _ in quartiles):
        with styled_figure(out_dir / "loss_by_timestep") as figure:
            axis = figure.subplots()
            names = ("t < T/4", "T/4 ≤ t < T/2", "T/2 ≤ t < 3T/4", "3T/4 ≤ t")
            colors = ("#440154", "#31688e", "#35b779", "#b5a300")  # viridis: low t dark, high t light
            for (s, v), name, color in zip(quartiles, names, colors, strict=True):
                if s:
                    axis.plot(s, v, color=color, label=name)
            axis.set(xlabel="step", ylabel="loss", title="training loss by timestep quartile")
            axis.legend(loc="best")
            _log_scale_over_a_decade(axis, *(v for _, v in quartiles))
        written.append(out_dir / "loss_by_timestep.png")

    steps, fid = metric_series(records, "fid")
    if steps:
        with styled_figure(out_dir / "fid") as figure:
            axis = figure.subplots()
            axis.plot(steps, fid, "o-", color="tab:blue")
            best = min(range(len(fid)), key=lambda i: fid[i] if math.isfinite(fid[i]) else math.inf)
            axis.set(
                xlabel="step",
                ylabel="FID (lower is better)",
                title=f"FID of the EMA weights (best {fid[best]:.2f} at step {steps[best]})",
            )
        written.append(out_dir / "fid.png")
    return written
