"""Where a result came from: the versions of the libraries and the MPI library, JAX's
backend and device, and the package's git commit, as an analysis file's root
attributes (:func:`attributes`)."""

from __future__ import annotations

import os


def _package_versions() -> dict[str, str]:
    """Root attributes ``version_<package>`` of the libraries that shaped the result;
    one that cannot be found is left out."""
    from importlib import metadata

    found = {}
    for name in ("jax", "jaxlib", "numpy", "scipy", "h5py", "mpi4py"):
        try:
            found[f"version_{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def git_commit(root: str | os.PathLike[str] | None = None) -> str | None:
    """The commit checked out where the package's source lies (``root``: the folder
    above ``mpda_dist``), read from ``.git`` directly (no ``git`` process: forking an
    MPI rank is not safe everywhere); None when it is not a git checkout (an installed
    package) or the files cannot be read.  Uncommitted changes are not seen."""
    from pathlib import Path

    top = Path(__file__).resolve().parents[1] if root is None else Path(root)

    def sha(text: str) -> str | None:
        text = text.strip()
        ok = len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)
        return text if ok else None

    try:
        dot = top / ".git"
        if dot.is_file():  # a worktree or a submodule: "gitdir: PATH"
            text = dot.read_text().strip()
            if not text.startswith("gitdir:"):
                return None
            gitdir = (top / text[len("gitdir:") :].strip()).resolve()
        elif dot.is_dir():
            gitdir = dot
        else:
            return None
        head = (gitdir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return sha(head)  # a detached HEAD
        ref = head[len("ref:") :].strip()
        common = gitdir
        if (gitdir / "commondir").is_file():
            common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
        for base in (gitdir, common):
            if (base / ref).is_file():
                return sha((base / ref).read_text())
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return sha(parts[0])
    except (OSError, UnicodeDecodeError):
        return None
    return None


def one_line(text: str) -> str:
    """The first line of a library's version text, its runs of blanks made one space and
    without NULs: Open MPI's ends in one, and HDF5's strings cannot hold it (an H200's
    ``mpda run`` failed to write its output, benchmarks/RESULTS.md §30)."""
    lines = text.replace("\x00", "").strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


def attributes() -> dict[str, str]:
    """Rank 0: root attributes on the software and hardware that made the result:
    library versions, the MPI library, JAX's backend and device kind (rank 0's), its
    ``XLA_FLAGS`` when set, and the package's git commit where it is a checkout."""
    import jax

    attrs = _package_versions()
    try:
        from mpi4py import MPI

        attrs["mpi_library"] = one_line(MPI.Get_library_version())
    except Exception:  # noqa: BLE001 - a version string is not worth failing a run for
        pass
    try:
        attrs["jax_backend"] = jax.default_backend()
        attrs["jax_device_kind"] = jax.local_devices()[0].device_kind
    except Exception:  # noqa: BLE001
        pass
    # XLA's options as rank 0 compiled with them, those mpda added included
    # (runtime.configure_jax_env): they change the programs, not the answer's definition.
    flags = os.environ.get("XLA_FLAGS", "").strip()
    if flags:
        attrs["xla_flags"] = flags
    commit = git_commit()
    if commit is not None:
        attrs["git_commit"] = commit
    return attrs
