"""flax.serialization support for the states, without importing flax.

``flax.serialization.to_bytes`` (how Linen's ``TrainState`` is often saved) walks a state
through its registry of types: NamedTuples, dicts, lists and flax's own dataclasses. A
``ClipState`` or ``SkipState`` is a NamedTuple, but it holds two types flax does not know:
``NormSketch`` (a JAX dataclass) and ``ClipName`` (static data, no array), which it handed to
msgpack as they were ("can not serialize 'NormSketch' object"). They are registered here:
a sketch as its arrays, a name as nothing (it comes back from the target state, as the
sketch's static fields do).

``import gradclip_jax`` needs only jax and optax, so flax is never imported here: the types are
registered when flax is already imported, at ``import gradclip_jax`` or at any transform's
``init`` (a state is always made by ``init`` before it is saved).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

_registered = False


def register_flax_serialization() -> None:
    """Registers the state's types with flax.serialization if flax is imported (once)."""
    global _registered
    if _registered:
        return
    serialization = sys.modules.get("flax.serialization")
    if serialization is None:
        return
    from gradclip_jax._core import ClipName
    from gradclip_jax._sketch import NormSketch

    def sketch_to_dict(sketch: NormSketch) -> dict[str, Any]:
        return {"cumulative": serialization.to_state_dict(sketch.cumulative),
                "recorded": serialization.to_state_dict(sketch.recorded)}

    def sketch_from_dict(target: NormSketch, state: dict[str, Any]) -> NormSketch:
        return dataclasses.replace(
            target,
            cumulative=serialization.from_state_dict(target.cumulative, state["cumulative"],
                                                     name="cumulative"),
            recorded=serialization.from_state_dict(target.recorded, state["recorded"],
                                                   name="recorded"))

    serialization.register_serialization_state(NormSketch, sketch_to_dict, sketch_from_dict,
                                               override=True)
    serialization.register_serialization_state(ClipName, lambda name: {},
                                               lambda target, state: target, override=True)
    _registered = True
