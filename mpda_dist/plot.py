"""``mpda plot OUT.h5 -o map.png``: maps of an analysis file (matplotlib, Agg).

Panels: the analysis mean, the truth (when the file has one), the increment
``mean − background`` and the error ``mean − truth`` (when there is a truth), with the
used observation locations overlaid on the analysis.  Axes are the file's ``/grid/x``
and ``/grid/y``: longitude and latitude in degrees for a global run (``/grid/x`` in
``degrees_east``), where the observations' longitudes, which may follow any convention,
are drawn wrapped into the grid's longitudes.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


class PlotError(ValueError):
    """The file cannot be plotted; the message names it."""


def _read(path: str) -> dict[str, Any]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "analysis/mean" not in f:
                raise PlotError(f"{path}: no /analysis/mean; is this an 'mpda run' output?")
            out: dict[str, Any] = {
                "mean": f["analysis/mean"][()],
                "x": f["grid/x"][()],
                "lonlat": _units(f["grid/x"]) == "degrees_east",
                "y": f["grid/y"][()],
                "background": f["background"][()] if "background" in f else None,
                "truth": f["truth"][()] if "truth" in f else None,
                "attrs": dict(f.attrs),
            }
            if "observations/x" in f:
                used = f["observations/used"][()] if "observations/used" in f else None
                ox, oy = f["observations/x"][()], f["observations/y"][()]
                keep = used.astype(bool) if used is not None else np.ones(ox.shape, bool)
                ox, oy = ox[keep], oy[keep]
                if out["lonlat"]:
                    ox = wrap_longitudes(ox, out["x"])
                out["obs"] = (ox, oy)
            return out
    except OSError as exc:
        raise PlotError(f"{path}: cannot read ({exc})") from None
    except (KeyError, TypeError, ValueError) as exc:  # a group for a dataset, no /grid, ...
        if isinstance(exc, PlotError):
            raise
        raise PlotError(f"{path}: not laid out as an 'mpda run' output ({exc})") from None


def _units(ds: Any) -> str:
    units = ds.attrs.get("units", "")
    return units.decode() if isinstance(units, bytes) else str(units)


def wrap_longitudes(lon: np.ndarray, grid_lon: np.ndarray) -> np.ndarray:
    """``lon`` (degrees, any convention) moved by whole turns into the span the map
    draws for the grid's longitudes ``grid_lon`` (``i·360/nx`` in an ``mpda run``
    output): ``[grid_lon[0] − Δ/2, grid_lon[0] − Δ/2 + 360)``, ``Δ`` the spacing, so
    every point lies on a drawn cell (``pcolormesh`` with nearest shading)."""
    half = (grid_lon[1] - grid_lon[0]) / 2 if grid_lon.size > 1 else 0.0
    start = grid_lon[0] - half
    return start + np.mod(np.asarray(lon, dtype=np.float64) - start, 360.0)


def _check_output(output: str, dpi: int) -> None:
    """The image can be written: a known format (by suffix), a positive resolution, a
    writable directory."""
    from matplotlib.backend_bases import FigureCanvasBase

    from mpda_dist import io

    if not dpi > 0:
        raise PlotError(f"--dpi {dpi}: must be a positive number")
    suffix = os.path.splitext(output)[1].lstrip(".").lower()
    kinds = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in kinds:
        raise PlotError(f"{output}: unknown image format '.{suffix}' (one of: {', '.join(kinds)})")
    try:
        io.check_writable(output)
    except io.InputError as exc:
        raise PlotError(str(exc)) from None


def plot(path: str, output: str, dpi: int = 120) -> str:
    """Write the maps of analysis file ``path`` to ``output`` (PNG, PDF, ... by suffix;
    without one, ``.png`` is added, as matplotlib would).  Returns the file written."""
    if not os.path.splitext(output)[1].lstrip("."):
        output = output.rstrip(".") + ".png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _check_output(output, dpi)
    fig = figure(path)
    try:
        fig.savefig(output, dpi=dpi)
    except MemoryError:
        raise PlotError(f"{output}: too large to draw at --dpi {dpi}") from None
    finally:
        plt.close(fig)
    return output


def figure(path: str) -> Any:
    """The maps of analysis file ``path`` as a matplotlib Figure (not saved; the caller
    closes it with ``matplotlib.pyplot.close``).  The first axes are the analysis mean,
    with the used observations as its only scatter collection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = _read(path)
    mean, x, y = d["mean"], d["x"], d["y"]
    panels: list[tuple[str, np.ndarray, str]] = [("analysis mean", mean, "viridis")]
    if d["truth"] is not None:
        panels.append(("truth", d["truth"], "viridis"))
    if d["background"] is not None:
        panels.append(("increment (analysis − background)", mean - d["background"], "RdBu_r"))
    if d["truth"] is not None:
        panels.append(("error (analysis − truth)", mean - d["truth"], "RdBu_r"))
    ncol = 2 if len(panels) > 1 else 1
    nrow = (len(panels) + ncol - 1) // ncol
    aspect = (y[-1] - y[0]) / max(x[-1] - x[0], 1e-300)
    fig, axes = plt.subplots(
        nrow,
        ncol,
        figsize=(6.0 * ncol, 6.0 * nrow * min(max(aspect, 0.3), 1.5) + 0.6),
        squeeze=False,
    )
    shared = None
    if d["truth"] is not None:  # the same colour scale for analysis and truth
        shared = (min(mean.min(), d["truth"].min()), max(mean.max(), d["truth"].max()))
    for ax, (title, field, cmap) in zip(axes.ravel(), panels, strict=False):
        if cmap == "RdBu_r":
            lim = float(np.max(np.abs(field))) or 1.0
            vmin, vmax = -lim, lim
        else:
            vmin, vmax = shared if shared else (field.min(), field.max())
        im = ax.pcolormesh(x, y, field, cmap=cmap, vmin=vmin, vmax=vmax, shading="nearest")
        fig.colorbar(im, ax=ax, shrink=0.85)
        ax.set_title(title)
        ax.set_aspect("equal" if 0.2 < aspect < 5 else "auto")
        if title == "analysis mean" and "obs" in d:
            ox, oy = d["obs"]
            ax.scatter(ox, oy, s=1.0, c="k", alpha=0.5, linewidths=0)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    attrs = d["attrs"]
    sub = os.path.basename(path)
    if "rmse_analysis" in attrs:
        ra, rb = attrs["rmse_analysis"], attrs["rmse_background"]
        sub += f": RMSE analysis {ra:.4g}, background {rb:.4g}"
    fig.suptitle(sub)
    fig.tight_layout()
    return fig
