"""Exported copies carry no sparsecraft hooks, and export refuses what is not a torch model.

``copy.deepcopy`` of a model copies its hook dictionaries, and a hook is a
function object that deepcopy shares, not copies: the activity hooks of a
training :class:`~sparsecraft.Regularizer` on the copy still write into that
regularizer (issue 10, item 8: running an exported model changed ``reg.loss()``
from 3.46 to 188.2), and ``reg.remove()`` cannot reach them. The exported copy
is therefore cleaned of every hook whose code lives in the ``sparsecraft``
package, before it runs even once; the original keeps its hooks. Hooks the user
registered with their own code are kept: they are the user's to judge.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

# Module attributes holding hooks keyed by handle id (torch.nn.Module internals, torch 2.x).
_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)  # fmt: skip
# Flags kept beside the forward hooks, keyed by the same handle ids.
_FLAG_DICTS = (
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
)  # fmt: skip
_TENSOR_HOOK_DICTS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def _code_module(hook: Any) -> str:
    """The Python module that defines ``hook`` (unwrapping partials, bound methods, wrappers)."""
    seen = set()
    while id(hook) not in seen:
        seen.add(id(hook))
        if isinstance(hook, functools.partial):
            hook = hook.func
        elif type(hook).__name__ == "_WrappedHook" and hasattr(hook, "hook"):
            hook = hook.hook  # torch wraps load_state_dict pre-hooks
        elif hasattr(hook, "__func__"):
            hook = hook.__func__  # bound method: its function's module
        else:
            break
    return getattr(hook, "__module__", None) or type(hook).__module__ or ""


def is_sparsecraft_hook(hook: Any) -> bool:
    """Whether ``hook``'s code is part of the sparsecraft package."""
    name = _code_module(hook)
    return name == "sparsecraft" or name.startswith("sparsecraft.")


def strip_sparsecraft_hooks(model: nn.Module) -> int:
    """Removes every sparsecraft hook from ``model``'s modules and parameters, in place.

    Args:
        model: An exported copy (never the user's model).

    Returns:
        The number of hooks removed.
    """
    removed = 0
    for module in model.modules():
        for attr in _HOOK_DICTS:
            hooks = module.__dict__.get(attr)
            if not hooks:
                continue
            for key in [k for k, fn in hooks.items() if is_sparsecraft_hook(fn)]:
                del hooks[key]
                removed += 1
                for flag in _FLAG_DICTS:
                    module.__dict__.get(flag, {}).pop(key, None)
    for tensor in list(model.parameters()) + list(model.buffers()):
        for attr in _TENSOR_HOOK_DICTS:
            hooks = getattr(tensor, attr, None)
            if not hooks:
                continue
            for key in [k for k, fn in hooks.items() if is_sparsecraft_hook(fn)]:
                del hooks[key]
                removed += 1
    return removed


def check_torch_model(model: Any, function: str) -> None:
    """Raises unless ``model`` is a plain ``torch.nn.Module`` that export can rewrite.

    A Keras 3 model on the torch backend is a ``torch.nn.Module`` too, but its
    layers are not torch child modules: ``compact``/``to_sparse`` would find
    nothing to rewrite and silently return it unchanged (issue 13).

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or is a Keras object.
    """
    keras_class = next((c for c in type(model).__mro__
                        if c.__module__.split(".")[0] in ("keras", "tf_keras")), None)
    if keras_class is not None:
        raise TypeError(
            f"Expected a torch.nn.Module built from torch layers; {function} rewrites torch "
            f"layers (nn.Linear, nn.Conv*), which a Keras model does not contain. Received: "
            f"model={type(model).__name__} (a Keras {keras_class.__name__}). Export the Keras "
            "model with Keras (model.save) or rebuild it from torch.nn layers."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected an nn.Module. Received: model={type(model).__name__}")
