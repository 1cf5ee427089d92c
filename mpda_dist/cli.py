"""The ``mpda`` command.

Heavy imports (JAX, mpi4py, the solver) happen inside the subcommands, so ``mpda
--help`` and argument errors answer at once, on every rank.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from importlib import metadata
from typing import NoReturn

__all__ = ["build_parser", "main"]

_EPILOG = """\
examples:
  mpda run                                        # the bundled 256x256 demo
  mpiexec -n 4 mpda run configs/demo.yaml -o out.h5 --set solver.dtype=float64
  mpda simulate configs/small.yaml -o problem.h5  # synthetic truth + observations
  mpda run configs/small.yaml --set observations.file=problem.h5
  mpda config configs/demo.yaml --set grid.nx=512 # print the effective config
  mpda run configs/global.yaml -o global.h5 && mpda plot global.h5 -o map.png

Under Slurm: srun --mpi=pmi2 mpda run CONFIG (or mpiexec -n $SLURM_NTASKS mpda run CONFIG);
plain srun without --mpi=pmi2 starts independent copies and is refused.
"""

_SET_HELP = (
    "override one config value, as section.key=value (value read as YAML: "
    "--set solver.tol=1e-6, --set grid.extent=[2.0,1.0], --set solver.multigrid.enabled=false); "
    "repeat for several, later ones win"
)


def _wrap(text: str) -> str:
    # RawDescriptionHelpFormatter keeps the examples' layout but would not wrap prose.
    return textwrap.fill(text, width=88)


def _version() -> str:
    try:
        return metadata.version("mpda_dist")
    except metadata.PackageNotFoundError:  # running from a source tree, not installed
        return "unknown (not installed)"


def _file_name(text: str) -> str:
    """An ``-o`` value: a file name, not empty (an empty one silently meant the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty file name")
    return text


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=_SET_HELP,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mpda`` (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="mpda",
        description=_wrap(
            "Distributed data assimilation: the posterior (analysis) mean of a 2-D field "
            "by Gaussian message passing, split across MPI ranks. Run the same command "
            "under mpiexec/srun to use several ranks."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="solve for the analysis and write it to HDF5",
        description=_wrap(
            "Solve for the analysis mean and write /analysis/mean, /grid/{x,y}, "
            "/observations, /background (and /truth for synthetic problems) to HDF5, "
            "atomically. Without CONFIG the bundled demo runs."
        ),
        epilog=(
            "examples:\n"
            "  mpda run\n"
            "  mpiexec -n 4 mpda run configs/demo.yaml -o out.h5 --set solver.dtype=float64\n"
            "  mpiexec -n 2 mpda run configs/small.yaml --set decomposition.process_grid=[2,1]\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "config",
        nargs="?",
        default=None,
        metavar="CONFIG",
        help="YAML config file (default: the bundled demo, 256x256 synthetic)",
    )
    run.add_argument(
        "-o",
        "--output",
        default=None,
        type=_file_name,
        metavar="OUT.h5",
        help="output HDF5 file (default: output.file from the config)",
    )
    _add_set(run)
    run.add_argument(
        "--resume",
        default=None,
        metavar="CKPT",
        help="continue from a checkpoint written by an interrupted run",
    )

    sim = sub.add_parser(
        "simulate",
        help="draw a synthetic truth and observations into a problem file",
        description=_wrap(
            "Draw an exact prior sample as the truth and observe it as the config's "
            "observations.synthetic says. The file holds /truth, /background, /grid and "
            "the observation datasets x, y, value, noise at its root, so it can be given "
            "to 'mpda run' as observations.file."
        ),
        epilog="example:\n  mpda simulate configs/small.yaml -o problem.h5 --set grid.nx=128\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument("config", metavar="CONFIG", help="YAML config file")
    sim.add_argument(
        "-o",
        "--output",
        required=True,
        type=_file_name,
        metavar="PROBLEM.h5",
        help="problem file to write",
    )
    _add_set(sim)

    pl = sub.add_parser(
        "plot",
        help="draw maps of an analysis file (analysis, truth, increment, error)",
        description=_wrap(
            "Draw the analysis mean with the used observation locations, the truth when "
            "the file has one, the increment (analysis - background) and the error "
            "(analysis - truth) into one image (matplotlib, no display needed)."
        ),
        epilog="example:\n  mpda plot global.h5 -o map.png\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pl.add_argument("file", metavar="OUT.h5", help="an analysis file written by 'mpda run'")
    pl.add_argument(
        "-o",
        "--output",
        default="map.png",
        type=_file_name,
        metavar="MAP.png",
        help="image to write (map.png)",
    )
    pl.add_argument("--dpi", type=int, default=120, help="resolution of the image (120)")

    show = sub.add_parser(
        "config",
        help="validate a config and print the effective values as YAML",
        description=_wrap(
            "Read CONFIG (default: the bundled demo), apply --set overrides, check every "
            "value and print the full effective config. Exits 2 on an invalid config."
        ),
    )
    show.add_argument("config", nargs="?", default=None, metavar="CONFIG")
    _add_set(show)
    return parser


def _show_config(config: str | None, overrides: Sequence[str]) -> int:
    from mpda_dist.config import ConfigError, dump_config, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        print(f"mpda: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_config(cfg))
    return 0


def _plot(path: str, output: str, dpi: int) -> int:
    from mpda_dist.plot import PlotError, plot

    try:
        written = plot(path, output, dpi)
    except PlotError as exc:
        print(f"mpda: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``mpda`` console script; exits with the command's status.
    Ctrl-C at any point (the imports of the first seconds included) is one line and
    exit 130 (:func:`runtime.end_interrupted`), not a traceback."""
    try:
        _main(argv)
    except KeyboardInterrupt:
        from mpda_dist import runtime

        runtime.end_interrupted()
        raise  # (it does not return)


def _main(argv: Sequence[str] | None) -> NoReturn:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "simulate"):
        # Threads and JAX's environment before anything imports numpy or JAX (the
        # driver does): OpenBLAS reads its thread count when numpy loads.
        from mpda_dist import runtime

        runtime.start_checked(catch_signals=args.command == "run")
    if args.command == "run":
        from mpda_dist.driver import run_from_cli

        sys.exit(run_from_cli(args.config, args.output, args.overrides, resume=args.resume))
    if args.command == "simulate":
        from mpda_dist.driver import simulate_from_cli

        sys.exit(simulate_from_cli(args.config, args.output, args.overrides))
    if args.command == "plot":
        sys.exit(_plot(args.file, args.output, args.dpi))
    sys.exit(_show_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
