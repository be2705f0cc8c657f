"""The parameter trees ``gradclip-jax bench`` times: odd lengths, real model trees, tiny models.

Every tree is built from shapes alone (zeros), so no model library is needed. Each builder
takes a dtype and returns a dict pytree; ``shape_sets(quick=...)`` names them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

Tree = dict[str, Any]


def _tree(shapes: dict[str, tuple[int, ...]], dtype: Any) -> Tree:
    return {name: jnp.zeros(shape, dtype) for name, shape in shapes.items()}


def odd_lengths(dtype: Any, *, scale: int = 1) -> Tree:
    """96 leaves of 83,333 (= 499 x 167), primes, and a 50,257-row embedding."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(96 // scale):
        shapes[f"odd83333_{i}"] = (83_333,)
    for i, p in enumerate((7_919, 104_729, 15_485_863 // (8 * scale), 1_299_709)):
        shapes[f"prime_{i}"] = (p,)
    shapes["vocab50257"] = (50_257, 96 // scale)
    shapes["bias50257"] = (50_257,)
    return _tree(shapes, dtype)


def gpt2(dtype: Any, *, d: int = 768, layers: int = 12, vocab: int = 50_257,
         ctx: int = 1024) -> Tree:
    """GPT-2-small's parameter tree (124M at the defaults): tied embedding, 12 blocks."""
    shapes: dict[str, tuple[int, ...]] = {"wte": (vocab, d), "wpe": (ctx, d),
                                          "ln_f/scale": (d,), "ln_f/bias": (d,)}
    for i in range(layers):
        p = f"h{i}/"
        shapes.update({
            p + "ln_1/scale": (d,), p + "ln_1/bias": (d,),
            p + "attn/c_attn/kernel": (d, 3 * d), p + "attn/c_attn/bias": (3 * d,),
            p + "attn/c_proj/kernel": (d, d), p + "attn/c_proj/bias": (d,),
            p + "ln_2/scale": (d,), p + "ln_2/bias": (d,),
            p + "mlp/c_fc/kernel": (d, 4 * d), p + "mlp/c_fc/bias": (4 * d,),
            p + "mlp/c_proj/kernel": (4 * d, d), p + "mlp/c_proj/bias": (d,),
        })
    return _tree(shapes, dtype)


def resnet50(dtype: Any, *, width: int = 64, classes: int = 1000) -> Tree:
    """ResNet-50's parameter tree (25.6M at the defaults): HWIO kernels and batch-norm pairs."""
    shapes: dict[str, tuple[int, ...]] = {"stem/conv": (7, 7, 3, width),
                                          "stem/bn/scale": (width,), "stem/bn/bias": (width,)}
    cin = width
    for stage, (blocks, mid) in enumerate(zip((3, 4, 6, 3), (1, 2, 4, 8), strict=True)):
        m = width * mid
        out = 4 * m
        for b in range(blocks):
            p = f"s{stage}b{b}/"
            for j, (kh, ci, co) in enumerate(((1, cin, m), (3, m, m), (1, m, out))):
                shapes[p + f"conv{j}"] = (kh, kh, ci, co)
                shapes[p + f"bn{j}/scale"] = (co,)
                shapes[p + f"bn{j}/bias"] = (co,)
            if b == 0:
                shapes[p + "proj"] = (1, 1, cin, out)
                shapes[p + "proj_bn/scale"] = (out,)
                shapes[p + "proj_bn/bias"] = (out,)
            cin = out
    shapes["head/kernel"] = (cin, classes)
    shapes["head/bias"] = (classes,)
    return _tree(shapes, dtype)


def lstm(dtype: Any, *, vocab: int = 10_000, embed: int = 512, hidden: int = 1024,
         layers: int = 2) -> Tree:
    """A 2-layer LSTM language model (30M at the defaults)."""
    shapes: dict[str, tuple[int, ...]] = {"embed": (vocab, embed)}
    cin = embed
    for i in range(layers):
        shapes[f"l{i}/w_ih"] = (cin, 4 * hidden)
        shapes[f"l{i}/w_hh"] = (hidden, 4 * hidden)
        shapes[f"l{i}/b"] = (4 * hidden,)
        cin = hidden
    shapes["out/kernel"] = (hidden, vocab)
    shapes["out/bias"] = (vocab,)
    return _tree(shapes, dtype)


def tiny_leaves(dtype: Any, *, n: int = 1000) -> Tree:
    """A thousand tiny leaves of mixed odd sizes (biases, scales, scalars)."""
    sizes = (1, 3, 7, 16, 33, 64)
    return _tree({f"t{i}": (sizes[i % len(sizes)],) for i in range(n)}, dtype)


def one_big_leaf(dtype: Any, *, n: int = 100_000_000) -> Tree:
    return _tree({"w": (n,)}, dtype)


def tiny_mlp(dtype: Any) -> Tree:
    """A 10k-parameter MLP (32 -> 128 -> 41 -> 10 with biases: 9,933 parameters)."""
    return _tree({"l0/w": (32, 128), "l0/b": (128,), "l1/w": (128, 41), "l1/b": (41,),
                  "l2/w": (41, 10), "l2/b": (10,)}, dtype)


def gpt_1b(dtype: Any) -> Tree:
    """A GPT-style tree of 1.01B parameters: GPT-2's layout at width 2,048, 18 blocks."""
    return gpt2(dtype, d=2048, layers=18, ctx=2048)


Builder = Callable[[Any], Tree]

ACCELERATOR_SETS: dict[str, Builder] = {"GPT-style 1B (1.01B)": gpt_1b}
"""Sets benched on an accelerator only: 1B float32 parameters with adam's state and a step's
outputs take about 20 GB, more than a 2-core CI machine has to spare."""


def shape_sets(*, quick: bool, accelerator: bool = False) -> dict[str, Builder]:
    """Named tree builders: the full set, or a smaller version of each for ``--quick``; with
    ``accelerator`` (and not ``quick``), ``ACCELERATOR_SETS`` too."""
    if quick:
        return {
            "odd lengths (83,333, primes, 50,257)": lambda dt: odd_lengths(dt, scale=8),
            "GPT-2 tree at 1/4 width": lambda dt: gpt2(dt, d=192, layers=4),
            "ResNet-50 tree at 1/4 width": lambda dt: resnet50(dt, width=16),
            "LSTM (hidden 256)": lambda dt: lstm(dt, vocab=2_000, embed=128, hidden=256),
            "1,000 tiny leaves": tiny_leaves,
            "one 10M leaf": lambda dt: one_big_leaf(dt, n=10_000_000),
            "tiny MLP (10k)": tiny_mlp,
        }
    return {
        "odd lengths (83,333, primes, 50,257)": odd_lengths,
        "GPT-2 small (124M)": gpt2,
        "ResNet-50 (25.6M)": resnet50,
        "LSTM (2 x 1024, 30M)": lstm,
        "1,000 tiny leaves": tiny_leaves,
        "one 100M leaf": one_big_leaf,
        "tiny MLP (10k)": tiny_mlp,
        **(ACCELERATOR_SETS if accelerator else {}),
    }
