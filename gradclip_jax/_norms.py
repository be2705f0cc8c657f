"""Norms of whole pytrees: float32-safe, one read of the gradients, sharding-aware.

Every reduction here accumulates in float32 (float64 for float64 leaves), whatever the leaf
dtype: a float16 leaf is upcast before it is squared, so a float16 gradient can never
overflow (65504**2 times any realistic element count fits in float32). bfloat16 and float32
leaves share float32's exponent range; their squared norm is representable up to a norm of
about 1.8e19, above which the sum of squares is +inf and the gradient is reported as
non-finite. Detecting that case exactly would need a second pass over the gradients (or a
conditional that XLA prices as one), which would double the cost of every step to handle a
gradient that has already diverged.

Each leaf is reduced once. When several measures of the same leaf are needed (the value clip
wants the sum of squares and the largest magnitude), they come out of one variadic reduction,
so the gradients are still read once.

Inside ``shard_map``, ``axis_name`` names the mesh axes over which the pytree is split. JAX
records, in each value's type, the manual axes along which it varies; a leaf is summed across
exactly those of the named axes along which it varies, so a leaf replicated on an axis is
counted once. This needs ``shard_map``'s default ``check_vma=True``: with ``check_vma=False``
or under ``pmap``, JAX records no variance and every leaf is treated as replicated (which is
right for gradients that were already ``pmean``-ed, the data-parallel case).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gradclip_jax._validation import check_axis_name, check_ord

SUMSQ = "sumsq"
ABSSUM = "abssum"
MAXABS = "maxabs"

_MAX_KINDS = frozenset({MAXABS})


def _accum_dtype(dtype: Any) -> Any:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _elementwise(kind: str, x: jax.Array) -> jax.Array:
    if kind == SUMSQ:
        return x * x
    return jnp.abs(x)


def _combine(kind: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.maximum(a, b) if kind in _MAX_KINDS else a + b


def _reduce_leaf(x: jax.Array, kinds: Sequence[str]) -> tuple[jax.Array, ...]:
    # No ravel: reshaping an explicitly sharded array needs an output sharding; reducing over
    # every axis does not.
    acc = _accum_dtype(x.dtype)
    x = x.astype(acc)
    zero = jnp.zeros((), acc)
    if len(kinds) == 1:
        values = _elementwise(kinds[0], x)
        return (jnp.max(values, initial=zero) if kinds[0] in _MAX_KINDS else jnp.sum(values),)
    operands = tuple(_elementwise(k, x) for k in kinds)

    def combine(a, b):
        return tuple(_combine(k, u, v) for k, u, v in zip(kinds, a, b, strict=True))

    return tuple(lax.reduce(operands, (zero,) * len(kinds), combine, tuple(range(x.ndim))))


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
    leaves = jax.tree.leaves(tree)
    acc = jnp.result_type(jnp.float32, *(_accum_dtype(x.dtype) for x in leaves))
    groups: dict[tuple[str, ...], list[tuple[jax.Array, ...]]] = {}
    for leaf in leaves:
        leaf = jnp.asarray(leaf)
        axes = tuple(a for a in names if a in varying_axes(leaf))
        groups.setdefault(axes, []).append(_reduce_leaf(leaf, kinds))

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


def norm_from(measures: dict[str, jax.Array], ord: Any) -> jax.Array:
    if isinstance(ord, jax.core.Tracer):
        l2, l1, linf = jnp.sqrt(measures[SUMSQ]), measures[ABSSUM], measures[MAXABS]
        return jnp.where(ord == 1, l1, jnp.where(ord == 2, l2, linf))
    if ord == 2:
        return jnp.sqrt(measures[SUMSQ])
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
      A scalar array, float32 (float64 if any leaf is float64).

    Example:
      >>> import jax.numpy as jnp
      >>> import gradclip_jax
      >>> g = {"w": jnp.full((1000,), 300.0, jnp.float16)}
      >>> float(gradclip_jax.global_norm(g))  # a float16 sum of squares would be inf
      9486.8330078125
    """
    ord = check_ord(ord)
    check_axis_name(axis_name)
    return norm_from(reduce_tree(tree, norm_kinds(ord), axis_name), ord)
