"""Observation-space diagnostics of an analysis (DESIGN §6).

Per observation: ``H f_b`` and ``H μ`` (the background and the analysis mean seen
through the observation operator the analysis used, ``observations.operator``: at the
nearest node, or interpolated bilinearly in the grid cell holding the observation,
periodic in longitude on the sphere).  Summary over the observations used (flag
``ok``; a merged duplicate group counts once, with its merged value and noise), with
departures ``O−B = y − H f_b`` and ``O−A = y − H μ``:

- ``omb_bias``, ``omb_rmse``, ``oma_bias``, ``oma_rmse`` (field units);
- ``jo_over_n = Σ ((y − H μ)/σ)² / n``.  Its expectation is ``1 − tr(HK)/n``: below 1
  by the share of the data the analysis fits (close to 0 with dense, precise data);
- ``desroziers_ratio = Σ (y − H μ)(y − H f_b)/σ² / n``.  Its expectation is exactly 1
  when the observation errors and the prior are right (Desroziers et al. 2005,
  ``E[(O−A)(O−B)ᵀ] = R``): well above 1 means σ (or the prior amplitude) is too small.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mpda_dist.observations import apply_bilinear, bilinear_nodes
from mpda_dist.qc import QCReport, flag_attrs

__all__ = ["column_attrs", "observation_diagnostics", "summary_line"]


def observation_diagnostics(
    report: QCReport, mean: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, float | int]]:
    """Per-observation columns and summary statistics.

    ``mean`` is the analysis on the whole grid ``(ny, nx)``, y first; ``H`` is the
    observation operator of quality control and of the analysis (``report.operator``:
    ``nearest`` or ``bilinear``), and ``report.hfb`` already ``H f_b``.  Returns
    ``columns`` (``hfb``, ``hmu``: float64 ``(n,)``, NaN where the location is invalid)
    and ``summary`` (``n_used`` and the statistics of the module docstring; NaN when
    nothing was used).
    """
    located = report.iy >= 0
    hfb = report.hfb
    hmu = np.full(len(report.flag), np.nan)
    if report.operator == "bilinear":
        obs = report.obs
        iy, ix, w = bilinear_nodes(
            obs.x[located],
            obs.y[located] - report.y0,
            mean.shape,
            report.extent,
            report.periodic_x,
        )
        hmu[located] = apply_bilinear(mean, iy, ix, w)
    else:
        hmu[located] = mean[report.iy[located], report.ix[located]]
    u = report.used
    y, sigma = report.value_used[u], report.noise_used[u]
    omb, oma = y - hfb[u], y - hmu[u]
    n = int(u.sum())

    def avg(a: np.ndarray) -> float:
        return float(np.mean(a)) if n else math.nan

    summary: dict[str, float | int] = {
        "n_used": n,
        "omb_bias": avg(omb),
        "omb_rmse": math.sqrt(avg(omb**2)),
        "oma_bias": avg(oma),
        "oma_rmse": math.sqrt(avg(oma**2)),
        "jo_over_n": avg((oma / sigma) ** 2),
        "desroziers_ratio": avg(oma * omb / sigma**2),
    }
    return {"hfb": hfb, "hmu": hmu}, summary


def summary_line(summary: dict[str, Any]) -> str:
    """The summary for the log, on one line."""
    return (
        f"{summary['n_used']} observations: O-B bias {summary['omb_bias']:.4g} "
        f"rmse {summary['omb_rmse']:.4g}; O-A bias {summary['oma_bias']:.4g} "
        f"rmse {summary['oma_rmse']:.4g}; Jo/n {summary['jo_over_n']:.4g}; "
        f"(O-A)(O-B)/sigma^2 per obs {summary['desroziers_ratio']:.4g} (~1 if R and the "
        "prior are right)"
    )


def column_attrs(operator: str = "nearest") -> dict[str, dict[str, Any]]:
    """CF attributes (``long_name``) of the per-observation output columns;
    ``operator`` as for :func:`observation_diagnostics`."""
    at = "at the nearest node" if operator == "nearest" else "interpolated bilinearly"
    return {
        "x": {"long_name": "observation x coordinate", "units": "1"},
        "y": {"long_name": "observation y coordinate", "units": "1"},
        "value": {"long_name": "observed value y, as read"},
        "noise": {
            "long_name": "observation error standard deviation sigma, as read "
            "(observations.noise instead when the config sets it)"
        },
        "flag": flag_attrs(),
        "used": {
            "long_name": "assimilated (1) or not (0)",
            "flag_values": np.array([0, 1], np.int8),
            "flag_meanings": "not_used used",
        },
        "duplicate_of": {"long_name": "row kept for this duplicate location (-1: none)"},
        "value_used": {
            "long_name": "value assimilated (merged for a duplicate group; NaN: not used)"
        },
        "noise_used": {
            "long_name": "sigma assimilated (merged for a duplicate group; NaN: not used)"
        },
        "hfb": {"long_name": f"background {at}, H f_b"},
        "hmu": {"long_name": f"analysis mean {at}, H mu"},
    }
