"""Adapter for Google's reference Distributed Shampoo (benchmarks only).

The reference lives in the public repository ``google-research/precondition``
(``precondition/distributed_shampoo.py``). None of its code is vendored here:
the user checks it out anywhere and passes the checkout's root directory
(the one that contains the ``precondition/`` package), e.g.::

    # PATH: a checkout of the public repository google-research/precondition
    python -m benchmarks.run --reference-path /tmp/precondition

``load_reference(path)`` imports ``distributed_shampoo`` from that checkout and
``reference_optimizer(learning_rate, **options)`` builds it from *our*
option names (those of ``shampoo_optax.shampoo``), so both optimizers can be
run from one options dict.

Option mapping (ours -> reference ``distributed_shampoo`` keyword). The
adapter's fallback defaults copy ``shampoo_optax.shampoo``'s at the time of
writing; ``benchmarks.run`` passes ``shampoo``'s current defaults explicitly
(``run.shampoo_defaults()``), so the reference is configured like ours:

================================  =============================================
``learning_rate``                 ``learning_rate`` (float or schedule; the
                                  reference applies ``-lr`` itself, like
                                  ``optax.adamw``)
``block_size``                    ``block_size``
``b1``                            ``beta1``
``b2``                            ``beta2`` (statistics *and* grafting)
``matrix_eps``                    ``matrix_epsilon``, with
                                  ``relative_matrix_epsilon=True`` (ridge
                                  relative to the largest eigenvalue)
``graft``                         ``graft_type``: ``"adam"``, ``"rmsprop"`` ->
                                  ``RMSPROP``; ``"adam_normalized"``,
                                  ``"rmsprop_normalized"`` ->
                                  ``RMSPROP_NORMALIZED``; ``"adagrad"`` ->
                                  ``ADAGRAD``; ``"adagrad_normalized"`` ->
                                  ``ADAGRAD_NORMALIZED``; ``"sgd"`` -> ``SGD``;
                                  ``"sign"``, ``"sqrt_n"`` -> ``SQRT_N``;
                                  ``"none"`` -> ``NONE``. The reference's
                                  RMSProp grafting has **no bias correction**
                                  (ours, ``"adam"``, has): its first updates
                                  are up to ``1/sqrt(1-b2)`` (31x at 0.999)
                                  larger. ``"sgd_normalized"``: none.
``graft_eps``                     ``diagonal_epsilon``
``graft_b2``                      none (must be ``None`` or equal ``b2``)
``precondition_every``            ``preconditioning_compute_steps``
``statistics_every``              ``statistics_compute_steps``
``start_preconditioning_step``    ``start_preconditioning_step``
``root_method``                   ``eigh``: ``"eigh"`` -> ``True``;
                                  ``"newton"``, ``"coupled_newton"``,
                                  ``"auto"`` -> ``False`` (the reference's
                                  default, coupled Newton)
``exponent_override``             ``exponent_override`` (``None`` -> ``0``)
``nesterov``                      ``nesterov``
``heavy_ball``                    ``moving_average_for_momentum = not
                                  heavy_ball``. Ours defaults to the average
                                  ``m = b1 m + (1-b1) u``; the reference's own
                                  default is heavy ball, ``m = b1 m + u``,
                                  i.e. ``1/(1-b1)`` (10x) larger steps.
``max_precondition_dim``          ``skip_preconditioning_dim_size_gt``
                                  (compared with whole dims there, with
                                  blocks' sides here: they agree while no
                                  dim exceeds both it and ``block_size``)
``max_root_error``                ``inverse_failure_threshold`` (only when
                                  given; reference default 0.1)
``weight_decay``                  ``weight_decay`` with
                                  ``decoupled_weight_decay=True`` (AdamW-style
                                  ``-lr * wd * param``)
``mask``                          no equivalent; emulated by chaining a masked
                                  decoupled weight decay
                                  (``-lr(t) * wd * param``) after it
``skip_nonfinite``, ``mu_dtype``  ignored (no equivalent; the reference keeps
                                  float32 momentum and has no NaN guard)
``shard_axes``                    must be ``None`` (use the reference's own
                                  options via ``**native``)
================================  =============================================

Any other keyword is passed through unchanged, so reference-native options
(``skip_preconditioning_dim_size_gt``, ``inverse_failure_threshold``, ...)
can still be set. The adapter fixes ``generate_training_metrics=False``
(metrics only cost memory here) unless overridden.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

_LOADED: dict[str, Any] = {}

_GRAFT_NAMES = {
    "adam": "RMSPROP",
    "rmsprop": "RMSPROP",
    "adam_normalized": "RMSPROP_NORMALIZED",
    "rmsprop_normalized": "RMSPROP_NORMALIZED",
    "adagrad": "ADAGRAD",
    "adagrad_normalized": "ADAGRAD_NORMALIZED",
    "sgd": "SGD",
    "sign": "SQRT_N",
    "sqrt_n": "SQRT_N",
    "none": "NONE",
}

_ROOT_METHODS = {
    "eigh": True,
    "newton": False,
    "coupled_newton": False,
    "auto": False,
    None: False,
}


def load_reference(path: Optional[str]) -> Optional[Callable[..., Any]]:
  """Imports ``distributed_shampoo`` from a checkout of google-research/precondition.

  Args:
    path: root of the checkout (the directory containing ``precondition/``),
      or the ``precondition/`` package directory itself, or ``None``.

  Returns:
    The ``distributed_shampoo`` function, or ``None`` when ``path`` is None.

  Raises:
    FileNotFoundError: ``path`` does not contain the reference.
  """
  if path is None:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.basename(path) == "precondition" and os.path.isfile(
      os.path.join(path, "distributed_shampoo.py")):
    path = os.path.dirname(path)
  if not os.path.isfile(
      os.path.join(path, "precondition", "distributed_shampoo.py")):
    raise FileNotFoundError(
        f"{path} has no precondition/distributed_shampoo.py; pass the root of a"
        " checkout of the public repository google-research/precondition")
  if path not in sys.path:
    sys.path.insert(0, path)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    module = importlib.import_module("precondition.distributed_shampoo")
  _LOADED["module"] = module
  _LOADED["path"] = path
  return module.distributed_shampoo


def reference_module():
  """The imported ``precondition.distributed_shampoo`` module (after loading)."""
  if "module" not in _LOADED:
    raise RuntimeError("call load_reference(path) first")
  return _LOADED["module"]


def _masked_decoupled_weight_decay(learning_rate, weight_decay, mask):
  """``u <- u - lr(t) * wd * p`` on the leaves selected by ``mask``."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params):
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    updates = jax.tree.map(lambda u, p: u - lr * weight_decay * p, updates,
                           params)
    return updates, optax.ScaleByScheduleState(
        count=optax.safe_increment(state.count))

  return optax.masked(optax.GradientTransformation(init_fn, update_fn), mask)


def reference_optimizer(
    learning_rate,
    *,
    block_size: int = 128,
    b1: float = 0.9,
    b2: float = 0.999,
    matrix_eps: float = 1e-6,
    graft: Optional[str] = "adam",
    graft_eps: float = 1e-8,
    graft_b2: Optional[float] = None,
    precondition_every: int = 20,
    statistics_every: int = 1,
    start_preconditioning_step: int = 1,
    root_method: Optional[str] = "auto",
    exponent_override: Optional[int] = None,
    nesterov: bool = False,
    heavy_ball: bool = False,
    max_precondition_dim: int = 4096,
    max_root_error: Optional[float] = None,
    skip_nonfinite: bool = True,
    shard_axes: Any = None,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    mask: Any = None,
    **native: Any,
) -> optax.GradientTransformation:
  """The reference Distributed Shampoo, configured with our option names.

  The returned transformation needs ``params`` in ``update`` (as AdamW does)
  and already includes ``-learning_rate``: apply its updates with
  ``optax.apply_updates``. Requires ``load_reference(path)`` first.

  Args:
    learning_rate: float or optax schedule.
    block_size, ..., mask: as in ``shampoo_optax.shampoo`` (same names and
      defaults); see the module docstring for how each maps onto the
      reference and which have no equivalent.
    **native: passed unchanged to ``distributed_shampoo``.
  """
  mod = reference_module()
  graft_key = "none" if graft is None else str(graft).lower()
  if graft_key not in _GRAFT_NAMES:
    raise ValueError(f"graft {graft!r} has no reference equivalent; one of "
                     f"{sorted(_GRAFT_NAMES)}")
  if graft_b2 is not None and graft_b2 != b2:
    raise ValueError("the reference grafts with beta2 = b2; graft_b2 != b2 "
                     "has no equivalent")
  if shard_axes is not None:
    raise ValueError("shard_axes: use the reference's own pjit options "
                     "(shard_optimizer_states, ...) via **native")
  del skip_nonfinite, mu_dtype  # no equivalent; the reference keeps f32
  if root_method not in _ROOT_METHODS:
    raise ValueError(f"root_method {root_method!r} has no reference "
                     f"equivalent; one of {list(_ROOT_METHODS)}")
  kwargs = dict(
      learning_rate=learning_rate,
      block_size=block_size,
      beta1=b1,
      beta2=b2,
      diagonal_epsilon=graft_eps,
      matrix_epsilon=matrix_eps,
      relative_matrix_epsilon=True,
      weight_decay=weight_decay if mask is None else 0.0,
      decoupled_weight_decay=True,
      start_preconditioning_step=start_preconditioning_step,
      preconditioning_compute_steps=precondition_every,
      statistics_compute_steps=statistics_every,
      skip_preconditioning_dim_size_gt=max_precondition_dim,
      graft_type=getattr(mod.GraftingType, _GRAFT_NAMES[graft_key]),
      nesterov=nesterov,
      exponent_override=0 if exponent_override is None else exponent_override,
      moving_average_for_momentum=not heavy_ball,
      eigh=_ROOT_METHODS[root_method],
      generate_training_metrics=False,
  )
  if max_root_error is not None:
    kwargs["inverse_failure_threshold"] = max_root_error
  kwargs.update(native)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt = mod.distributed_shampoo(**kwargs)
  opt = _quiet(opt)
  if mask is not None and weight_decay:
    opt = optax.chain(
        opt, _masked_decoupled_weight_decay(learning_rate, weight_decay, mask))
  return opt


def _quiet(opt: optax.GradientTransformation) -> optax.GradientTransformation:
  """Silences the reference's float64-truncation warnings during tracing."""

  def init_fn(params):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return opt.init(params)

  def update_fn(updates, state, params=None):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return opt.update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)
