"""ProximalOptimizer for Keras 3: exact zeros with any Keras optimizer, on every backend.

It wraps an optimizer the way ``keras.optimizers.LossScaleOptimizer`` does.
At build it takes every trainable variable whose regularizer has a prox
(sparsecraft's, or Keras's own ``L1``/``L2``/``L1L2``) out of
``model.losses`` and, after each inner update, applies that prox with the step
the inner optimizer really used (forward–backward splitting), or keeps a dense
latent copy that the inner optimizer updates and shows the model
``prox(latent, γ)`` with the accumulated step ``γ`` (dual averaging, as in RDA,
Xiao 2010, and torchao's prototype PAT). The torch library's
``sparsecraft.ProximalOptimizer`` does the same for torch optimizers.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import keras
from keras import ops

from . import _control, _display, _fine_tune, _freeze
from ._math import count_zeros
from .regularizers import ProximalRegularizer
from .regularizers import get as _get_regularizer

__all__ = ["ProximalOptimizer"]

_MODES = ("forward_backward", "latent")
_KNOWN = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop")


def _prox_regularizer(variable: Any) -> ProximalRegularizer | None:
    """The regularizer to apply by prox on ``variable``, or None (it then stays in the loss)."""
    reg = getattr(variable, "_sparsecraft_prox", None) or variable.regularizer
    if isinstance(reg, keras.regularizers.Regularizer) and type(reg).__name__ in ("L1", "L2", "L1L2") \
            and not isinstance(reg, ProximalRegularizer):
        reg = _get_regularizer(reg)  # Keras's own L1/L2/L1L2: the same value, with a prox
    if isinstance(reg, ProximalRegularizer) and reg.proximable:
        return reg
    return None


def _read(variable: Any) -> Any:
    """A variable's value as a tensor (JAX's jnp functions refuse Keras variables under jit)."""
    return ops.convert_to_tensor(variable)


def _tracing_tensorflow() -> bool:
    """True inside a TensorFlow graph trace: where TF builds optimizers, after the loss."""
    if keras.backend.backend() != "tensorflow":
        return False
    return not sys.modules["tensorflow"].executing_eagerly()


def _family(optimizer: keras.optimizers.Optimizer) -> str | None:
    for cls in type(optimizer).__mro__:
        if cls.__module__.startswith("keras") and cls.__name__ in _KNOWN:
            return "Adam" if cls.__name__ == "AdamW" else cls.__name__
    return None


@keras.saving.register_keras_serializable(package="sparsecraft")
class ProximalOptimizer(keras.optimizers.Optimizer):
    """Wraps any Keras optimizer; after its update, applies the prox of the variables' regularizers.

    Args:
        inner_optimizer: the ``keras.optimizers.Optimizer`` that computes the
            gradient step (its learning rate and schedule are used as they are).
        mode: ``"forward_backward"`` (default): ``w ← prox_{tR}(inner_step(w))``
            with ``t`` the inner step: SGD (any momentum) the current learning
            rate, read before the update (schedules included); Adam/AdamW
            ``lr·sqrt(1 − β₂ᵗ)/(sqrt(v) + ε)`` per coordinate, Keras's own Adam
            step (ε outside the bias correction, as Keras's Adam applies it);
            Adagrad ``lr/sqrt(acc + ε)``; RMSprop ``lr/sqrt(v − ḡ² + ε)``; any
            other optimizer: the learning rate, with one warning. ``"latent"``:
            the inner optimizer updates a dense latent copy ``z`` of each
            penalised variable and the model holds ``prox_{γR}(z)``, ``γ = Σ lr``
            (one extra copy of each penalised variable).
        floor: guard for adaptive optimizers (the torch library's default,
            0.1): each coordinate's ``sqrt(v)`` is raised to at least ``floor``
            times the largest mean ``sqrt(v)`` the variable has had (taken at
            every step), so that a dying gradient cannot make its threshold
            explode (ProxGen, Yun et al. 2021). 0 disables it.
        relaxed: latent mode only (ignored in forward–backward mode, as in
            torch): show the latent values unshrunk on as many coordinates per
            variable as ``prox_{γR}(z)`` keeps, 0 elsewhere (relaxed lasso);
            under Adam/AdamW, Adagrad or RMSprop with an L1 or L1L2 term, the
            coordinates with the largest ``|z|·(sqrt(v) + ε)^½`` (:mod:`._display`).
            None (default): the torch library's choice: off at a fixed
            strength; once a :class:`~sparsecraft.keras.callbacks.TargetSparsity`
            steers it, on for Adam, AdamW, Adagrad and RMSprop, and for other
            optimizers on a model with an RNN, MultiHeadAttention or Embedding
            layer and no BatchNormalization.
        name: the optimizer's name.

    A variable is applied by prox when its ``regularizer`` has one
    (:mod:`sparsecraft.keras.regularizers`, or Keras's ``L1``, ``L2``,
    ``L1L2``); at build its ``regularizer`` is set to None so the term leaves
    ``model.losses`` (:meth:`release` puts it back). Activity regularizers and
    penalties without a prox stay in the loss. :meth:`freeze_support` fixes
    the zeros of the zero-making variables (one non-trainable mask each, an
    optimizer variable: one more copy of each such variable, ones until then).

    Raises:
        TypeError: ``inner_optimizer`` is not a Keras optimizer, or is a ProximalOptimizer;
            ``relaxed`` is not a bool or None.
        ValueError: a bad ``mode`` or ``floor``, or an inner optimizer with
            ``gradient_accumulation_steps``.

    Example:
        >>> opt = ProximalOptimizer(keras.optimizers.Adam(1e-3))
        >>> model.compile(optimizer=opt, loss="mse")   # layers use sparsecraft.keras.regularizers.L1
        >>> model.fit(x, y)                            # their kernels get exact zeros
    """

    def __init__(
        self,
        inner_optimizer: keras.optimizers.Optimizer,
        mode: str = "forward_backward",
        floor: float = 0.1,
        relaxed: bool | None = None,
        name: str | None = None,
        **kwargs: Any,
    ):
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                f"Expected a keras.optimizers.Optimizer. Received: inner_optimizer={type(inner_optimizer).__name__}"
            )
        if isinstance(inner_optimizer, ProximalOptimizer):
            raise TypeError("Expected an inner optimizer. Received: a ProximalOptimizer (wrap only once)")
        if mode not in _MODES:
            raise ValueError(f"Expected mode in {_MODES}. Received: mode={mode!r}")
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
            raise ValueError(f"Expected floor in [0, 1]. Received: floor={floor!r}")
        if inner_optimizer.gradient_accumulation_steps:
            # The inner optimizer then updates every n-th step only; a prox at every step would
            # shrink weights that did not move.
            raise ValueError(
                "Expected an inner optimizer without gradient accumulation. Received: "
                f"gradient_accumulation_steps={inner_optimizer.gradient_accumulation_steps}"
            )
        if kwargs:
            raise ValueError(
                f"ProximalOptimizer takes no base optimizer arguments (set them on the inner optimizer). "
                f"Received: {sorted(kwargs)}"
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.mode = mode
        self.floor = float(floor)
        self.relaxed = _display.check(relaxed)
        self._family = _family(inner_optimizer)
        # Set by sparsecraft.keras.callbacks.TargetSparsity; read when the train step is traced.
        self._control: dict[str, Any] | None = None
        self._unshrunk_model = False  # set by TargetSparsity: a sequence model without BatchNorm
        # Eager torch only: the step count and the frozen flag kept on the host, so that neither
        # the freeze check nor the choice of step reads the device per step (_freeze.host_frozen).
        self._host_step: int | None = None
        self._host_frozen: bool | None = None

    # -- building ----------------------------------------------------------------------
    def build(self, var_list: list) -> None:
        """Build the inner optimizer, claim the prox variables and create the prox state."""
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        super().build(var_list)
        if not (getattr(self, "_building_in_step", False) or _tracing_tensorflow()):
            # Built before training (Keras's symbolic build on JAX and torch, or by hand): a
            # loss computed earlier (model.losses called by the user) is not this step's loss.
            for v in var_list:
                v._sparsecraft_in_loss = False
        slots, regs, originals = [], [], []
        for i, v in enumerate(var_list):
            reg = _prox_regularizer(v)
            if reg is None:
                continue
            slots.append(i)
            regs.append(reg)
            originals.append(v.regularizer or reg)  # Keras's own L1 object stays the user's
            v._sparsecraft_prox = reg
            v.regularizer = None  # the term leaves model.losses: the prox applies it
        # Plain Python data: storing model variables on an optimizer would track them as its own.
        self._slots = slots
        self._regs = regs
        self._originals = originals
        self._slot_of = {i: k for k, i in enumerate(slots)}
        shapes = [tuple(var_list[i].shape) for i in slots]
        self._numel = [math.prod(s) for s in shapes]
        self._log_scale = self.add_variable((), initializer="zeros", dtype="float32", name="log_scale")
        self._control_state = _control.create_state(self)
        _freeze.create_state(self, var_list)
        self._typical = [
            self.add_variable((), initializer="zeros", dtype="float32", name=f"typical_{k}")
            for k in range(len(slots))
        ]
        if self.mode == "latent":
            self._latents = [self.add_variable_from_reference(var_list[i], name="latent") for i in slots]
            self._gammas = [
                self.add_variable((), initializer="zeros", dtype="float32", name=f"gamma_{k}")
                for k in range(len(slots))
            ]
        # Last: the average's copies, when made after build (TargetSparsity, a load), come here too.
        _fine_tune.create_state(self)
        if slots and self._family is None:
            warnings.warn(
                f"ProximalOptimizer does not know the step size of {type(self.inner_optimizer).__name__}; "
                f"it uses the learning rate as the prox step.",
                stacklevel=2,
            )

    def release(self) -> None:
        """Hand the terms back to the loss: each claimed variable gets its regularizer back."""
        for i, reg in zip(self._slots, self._originals, strict=True):
            v = self._trainable_variables[i]
            v.regularizer = reg
            v._sparsecraft_prox = None

    @property
    def variables(self) -> list:
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list: list) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    @property
    def prox_variables(self) -> list:
        """The variables applied by prox, in build order."""
        return [self._trainable_variables[i] for i in self._slots]

    @property
    def prox_regularizers(self) -> list[ProximalRegularizer]:
        """Their regularizers, in the same order."""
        return list(self._regs)

    def strength_scale(self) -> Any:
        """The multiplier on the strengths of the zero-making terms (TargetSparsity moves it)."""
        return ops.exp(_read(self._log_scale))

    def load_own_variables(self, store: Any) -> None:
        if self.built and self._averages is None \
                and len(store.keys()) == len(self.variables) + len(self._trainable_variables):
            _fine_tune.create_average(self)  # saved after a fit with TargetSparsity(average=True)
        super().load_own_variables(store)
        self._host_frozen = None  # the loaded flag may differ: eager torch reads it again
        self._host_step = None

    @property
    def support_frozen(self) -> bool:
        """Whether the zeros are fixed (one host read)."""
        return self.built and bool(ops.convert_to_numpy(self._frozen) > 0)

    def freeze_support(self, frozen: bool = True, *, lr_scale: float = 1.0) -> None:
        """Fix the zeros of the zero-making variables (or release them with ``frozen=False``).

        While frozen, a step is the inner optimizer's step with the zeros'
        gradients masked and the zeros re-imposed after it (momentum cannot revive
        them); no prox is applied: the survivors train without the penalty, as in
        the relaxed lasso's refit. While frozen, the inner optimizer's learning
        rate is multiplied by ``lr_scale`` inside each step (its variable or
        schedule is not changed). Released, latent mode restarts its latent copies
        from the weights (``γ = 0``) and the multiplier is 1 again. :class:`~sparsecraft.keras.callbacks.TargetSparsity`
        with ``hold="freeze"`` does this inside the train step at ``freeze_step``,
        after making the count exact. The torch library's
        ``ProximalOptimizer.freeze_support`` is the same.

        Raises:
            TypeError: ``frozen`` is not a bool.
            ValueError: the optimizer is not built yet, or ``lr_scale`` is not a finite
                number > 0 (or not 1 with ``frozen=False``).
        """
        if not isinstance(frozen, bool):
            raise TypeError(f"Expected frozen to be a bool. Received: frozen={frozen!r}")
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not math.isfinite(lr_scale) \
                or lr_scale <= 0 or (not frozen and lr_scale != 1):
            raise ValueError(
                f"Expected lr_scale as a finite number > 0 (1 when releasing). "
                f"Received: lr_scale={lr_scale!r}, frozen={frozen}"
            )
        if not self.built:
            raise ValueError("Expected a built optimizer (after build() or a first fit()). Received: not built")
        if frozen:
            _freeze.freeze(self, target=None, lr_scale=float(lr_scale))
        else:
            _freeze.release(self)

    # -- stepping ----------------------------------------------------------------------
    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        """Inner update, then the prox of each claimed variable (and the controller, if any)."""
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "Expected trainable_variables on the first apply() (or call build() first). "
                    "Received: trainable_variables=None"
                )
            self._building_in_step = True  # this step's loss already holds the terms
            self.build(list(trainable_variables))
            self._building_in_step = False
            self.built = True
        tvars = self._trainable_variables if trainable_variables is None else list(trainable_variables)
        grads = list(grads)
        slots = [self._slot_of.get(self._get_variable_index(v)) for v in tvars]
        grads = self._remove_traced_penalty(grads, tvars, slots)
        # A fixed support (after TargetSparsity's freeze_step or freeze_support()): the zeros'
        # gradients are masked and the zeros re-imposed after the step; no prox. Before it the
        # masks are ones (an exact no-op) and the flag 0, so one graph serves both phases. Eager
        # torch knows the flag on the host and leaves the masks out of an unfrozen step.
        host = _freeze.host_frozen(self)
        masked = host is None or host
        frozen = _read(self._frozen) > 0 if masked else None
        if masked:
            grads = [g * ops.cast(_read(self._masks[k]), g.dtype) if k in self._masks and g is not None else g
                     for k, g in zip(slots, grads, strict=True)]
        lr = ops.cast(self.inner_optimizer.learning_rate, "float32")  # before the update moves the schedule
        active = [(k, v) for k, g, v in zip(slots, grads, tvars, strict=True) if k is not None and g is not None]
        if self.mode == "latent":
            for k, v in active:  # γ = 0: not started; frozen: the shown weights train
                use = _read(self._gammas[k]) > 0
                use = ops.logical_and(use, ops.logical_not(frozen)) if masked else use
                v.assign(ops.cast(ops.where(use, _read(self._latents[k]), _read(v)), v.dtype))
        with _fine_tune.scaled_learning_rate(self, frozen, host):  # fine_tune_scale while frozen
            self.inner_optimizer.apply(grads, tvars)
        scale = ops.exp(_read(self._log_scale))
        for k, v in active:
            if host:  # eager torch, support fixed: what the masked branch below keeps, without the prox
                if k in self._masks:
                    v.assign(_read(v) * ops.cast(_read(self._masks[k]), v.dtype))
                if self.mode == "latent":
                    self._latents[k].assign(ops.copy(_read(v)))
                continue
            reg = self._regs[k]
            m = scale if reg.makes_zeros else 1.0
            if self.mode == "latent":
                self._latents[k].assign(ops.copy(_read(v)))  # a copy: on JAX assign would share v's buffer
                gamma = _read(self._gammas[k]) + lr
                self._gammas[k].assign(ops.where(frozen, _read(self._gammas[k]), gamma) if masked else gamma)
                step = ops.cast(gamma * m, v.dtype)
            else:
                step = self._step(k, v, lr) * ops.cast(m, v.dtype)
            new = _display.show(self, k, _read(v), step) if self.mode == "latent" else reg.prox(_read(v), step)
            if masked:
                new = ops.where(frozen, _read(v), new)
                if k in self._masks:
                    new = new * ops.cast(_read(self._masks[k]), new.dtype)
            v.assign(new)
        if self._control is not None:
            _control.update(self, self._control)
            _fine_tune.follow(self, _freeze.host_frozen(self))  # the average, after the freeze if it came now

    def _remove_traced_penalty(self, grads: list, tvars: list, slots: list) -> list:
        """Gradients without the prox terms that the loss of this very step still held.

        TensorFlow builds optimizers lazily, inside the first traced train step,
        after the loss (with the regularizer's value) was traced: that graph keeps
        the term. Its gradient is taken back out here, in the same graph.
        """
        out = []
        for k, g, v in zip(slots, grads, tvars, strict=True):
            if k is not None and g is not None and getattr(v, "_sparsecraft_in_loss", False):
                g = g - ops.cast(self._regs[k].gradient(ops.convert_to_tensor(v)), g.dtype)
            out.append(g)
        for v in tvars:
            if getattr(v, "_sparsecraft_in_loss", False):
                v._sparsecraft_in_loss = False
        return out

    def _step(self, k: int, v: Any, lr: Any) -> Any:
        """The step the inner optimizer used for the variable of slot ``k``: scalar or per coordinate."""
        dtype = keras.backend.standardize_dtype(v.dtype)
        lr = ops.cast(lr, dtype)
        inner, family = self.inner_optimizer, self._family
        if family in (None, "SGD"):
            return lr
        # Adam: ε outside the root; Adagrad, RMSprop: Keras divides by sqrt(v − ḡ² + ε).
        denominator = _display.denominator(self, self._floored(k, _display.moment_root(self, k, dtype)))
        if family == "Adam":
            t = ops.cast(inner.iterations, dtype)  # already incremented: the step just taken
            lr = lr * ops.sqrt(1.0 - ops.power(ops.cast(inner.beta_2, dtype), t))
        return lr / denominator

    def _floored(self, k: int, root: Any) -> Any:
        if self.floor == 0:
            return root
        ref = ops.maximum(_read(self._typical[k]), ops.cast(ops.mean(root), "float32"))
        self._typical[k].assign(ref)
        return ops.maximum(root, ops.cast(ref * self.floor, root.dtype))

    def count_zeros(self) -> Any:
        """Exact zeros over the zero-making prox variables, as a float32 tensor (no host sync)."""
        total = ops.convert_to_tensor(0.0, "float32")
        for k, i in enumerate(self._slots):
            if self._regs[k].makes_zeros:
                total = total + count_zeros(_read(self._trainable_variables[i]))
        return total

    # -- serialization -----------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "mode": self.mode,
            "floor": self.floor,
            "relaxed": self.relaxed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> ProximalOptimizer:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)

    def __repr__(self) -> str:
        n = len(self._slots) if self.built else "?"
        return f"ProximalOptimizer({type(self.inner_optimizer).__name__}, mode={self.mode!r}, {n} prox variables)"
