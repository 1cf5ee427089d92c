"""The multigrid hierarchy on one rank and its coarse-grid correction (DESIGN §2).

Every level lives on the same process grid: a coarse block holds the coarse nodes of
the fine block (:func:`multigrid.coarse_cuts`), so moving a field between levels needs
only the field frame of the block's neighbours.  The coarsest level is solved exactly:
its stencil is gathered on rank 0 once and factorised; each solve gathers the
right-hand side there and scatters the answer.

Message passing converges slowly on smooth errors (thousands of iterations per level
at 1 % observations).  The cure is the full-approximation scheme (FAS): at every
convergence check of a level, the mean ``x`` and residual ``r = h − Q x`` go down,
the coarser level iterates on ``Q_c u = Q_c x̂ + Pᵀ r`` (``x̂`` injected) from its
*warm* messages — the ones its own solve left, so no cold start — corrects itself
from the level below it in the same way, and sends ``e = P (u − x̂)`` back up.  The
fine level shifts its ``b`` messages as if each sender's cavity mean moved by ``e``
(:func:`kernel.messages_from_mean` of ``e``).  The fine fixed point is unchanged, so
the answer is still the exact posterior mean; only the iterations to it drop.

Coarse operators: the prior is re-discretised at the coarse spacing; observations
enter lumped, ``diag(Pᵀ (Q_obs 1))``.  The exact Galerkin term ``Pᵀ Q_obs P`` couples
the four coarse nodes around an observation with weights ``~1/σ_y²``: message passing
diverges on it (not walk-summable), the lumped diagonal keeps every level safe for it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpda_dist import kernel
from mpda_dist.decomposition import MIN_BLOCK, Decomposition
from mpda_dist.exchange import HaloExchange
from mpda_dist.halo import field_layout, message_layout
from mpda_dist.multigrid import AxisMap, Level, axis_map, coarse_cuts
from mpda_dist.observations import NodeObservations
from mpda_dist.programs import Programs, jit, on_device, subtract, zeros
from mpda_dist.stencil import build, observation_mass

Array = jax.Array
log = logging.getLogger("mpda_dist")
COARSE_WARN = 40_000  # unknowns on the coarsest level above which its factorisation is slow


@dataclass(frozen=True)
class Transfer:
    """Injection, restriction ``Pᵀ`` and prolongation ``P`` between one fine block and
    its coarse block (static indices per axis, ``y`` then ``x``).  The ``*_framed``
    attributes are the jitted forms that take a block and its flat frame."""

    y: AxisMap
    x: AxisMap

    def __post_init__(self) -> None:
        # The jitted transfers take their index arrays as arguments: host arrays would be
        # copied to the device at every call (a GPU's solve made hundreds of such copies).
        object.__setattr__(self, "dy", _on_device(self.y))
        object.__setattr__(self, "dx", _on_device(self.x))

    def inject(self, x: Array) -> Array:
        return _inject(x, self.y.inject, self.x.inject)

    def restrict(self, framed: Array) -> Array:
        """``Pᵀ r`` from the fine ``r`` with its 2-node frame."""
        return _restrict(framed, self.y.restrict, self.x.restrict)

    def prolong(self, framed: Array) -> Array:
        """``P e`` from the coarse ``e`` with its 2-node frame."""
        return _prolong(framed, self.y.prolong, self.y.weight, self.x.prolong, self.x.weight)

    # The same, jitted once per block shape for every hierarchy (the index arrays are
    # arguments, not constants): a block and its flat frame in.
    def restrict_framed(self, v: Array, frame: Array) -> Array:
        return _restrict_jit(v, frame, self.dy.restrict, self.dx.restrict)

    def prolong_framed(self, v: Array, frame: Array) -> Array:
        return _prolong_jit(v, frame, *self.prolong_maps())

    def prolong_maps(self) -> tuple[Array, Array, Array, Array]:
        y, x = self.dy, self.dx
        return y.prolong, y.weight, x.prolong, x.weight

    def inject_jit(self, x: Array) -> Array:
        return _inject_jit(x, self.dy.inject, self.dx.inject)

    def copy_up_masked(self, coarse: Array, weights: Array) -> Array:
        """Each fine node takes the (leading-axes) values of its first coarse parent,
        clamped to the coarse block, where ``weights`` is non-zero (else 0): a starting
        point for the ``a`` messages."""
        return _copy_up_jit(coarse, *self.parents(coarse.shape), weights)

    def parents(self, coarse_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        iy = np.clip(self.y.prolong[:, 0] - 2, 0, coarse_shape[-2] - 1)
        ix = np.clip(self.x.prolong[:, 0] - 2, 0, coarse_shape[-1] - 1)
        return iy, ix


def _on_device(m: AxisMap) -> AxisMap:
    return AxisMap(*(jax.device_put(getattr(m, f.name)) for f in dataclasses.fields(m)))


def _inject(x: Array, iy: Any, ix: Any) -> Array:
    return x[iy][:, ix]


def _restrict(f: Array, ry: Any, rx: Any) -> Array:
    t = f[ry[:, 0]] + 0.5 * (f[ry[:, 1]] + f[ry[:, 2]])
    return t[:, rx[:, 0]] + 0.5 * (t[:, rx[:, 1]] + t[:, rx[:, 2]])


def _prolong(f: Array, py: Any, wy: Any, px: Any, wx: Any) -> Array:
    wy, wx = jnp.asarray(wy, f.dtype), jnp.asarray(wx, f.dtype)
    t = f[py[:, 0]] * wy[:, :1] + f[py[:, 1]] * wy[:, 1:]
    return t[:, px[:, 0]] * wx[:, 0] + t[:, px[:, 1]] * wx[:, 1]


_inject_jit = jit(_inject)


@jit
def _copy_up_jit(c: Array, iy: Any, ix: Any, w: Array) -> Array:
    return c[..., iy, :][..., ix] * (w != 0)


@jit
def _restrict_jit(v: Array, frame: Array, ry: Any, rx: Any) -> Array:
    return _restrict(kernel.framed(v, frame, 2), ry, rx)


@jit
def _prolong_jit(v: Array, frame: Array, py: Any, wy: Any, px: Any, wx: Any) -> Array:
    return _prolong(kernel.framed(v, frame, 2), py, wy, px, wx)


def transfer(fine: Decomposition, coarse: Decomposition, level: Level) -> Transfer:
    (f0, f1), (g0, g1) = fine.extent
    (c0, c1), (d0, d1) = coarse.extent
    oy, ox = level.offsets
    return Transfer(axis_map((f0, f1), (c0, c1), oy), axis_map((g0, g1), (d0, d1), ox))


@dataclass
class Frames:
    """Synchronous 2-wide field frames for one block (a tag per level)."""

    decomp: Decomposition
    dtype: Any
    tag: int

    def __post_init__(self) -> None:
        self.ex = HaloExchange(self.decomp, field_layout(*self.decomp.shape), self.dtype, self.tag)
        self.edge = jax.device_put(self.ex.frame_edge())

    def of(self, x: Array) -> Array:
        """The frame of ``x`` (flat, as :func:`kernel.framed` takes it)."""
        if not self.decomp.has_neighbours:
            return self.edge
        return jax.device_put(self.ex.exchange(np.asarray(kernel.outgoing_frame(x))))

    def framed(self, x: Array) -> Array:
        return _framed(x, self.of(x))


class ExactCoarse:
    """The coarsest level: stencil gathered and factorised on rank 0 (float64), with the
    symmetric minimum-degree ordering (as :func:`baselines.exact_solve`): 30 against
    43 ms at 64², 164 against 292 ms at 128² on a 2-core CPU, factors a third smaller."""

    def __init__(self, decomp: Decomposition, op: kernel.Operator, periodic_x: bool) -> None:
        import scipy.sparse.linalg as spla

        from mpda_dist.baselines import assemble_periodic
        from mpda_dist.stencil import BlockStencil

        self.decomp = decomp
        d = decomp.gather(np.asarray(op.diag, np.float64))
        w = decomp.gather(np.asarray(op.weights, np.float64))
        self.lu = None
        if decomp.rank == 0:
            q = assemble_periodic(BlockStencil(d, w, np.zeros_like(d)), periodic_x)
            self.lu = spla.splu(q.tocsc(), permc_spec="MMD_AT_PLUS_A")
        self.seconds = 0.0

    def solve(self, rhs: Array) -> Array:
        t0 = time.perf_counter()
        whole = self.decomp.gather(np.asarray(rhs, np.float64))
        x = None
        if self.decomp.rank == 0:
            x = self.lu.solve(whole.ravel()).reshape(whole.shape)
        out = self.decomp.scatter(x, (), rhs.dtype)
        self.seconds += time.perf_counter() - t0
        return jax.device_put(out)


@dataclass
class Smoother:
    """A level's message-passing state and a synchronous loop for coarse visits."""

    decomp: Decomposition
    op: kernel.Operator  # ``rhs`` is the level's own right-hand side (restricted h)
    params: kernel.Params
    momentum: float
    dtype: Any
    tag: int
    a: Array | None = None
    b: Array | None = None
    bp: Array | None = None
    g: Array | None = None  # gains of the frozen a (kernel.gains), or None: coupled update
    iterations: int = 0  # run inside corrections
    programs: Programs = field(default_factory=Programs)  # shared with the level's solve
    chunk: int = 0  # iterations per call without neighbours (the level solve's; 0: all)

    def __post_init__(self) -> None:
        self.mex = HaloExchange(
            self.decomp, message_layout(*self.decomp.shape), self.dtype, self.tag
        )
        self.frames = Frames(self.decomp, self.dtype, self.tag + 20)
        self.edge = jax.device_put(self.mex.edge)

    def cavities(self, op: kernel.Operator) -> Array | np.ndarray:
        if not self.decomp.has_neighbours:
            return self.edge
        out = kernel.initial_cavities(self.a, self.b, op, self.params)
        return self.mex.exchange(np.asarray(out))  # a host array, as the solver's halos

    def smooth(self, n: int, op: kernel.Operator) -> None:
        """``n`` iterations on ``op`` (synchronous exchange every iteration, whatever
        ``exchange.every`` says: visits on lagged halos diverged at 1 % observations on
        four ranks, benchmarks/RESULTS.md §16)."""
        halo = self.cavities(op)
        nb = self.decomp.has_neighbours
        chunk = 1 if nb else (self.chunk or n)
        done = 0
        while done < n:
            k = min(chunk, n - done)
            fn, args = kernel.update_call(self.a, self.b, self.bp, self.g, op, halo, self.params, k)
            step = self.programs(fn, *args, n=k, momentum=self.momentum, delta=False, neighbours=nb)
            self.a, self.b, self.bp, out, _ = step(*args)
            done += k
            if nb and done < n:
                halo = self.mex.exchange(np.asarray(out))
        self.iterations += n

    def mean(self, op: kernel.Operator) -> Array:
        nb = self.decomp.has_neighbours
        return kernel.marginal_mean(self.a, self.b, op, self.params, neighbours=nb)[0]

    def shift(self, e: Array, op: kernel.Operator) -> None:
        """Move every sender's cavity mean by ``e`` (also in ``b_prev``, so the momentum
        term does not see the jump)."""
        self.b, self.bp = kernel.shift_messages(
            self.b, self.bp, e, self.frames.of(e), op, self.params.c
        )


class Hierarchy:
    """All levels on this rank, coarsest first; the last is the target grid.

    Built from the target level's decomposition: each coarser level's blocks follow
    the finer one's, until a block would have fewer than ``MIN_BLOCK`` nodes a side
    (then the hierarchy stops there, however many levels the schedule asked for).
    """

    def __init__(
        self,
        comm: Any,
        levels: list[Level],
        nodes: Any,
        lengthscale: float,
        amplitude: float,
        grid: tuple[int, int] | None,
        periodic: tuple[bool, bool],
        params: kernel.Params,
        momentum: float,
        dtype: Any,
        programs: Programs | None = None,
        prefetch: Callable[[Hierarchy], None] | None = None,
    ) -> None:
        """``prefetch(self)`` is called once the levels' shapes are known, before the
        operators are built (it may use :meth:`op_spec`, not :attr:`ops`), after the
        set-up's own restrictions are queued; without it nothing is compiled ahead (and
        no compile threads start in a :class:`Programs` of the hierarchy's own).

        The same in two steps: :meth:`laid_out` (the levels' blocks, and the prefetch:
        no observations needed), then :meth:`build`."""
        self._lay_out(comm, levels, grid, periodic, dtype, programs, prefetch)
        self.build(nodes, lengthscale, amplitude, params, momentum)

    @classmethod
    def laid_out(
        cls,
        comm: Any,
        levels: list[Level],
        grid: tuple[int, int] | None,
        periodic: tuple[bool, bool],
        dtype: Any,
        programs: Programs | None = None,
        prefetch: Callable[[Hierarchy], None] | None = None,
    ) -> Hierarchy:
        """The hierarchy's levels and blocks, with ``prefetch`` called, but no operators
        yet (:meth:`build` makes them): the programs compile while the caller reads
        the observations.  Collective over ``comm``."""
        self = cls.__new__(cls)
        self._lay_out(comm, levels, grid, periodic, dtype, programs, prefetch)
        return self

    def _lay_out(
        self,
        comm: Any,
        levels: list[Level],
        grid: tuple[int, int] | None,
        periodic: tuple[bool, bool],
        dtype: Any,
        programs: Programs | None,
        prefetch: Callable[[Hierarchy], None] | None,
    ) -> None:
        self.dtype = np.dtype(dtype)
        # every level's programs, and its visits' in the corrections
        self.programs = programs if programs is not None else Programs()
        top = levels[-1]
        decomps = [Decomposition(comm, top.interior, grid, periodic)]
        kept = [top]
        for lv in levels[-2::-1]:
            d = decomps[-1]
            oy, ox = kept[-1].offsets
            ys, xs = d.blocks.axis_cuts()
            cuts = (coarse_cuts(ys, oy, lv.interior[0]), coarse_cuts(xs, ox, lv.interior[1]))
            if min(min(np.diff(c)) for c in cuts) < MIN_BLOCK:
                break
            decomps.append(Decomposition(comm, lv.interior, d.blocks.grid, periodic, cuts))
            kept.append(lv)
        self.levels = kept[::-1]
        self.decomps = decomps[::-1]
        self.transfers = [None] + [
            transfer(self.decomps[i + 1], self.decomps[i], self.levels[i + 1])
            for i in range(len(self.levels) - 1)
        ]
        self.frames = [Frames(d, self.dtype, 5000 + 100 * i) for i, d in enumerate(self.decomps)]
        if prefetch is not None:  # the programs compile while the host builds
            self._prefetch_restrictions()
            prefetch(self)
        self.ops: list[kernel.Operator] = []

    def build(
        self,
        nodes: Any,
        lengthscale: float,
        amplitude: float,
        params: kernel.Params,
        momentum: float,
    ) -> None:
        """The levels' operators from the observations ``nodes`` and the prior, the
        coarsest level's factorisation and the smoothers.  Once."""
        if self.ops:
            raise RuntimeError("this hierarchy is built already")
        self.ops = self._operators(nodes, lengthscale, amplitude)
        self.coarse = None
        if len(self.levels) > 1:
            n = int(np.prod(self.levels[0].interior))
            if n > COARSE_WARN and self.decomps[0].rank == 0:
                log.warning(
                    "the coarsest multigrid level has %d unknowns (%d x %d points): its exact "
                    "factorisation on rank 0 may take minutes; a grid whose sides halve more "
                    "often (longitudes: a multiple of a power of 2) or fewer ranks coarsen "
                    "further",
                    n,
                    self.levels[0].nx,
                    self.levels[0].ny,
                )
            self.coarse = ExactCoarse(self.decomps[0], self.ops[0], self.levels[0].periodic_x)
        self.smoothers = [
            Smoother(d, op, params, momentum, self.dtype, 3000 + 100 * i, programs=self.programs)
            for i, (d, op) in enumerate(zip(self.decomps, self.ops, strict=True))
        ]

    def _operators(self, nodes: Any, ell: float, amp: float) -> list[kernel.Operator]:
        """Target: prior + observations.  Coarser: prior at that spacing + lumped
        observations ``Pᵀ m`` and right-hand side ``Pᵀ h``."""
        top, d = self.levels[-1], self.decomps[-1]
        # On the target level (as the direct and Krylov solvers do): a bilinear row's
        # corners on the boundary, held at the background, get weight 0.  Without it their
        # couplings reached outside the block, where the kernel's domain-edge halo
        # (α = 1, β = 0) makes a message of a non-zero weight non-zero, and the level
        # converged to another answer than the residual's.
        nodes = nodes.at_level(top.stride, top.interior, top.periodic_x)
        full = build(top, ell, amp, nodes, *d.extent, weights_dtype=self.dtype)
        mass = observation_mass(top, nodes, *d.extent)
        dt = self.dtype
        # dtype conversions and sums on the host: each device-side one is a separate
        # program to compile per level (~0.1 s each on a GPU).
        ops = [kernel.Operator(*(on_device(v, dt) for v in (full.diag, full.weights, full.rhs)))]
        m, h = on_device(mass, dt), ops[0].rhs
        for i in range(len(self.levels) - 2, -1, -1):
            t, fr = self.transfers[i + 1], self.frames[i + 1]
            m, h = t.restrict_framed(m, fr.of(m)), t.restrict_framed(h, fr.of(h))
            lv, dc = self.levels[i], self.decomps[i]
            pr = build(lv, ell, amp, _no_obs(nodes), *dc.extent, weights_dtype=self.dtype)
            diag = on_device(np.asarray(pr.diag, dt) + np.asarray(m), dt)
            ops.append(kernel.Operator(diag, on_device(pr.weights, dt), h))
        return ops[::-1]

    def _prefetch_restrictions(self) -> None:
        """The restrictions that :meth:`_operators` runs are a cold solve's first
        programs, one per level and each needed before the next: compile them all at
        once."""
        for i in range(len(self.levels) - 1, 0, -1):
            t, (field, frame) = self.transfers[i], self._specs(i)
            if self.decomps[i].has_neighbours:
                self.programs.prefetch(kernel.outgoing_frame, field)
            self.programs.prefetch(_restrict_jit, field, frame, t.dy.restrict, t.dx.restrict)

    def op_spec(self, i: int) -> kernel.Operator:
        """Level ``i``'s operator as ``jax.ShapeDtypeStruct`` (for prefetching)."""
        field = jax.ShapeDtypeStruct(self.decomps[i].shape, self.dtype)
        return kernel.Operator(field, jax.ShapeDtypeStruct((12, *field.shape), self.dtype), field)

    def _specs(self, i: int) -> tuple[Any, Any]:
        """Level ``i``'s field and frame as ``jax.ShapeDtypeStruct``."""
        return (
            jax.ShapeDtypeStruct(self.decomps[i].shape, self.dtype),
            jax.ShapeDtypeStruct(self.frames[i].edge.shape, self.dtype),
        )

    def prefetch_start(self, i: int) -> None:
        """Start compiling what :meth:`start` runs for level ``i > 0``
        (:meth:`Programs.prefetch`); the prolongation serves its corrections too."""
        t, c = self.transfers[i], i - 1
        field, frame = self._specs(c)
        if self.decomps[c].has_neighbours:  # the frame of what is prolonged
            self.programs.prefetch(kernel.outgoing_frame, field)
        self.programs.prefetch(_prolong_jit, field, frame, *t.prolong_maps())
        if c > 0:
            msg = jax.ShapeDtypeStruct((12, *field.shape), self.dtype)
            weights = self.op_spec(i).weights
            self.programs.prefetch(_copy_up_jit, msg, *t.parents(msg.shape), weights)

    def prefetch_corrections(self, i: int) -> None:
        """Start compiling what :meth:`correction` runs for level ``i`` besides the
        coarse level's own programs (the injection, the FAS right-hand side, the
        coarse residual)."""
        c = i - 1
        if c <= 0:  # the coarsest level is solved exactly
            return
        t = self.transfers[i]
        fine, _ = self._specs(i)
        field, frame = self._specs(c)
        self.programs.prefetch(_inject_jit, fine, t.dy.inject, t.dx.inject)
        self.programs.prefetch(_fas_rhs, field, frame, self.op_spec(c), field)
        self.programs.prefetch(kernel.residual, field, frame, self.op_spec(c))
        self.programs.prefetch(subtract, field, field)

    def free(self) -> None:
        for d in self.decomps:
            d.free()

    # -- the coarse-grid correction ------------------------------------------------
    def correction(self, i: int, x: Array, r: Array, nu: int) -> Array:
        """FAS correction for level ``i`` (mean ``x``, residual ``r``): a field on
        level ``i``'s block to add to its mean."""
        t = self.transfers[i]
        rc = t.restrict_framed(r, self.frames[i].of(r))
        if i - 1 == 0:
            ec = self.coarse.solve(rc)
        else:
            c = i - 1
            sm = self.smoothers[c]
            xc = t.inject_jit(x)
            fc = _fas_rhs(xc, self.frames[c].of(xc), self.ops[c], rc)
            op = self.ops[c]._replace(rhs=fc)
            sm.smooth(nu, op)
            u = sm.mean(op)
            sm.shift(self.correction(c, u, kernel.residual(u, self.frames[c].of(u), op), nu), op)
            ec = subtract(sm.mean(op), xc)
        return t.prolong_framed(ec, self.frames[i - 1].of(ec))

    def start(self, i: int, below: Array) -> tuple[Array, Array]:
        """Level ``i``'s first ``a, b`` from the level below (its mean ``below``, and
        its ``a`` messages when it has them)."""
        t = self.transfers[i]
        op = self.ops[i]
        m = t.prolong_framed(below, self.frames[i - 1].of(below))
        # The messages of the mean m: zero messages shifted by it, in the program that
        # the checks run (the b_prev of the level's shape only keeps it the same one).
        sm = self.smoothers[i]
        b, _ = kernel.shift_messages(
            zeros((12, *m.shape), m.dtype),
            zeros((12, *m.shape) if sm.momentum else (0,), m.dtype),
            m,
            self.frames[i].of(m),
            op,
            sm.params.c,
        )
        if i - 1 == 0:
            a = zeros(b.shape, b.dtype)
        else:
            a = t.copy_up_masked(self.smoothers[i - 1].a, op.weights)
        return a, b


@jit
def _framed(x: Array, frame: Array) -> Array:
    return kernel.framed(x, frame, 2)


@jit
def _fas_rhs(xc: Array, frame: Array, op: kernel.Operator, rc: Array) -> Array:
    """``Q_c x̂ + Pᵀ r``: the coarse right-hand side of the full-approximation scheme."""
    return kernel.apply_operator(xc, frame, op) + rc


def _no_obs(nodes: Any) -> NodeObservations:
    e = np.zeros(0, np.int64)
    return NodeObservations(e, e, np.zeros(0), np.zeros(0))
