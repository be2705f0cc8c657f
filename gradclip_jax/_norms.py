"""Norms of whole pytrees: float32-safe, one read of the gradients, sharding-aware.

Every reduction here accumulates in float32 (float64 for float64 and complex128 leaves),
whatever the leaf dtype. A complex leaf contributes its moduli: ``|z|^2 = re^2 + im^2`` to the
sum of squares, ``|z|`` to the others. Zero-size leaves contribute nothing. A float16 leaf is
upcast before it is squared, so a float16 gradient can never overflow (65504**2 times any
realistic element count fits in float32). bfloat16 shares float32's exponent range, so its
squares can overflow float32 even when the norm fits: bfloat16 leaves are summed as squares of
``x * 2**-16``, which keeps norms up to about 1.2e24 finite. float32 leaves keep a plain sum
of squares, representable up to a norm of about 1.8e19; above either bound an L2-norm clip
reports the gradient as non-finite (detecting the case exactly would cost a second pass over
every gradient, to handle one that has already diverged). A clip that compares another
measure with its threshold (the value clip's largest magnitude, ``ord`` 1 or inf) checks that
measure for overflow instead, at no cost.

Each measure of a leaf is one single-output reduction, the form every XLA backend compiles
best; leaves of at most ``SMALL_LEAF`` elements are first joined into one vector per dtype,
so that a thousand biases cost one reduction, not a thousand kernel launches, and the leaves of
a tree of at most ``TINY_TREE`` elements (a small model) are all joined. A transform
that needs two measures (the value clip: the sum of squares and the largest magnitude) reads
the leaf once per measure on CPU; GPU backends fuse sibling reductions of the same operand
into one read.

Inside ``shard_map``, ``axis_name`` names the mesh axes over which the pytree is split. JAX
records, in each value's type, the manual axes along which it varies; a leaf is summed across
exactly those of the named axes along which it varies, so a leaf replicated on an axis is
counted once. This needs ``shard_map``'s default ``check_vma=True``: with ``check_vma=False``
or under ``pmap``, JAX records no variance and every leaf is treated as replicated (which is
right for gradients that were already ``pmean``-ed, the data-parallel case).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gradclip_jax._validation import check_axis_name, check_ord

SUMSQ = "sumsq"
SUMSQ_LO = "sumsq_lo"  # sum of squares of bfloat16 leaves, taken of x * 2**-16
ABSSUM = "abssum"
MAXABS = "maxabs"
LINF = "linf"  # the largest magnitude, with a NaN counted as infinite (for global_norm)

# bfloat16 has float32's exponent range, so its squares can overflow a float32 sum while the
# norm fits. Squaring x * 2**-16 instead keeps norms up to about 1.2e24 finite, and only
# elements below about 7e-15 (whose squares fall under float32's normal range) are lost.
_LO_SCALE = 2.0**-16

_MAX_KINDS = frozenset({MAXABS, LINF})
_TAGS = {SUMSQ: 0, SUMSQ_LO: 1, ABSSUM: 2, MAXABS: 3, LINF: 4}
_SQUARED = "squared"  # internal: values that are already the squares to sum


def _accum_dtype(dtype: Any) -> Any:
    wide = jnp.dtype(dtype) in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128))
    return jnp.float64 if wide else jnp.float32


def wide_dtype(dtype: Any) -> Any:
    """The dtype a leaf of ``dtype`` is computed in: float32 for 16-bit floats, else its own.

    ``jnp.promote_types(dtype, float32)``, spelled out: under
    ``jax_numpy_dtype_promotion="strict"`` JAX refuses to promote bfloat16 with float32.
    """
    dtype = jnp.dtype(dtype)
    return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def widest_float(dtypes: Any) -> Any:
    """The widest accumulation dtype of ``dtypes``: float64 when any is float64 or complex128,
    else float32 (``jnp.result_type(float32, *accumulation dtypes)`` without JAX's promotion
    rules, which strict mode would apply)."""
    return jnp.float64 if any(_accum_dtype(d) == jnp.float64 for d in dtypes) else jnp.float32


def _as_real(x: jax.Array, kind: str, acc: Any) -> tuple[str, jax.Array]:
    """A real array whose measure ``kind`` equals that of ``x`` (complex: of ``|x|``)."""
    if not jnp.issubdtype(x.dtype, jnp.complexfloating):
        # Behind a barrier, so that XLA cannot merge this measure's elementwise work with the
        # optimizer's: Adam squares the gradient too, and one shared x * x would be written out
        # and read back by both (2 extra passes, measured with an unclipped Adam under
        # skip_spikes). Likewise XLA's CPU backend computes bfloat16 arithmetic in float32:
        # merged with the optimizer's convert, the float32 copy was written out and read back
        # (4 passes over the leaf's bytes); behind the barrier the convert stays inside the
        # reduction. (float16 converts are written out whatever is done here: the CPU
        # backend's reduction library takes none.) One barrier per measure (the tag differs),
        # or the measures would share one copy.
        if kind == SUMSQ_LO:
            # Its scale passes the barrier with it: a scale of its own per leaf (one constant
            # shared by every leaf of a shape would be broadcast once, written out, and read
            # by each reduction), applied after the convert. Applied behind a second barrier,
            # the float32 copy was that barrier's operand, and XLA >= 0.11 wrote it out (9
            # passes over a bfloat16 tree instead of 3).
            x, _, scale = lax.optimization_barrier(
                (x, jnp.asarray(_TAGS[kind], jnp.int32), jnp.asarray(_LO_SCALE, acc)))
            return kind, x.astype(acc) * scale
        x, _ = lax.optimization_barrier((x, jnp.asarray(_TAGS[kind], jnp.int32)))
        return kind, x.astype(acc)
    if kind == SUMSQ:
        # |z|^2 = re^2 + im^2, summed as is: the squares are the elementwise values.
        re, im = jnp.real(x).astype(acc), jnp.imag(x).astype(acc)
        return _SQUARED, re * re + im * im
    return kind, jnp.abs(x).astype(acc)


def _elementwise(kind: str, x: jax.Array) -> jax.Array:
    if kind in (SUMSQ, SUMSQ_LO):
        return x * x  # SUMSQ_LO's scale is applied by _as_real
    if kind == _SQUARED:
        return x
    if kind == LINF:
        # XLA's CPU backend skips NaNs in a max over more than a few thousand elements (the
        # clips take their non-finite check from the sum of squares, which never does); here a
        # NaN counts as an infinite magnitude, so the norm is not finite. The select makes
        # this max slower than a plain one, so only global_norm asks for it.
        return jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))
    return jnp.abs(x)


def _combine(kind: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.maximum(a, b) if kind in _MAX_KINDS else a + b


def _leaf_kind(kind: str, x: jax.Array) -> str | None:
    """The measure a leaf contributes to ``kind``; None when it contributes nothing."""
    if kind in (SUMSQ, SUMSQ_LO):
        lo = x.dtype == jnp.bfloat16
        return kind if (kind == SUMSQ_LO) == lo else None
    return kind


def _reduce_leaf(x: jax.Array, kinds: Sequence[str]) -> tuple[jax.Array, ...]:
    # One single-output reduction per measure, never a multi-output (variadic) one: XLA's CPU
    # backend hands single-output reductions to a vectorised library but runs variadic ones
    # as a scalar loop, 5-7x slower (and 50x on lengths with no small divisor). GPUs fuse
    # sibling reductions of one operand into a single read. No ravel: reshaping an explicitly
    # sharded array needs an output sharding; reducing over every axis does not.
    acc = _accum_dtype(x.dtype)
    zero = jnp.zeros((), acc)
    out = []
    for kind in kinds:
        own = _leaf_kind(kind, x)
        if own is None:
            out.append(zero)
            continue
        own, real = _as_real(x, own, acc)
        values = _elementwise(own, real)
        out.append(jnp.max(values, initial=zero) if own in _MAX_KINDS else jnp.sum(values))
    return tuple(out)


SMALL_LEAF = 2048
"""Leaves of at most this many elements are joined into one vector before they are reduced.

On XLA's CPU backend a kernel launch costs about as much as reading 8-16 KiB, and a leaf's
reduction is one kernel or, split into a reduce-window cascade, three: a thousand tiny leaves
(biases, scales) made a thousand or more kernels for the norm alone. Joined, they are one copy
and one reduction (the copy is an extra pass over the small leaves' few bytes only; over the
whole tree for a tree of at most ``TINY_TREE`` elements, whose bytes stay in cache)."""


TINY_TREE = 32_768
"""When the leaves that could be joined hold at most this many elements in all, every one of
them is joined, whatever its size: a small model's norm is then one reduction per measure.

On a 10k-parameter MLP inside a jitted loop that took the norm clip + adam step from 1.06x to
0.93x optax's clip + adam, and the value clip's from 1.36x to 1.15x (two large leaves and the
joined small ones had been three reductions per measure; ``benchmarks/join_small_trees.py``).
Past about 40k elements the joined copy costs more than the launches it saves (1.3x slower at
83k, 29x at 387k), so larger trees join only their small leaves."""


def _joinable(x: jax.Array) -> bool:
    """A non-empty real float leaf, not split by explicit sharding (joining would need a
    reshape of a sharded array)."""
    if x.size == 0 or not jnp.issubdtype(x.dtype, jnp.floating):
        return False
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is None or all(p is None for p in spec)


def varying_axes(x: Any) -> frozenset:
    """Mesh axes along which ``x`` varies inside ``shard_map`` (empty outside it)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def axis_names_tuple(axis_name: str | Sequence[str] | None) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    if isinstance(axis_name, str):
        return (axis_name,)
    return tuple(axis_name)


def reduce_tree(
    tree: Any, kinds: Sequence[str], axis_name: str | Sequence[str] | None = None
) -> dict[str, jax.Array]:
    """Reduces every leaf of ``tree`` to the measures in ``kinds``, globally.

    Returns a dict from kind to a scalar: the sum of squares / sum of magnitudes / largest
    magnitude over all leaves, combined across the mesh axes in ``axis_name`` along which each
    leaf varies. Scalars are float32, or float64 if any leaf is float64.
    """
    names = axis_names_tuple(axis_name)
    leaves = [jnp.asarray(leaf) for leaf in jax.tree.leaves(tree)]
    if SUMSQ in kinds and any(jnp.result_type(x) == jnp.bfloat16 for x in leaves):
        kinds = (*kinds, SUMSQ_LO)
    acc = widest_float(x.dtype for x in leaves)
    joinable = [_joinable(x) for x in leaves]
    join_all = sum(x.size for x, ok in zip(leaves, joinable, strict=True) if ok) <= TINY_TREE
    groups: dict[tuple[str, ...], list[tuple[jax.Array, ...]]] = {}
    to_join: dict[tuple[tuple[str, ...], Any], list[jax.Array]] = {}
    for leaf, ok in zip(leaves, joinable, strict=True):
        axes = tuple(a for a in names if a in varying_axes(leaf))
        if ok and (join_all or leaf.size <= SMALL_LEAF):
            to_join.setdefault((axes, leaf.dtype), []).append(leaf)
        else:
            groups.setdefault(axes, []).append(_reduce_leaf(leaf, kinds))
    for (axes, _), pool in to_join.items():
        joined = pool[0].ravel() if len(pool) == 1 else jnp.concatenate([x.ravel() for x in pool])
        groups.setdefault(axes, []).append(_reduce_leaf(joined, kinds))

    totals = {k: jnp.zeros((), acc) for k in kinds}
    for axes, parts in groups.items():
        for i, kind in enumerate(kinds):
            local = parts[0][i].astype(acc)
            for part in parts[1:]:
                local = _combine(kind, local, part[i].astype(acc))
            if axes:
                local = lax.pmax(local, axes) if kind in _MAX_KINDS else lax.psum(local, axes)
            totals[kind] = _combine(kind, totals[kind], local)
    return totals


def norm_kinds(ord: Any) -> tuple[str, ...]:
    """The measures needed for the ``ord``-norm; all three when ``ord`` is only known traced."""
    if isinstance(ord, jax.core.Tracer):
        return (SUMSQ, ABSSUM, MAXABS)
    return ({2: SUMSQ, 1: ABSSUM}.get(ord, MAXABS),)


def _root(x: jax.Array) -> jax.Array:
    """sqrt(x) for a sum of squares, with derivative 0 rather than NaN at x = 0.

    The norm of a zero gradient has no derivative; jnp.sqrt's is infinite there, and times
    the zero cotangent of an unclipped step it made the gradient through a clip NaN (as
    through optax's). 0 is the subgradient a user differentiating through the clip expects.
    A NaN or infinite x comes back as it went in (sqrt of inf is inf).
    """
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), x)


def l2_from(measures: Mapping[str, jax.Array]) -> jax.Array:
    """The L2 norm from the sums of squares (plain, and scaled for bfloat16 leaves)."""
    plain = measures[SUMSQ]
    if SUMSQ_LO not in measures:
        return _root(plain)
    lo = measures[SUMSQ_LO]
    inv = 1.0 / _LO_SCALE
    unscaled = plain + lo * (inv * inv)
    # Where the unscaled total overflows, add in the scaled domain and scale the root back.
    rescaled = _root(plain * (_LO_SCALE * _LO_SCALE) + lo) * inv
    return jnp.where(jnp.isfinite(unscaled), _root(unscaled), rescaled)


def norm_from(measures: Mapping[str, jax.Array], ord: Any) -> jax.Array:
    if isinstance(ord, jax.core.Tracer):
        l2, l1, linf = l2_from(measures), measures[ABSSUM], measures[MAXABS]
        return jnp.where(ord == 1, l1, jnp.where(ord == 2, l2, linf))
    if ord == 2:
        return l2_from(measures)
    return measures[norm_kinds(ord)[0]]


def global_norm(
    tree: Any, *, ord: float = 2, axis_name: str | Sequence[str] | None = None
) -> jax.Array:
    r"""Norm of a whole pytree, accumulated in float32 whatever the leaf dtype.

    .. math::
        \|g\|_2 = \sqrt{\textstyle\sum_i g_i^2},\quad \|g\|_1 = \textstyle\sum_i |g_i|,\quad
        \|g\|_\infty = \max_i |g_i|

    over every element of every leaf. Leaves are upcast to float32 (float64 stays float64)
    before squaring, so float16 gradients whose norm fits in float32 never overflow, unlike a
    sum of squares taken in float16. ``None`` leaves, ``optax.MaskedNode`` and empty trees are
    accepted (an empty tree has norm 0).

    Args:
      tree: a pytree of arrays (gradients, updates, parameters).
      ord: 2 (default), 1 or ``math.inf``.
      axis_name: inside ``shard_map``, the mesh axis name (or a tuple of names) over which the
        tree is split. Each leaf is combined across the named axes along which it varies, so a
        leaf replicated over an axis is counted once and a leaf split over it is summed. Needs
        ``check_vma=True`` (``shard_map``'s default). Outside ``shard_map`` leave it ``None``:
        sharded ``jit`` already computes the global norm.

    Returns:
      A scalar array, float32 (float64 if any leaf is float64). A NaN element makes the norm
      NaN (``ord`` 1 or 2) or infinite (``math.inf``: the largest magnitude counts a NaN as
      infinite, since XLA's CPU max skips NaNs); an infinite element makes it infinite.

    Example:
      >>> import jax.numpy as jnp
      >>> import gradclip_jax
      >>> g = {"w": jnp.full((1000,), 300.0, jnp.float16)}
      >>> float(gradclip_jax.global_norm(g))  # a float16 sum of squares would be inf
      9486.8330078125
    """
    ord = check_ord(ord)
    check_axis_name(axis_name)
    if not isinstance(ord, jax.core.Tracer) and ord == math.inf:
        return reduce_tree(tree, (LINF,), axis_name)[LINF]
    measures = reduce_tree(tree, norm_kinds(ord), axis_name)
    if isinstance(ord, jax.core.Tracer):
        # The sum of magnitudes is NaN exactly when an element is, which the max may skip.
        measures = {**measures,
                    MAXABS: jnp.where(jnp.isnan(measures[ABSSUM]), jnp.inf, measures[MAXABS])}
    return norm_from(measures, ord)
