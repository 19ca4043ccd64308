"""Time-to-target benchmark: AdamW, shampoo_optax (shampoo, soap), peers.

    python -m benchmarks.run [--quick] [--workloads fmnist_mlp char_lm ...]
        [--optimizers adamw shampoo soap reference muon kron pro] [--seeds 3]
        [--reference-path PATH] [--out benchmarks/results] [--resume]

Protocol (see benchmarks/README.md):

1. Sweep: for each workload and optimizer, a learning-rate sweep of the same
   size (3 log-spaced peak values by default), seed 0, all with the same
   warmup + cosine schedule and the same batch sequence. All runs of a
   workload advance in turn, ``eval_every`` steps at a time, in this one
   process, so machine noise is shared.
2. Seeds: the best setting of each optimizer is rerun with seeds 1..S-1
   (seed = init + batch order), for the spread of the headline numbers.
3. Step time: one instance of each optimizer is timed in rounds that
   alternate between the optimizers (one ``precondition_every`` cycle each
   per round); refresh steps (where the roots are recomputed) are found as
   the slow phase of the cycle. Ratios to AdamW are reported for normal
   steps, refresh steps and the amortized mean.

The peers (``muon``, ``kron``, ``pro``; see ``benchmarks/_peers.py``) follow
the same protocol. A peer that cannot be built or compiled for a workload, or
whose step or compilation makes no progress for ``--peer-timeout`` seconds,
gets a ``failed: <reason>`` row; a stalled step cannot be interrupted, so the
run then restarts itself with ``--resume`` (finished workloads are kept, the
current one is rerun without that peer).

Wall-clock seconds are training seconds (each step is blocked on), excluding
compilation and evaluation; compile time is reported separately. Results go
to ``<out>/<quick|full>/``: ``results.json`` (everything, with curves),
``summary.csv``, ``runs.csv``, and ``<workload>.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.metadata
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _peers
from benchmarks import _reference
from benchmarks import workloads as workloads_lib

# The default selection; the peers run when asked for with --optimizers.
OPTIMIZERS = ("adamw", "shampoo", "soap", "reference")
CHOICES = OPTIMIZERS + _peers.PEERS

# What the main thread is doing, for the watchdog: (description, start time,
# (workload, optimizer, detail) when the optimizer is a peer, else None).
_CURRENT: list = [None, 0.0, None]


def _busy(workload: str, name: str, detail: str):
  _CURRENT[:] = [f"{workload} {name} {detail}", time.perf_counter(),
                 (workload, name, detail) if name in _peers.PEERS else None]


def _idle():
  _CURRENT[0] = None


def _watchdog(limit_seconds: float, peer_limit_seconds: float, on_peer_stall):
  """Reports (once per stall) a step that runs longer than ``limit_seconds``.

  A peer's step or compilation that runs longer than ``peer_limit_seconds``
  calls ``on_peer_stall(workload, optimizer, reason)``, which does not return.
  """
  import faulthandler  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel

  def loop():
    reported = None
    while True:
      time.sleep(min(30.0, limit_seconds / 4, peer_limit_seconds / 4))
      what, since, peer = _CURRENT
      if (what is not None and peer is not None
          and time.perf_counter() - since > peer_limit_seconds):
        print(f"[watchdog] {what}: no progress for "
              f"{time.perf_counter() - since:.0f}s; stacks:", flush=True)
        faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
        sys.stdout.flush()
        workload, name, detail = peer
        on_peer_stall(workload, name, f"stalled at {detail}: no progress in "
                      f"{peer_limit_seconds:.0f}s (--peer-timeout)")
      if what is not None and time.perf_counter() - since > limit_seconds:
        if reported != (what, since):
          reported = (what, since)
          print(f"[watchdog] {what} has run for "
                f"{time.perf_counter() - since:.0f}s; stacks:", flush=True)
          faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
          sys.stdout.flush()
        if time.perf_counter() - since > 3 * limit_seconds:
          print(f"[watchdog] {what}: no progress for "
                f"{3 * limit_seconds:.0f}s, giving up (results written so "
                "far are kept)", flush=True)
          os._exit(3)  # pylint: disable=protected-access

  threading.Thread(target=loop, daemon=True).start()


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  versions = {}
  for mod in ("jax", "jaxlib", "optax", "flax", "numpy"):
    try:
      versions[mod] = __import__(mod).__version__
    except Exception:  # pylint: disable=broad-except
      versions[mod] = None
  try:
    versions["distributed_kron"] = importlib.metadata.version(
        "distributed-kron")
  except importlib.metadata.PackageNotFoundError:
    versions["distributed_kron"] = None
  try:
    import shampoo_optax  # pylint: disable=import-outside-toplevel
    versions["shampoo_optax"] = shampoo_optax.__version__
  except Exception:  # pylint: disable=broad-except
    versions["shampoo_optax"] = None
  return dict(
      cpu_model=cpu,
      cpu_count=os.cpu_count(),
      affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
      else None,
      backend=jax.default_backend(),
      devices=[str(d) for d in jax.devices()],
      python=platform.python_version(),
      platform=platform.platform(),
      load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
      openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
      pjrt_nproc=os.environ.get("PJRT_NPROC"),
      xla_flags=os.environ.get("XLA_FLAGS"),
      **{f"{k}_version": v for k, v in versions.items()},
  )


def git_info() -> dict[str, Any]:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=root, capture_output=True,
                            text=True, timeout=10).stdout.strip()
    except Exception:  # pylint: disable=broad-except
      return ""
  commit = git("rev-parse", "HEAD")
  return dict(commit=commit or None,
              dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
              )


# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------


def _shampoo_fn(name: str = "shampoo"):
  """``shampoo_optax.shampoo`` or ``.soap``, or None if it does not import."""
  try:
    import shampoo_optax  # pylint: disable=import-outside-toplevel
    return getattr(shampoo_optax, name)
  except Exception as e:  # pylint: disable=broad-except
    print(f"[run] shampoo_optax not importable ({type(e).__name__}: {e}); "
          f"skipping {name}", flush=True)
    return None


def shampoo_defaults() -> dict[str, Any]:
  """``shampoo_optax.shampoo``'s defaults for the options the reference maps.

  The reference is then configured like our defaults (whatever they are at
  the time of the run), not like the adapter's hard-coded fallbacks.
  """
  fn = _shampoo_fn()
  if fn is None:
    return {}
  ours = inspect.signature(fn).parameters
  theirs = inspect.signature(_reference.reference_optimizer).parameters
  skip = {"learning_rate", "weight_decay", "mask", "shard_axes", "mu_dtype",
          "skip_nonfinite", "graft_b2"}
  return {k: v.default for k, v in ours.items()
          if k in theirs and k not in skip
          and v.default is not inspect.Parameter.empty}


def precondition_every(name: str, options: dict[str, Any]) -> int:
  """The refresh period of an optimizer (1 for AdamW and the peers)."""
  if name == "adamw" or name in _peers.PEERS:
    return 1
  if "precondition_every" in options:
    return int(options["precondition_every"])
  if name in ("shampoo", "soap"):
    fn = _shampoo_fn(name)
    return int(inspect.signature(fn).parameters["precondition_every"].default)
  return int(inspect.signature(_reference.reference_optimizer)
             .parameters["precondition_every"].default)


def make_optimizer(name: str, learning_rate, weight_decay: float,
                   options: dict[str, Any]) -> optax.GradientTransformation:
  """``learning_rate`` may be a (traced) schedule."""
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=weight_decay, **options)
  if name in ("shampoo", "soap"):
    return _shampoo_fn(name)(learning_rate, weight_decay=weight_decay,
                             **options)
  if name == "reference":
    return _reference.reference_optimizer(
        learning_rate, weight_decay=weight_decay, **options)
  if name in _peers.PEERS:
    return _peers.make(name, learning_rate, weight_decay, options)
  raise ValueError(name)


def tree_bytes(tree) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


class Trainer:
  """One compiled train step of one optimizer on one workload.

  The peak learning rate is an argument of the step (the schedule's shape is
  static), so one compilation serves a whole learning-rate sweep.
  """

  def __init__(self, workload, name, options):
    self.workload, self.name, self.options = workload, name, dict(options)
    w = workload
    unit = workloads_lib.schedule(1.0, w.steps, w.warmup_fraction)

    def opt_for(peak_lr):
      return make_optimizer(name, lambda c: peak_lr * unit(c), w.weight_decay,
                            self.options)

    self._opt_for = opt_for

    def step(params, state, batch, peak_lr):
      loss, grads = jax.value_and_grad(w.loss_fn)(params, batch)
      updates, state = opt_for(peak_lr).update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    self._step = jax.jit(step)
    self._init = jax.jit(opt_for(jnp.float32(1.0)).init)
    self.compiled = None
    self.compile_seconds = None

  def init(self, params):
    return self._init(params)

  def compile(self, params, state, batch):
    t0 = time.perf_counter()
    lowered = self._step.lower(params, state, batch, jnp.float32(1.0))
    self.compiled = lowered.compile()
    self.compile_seconds = time.perf_counter() - t0
    return self.compile_seconds

  def __call__(self, params, state, batch, peak_lr):
    return self.compiled(params, state, batch, jnp.float32(peak_lr))


@dataclasses.dataclass
class Run:
  """One training run (optimizer, peak lr, seed) with its history."""

  trainer: Trainer
  lr: float
  seed: int
  step: int = 0
  params: Any = None
  state: Any = None
  batches: Any = None
  train_seconds: float = 0.0
  diverged: bool = False
  losses: list = dataclasses.field(default_factory=list)
  step_seconds: list = dataclasses.field(default_factory=list)
  evals: list = dataclasses.field(default_factory=list)

  def start(self):
    w = self.trainer.workload
    self.params = w.init_params(self.seed)
    self.state = self.trainer.init(self.params)
    self.batches = w.batches(self.seed)

  @property
  def done(self):
    return self.diverged or self.step >= self.trainer.workload.steps

  def advance(self, n):
    w = self.trainer.workload
    for _ in range(n):
      if self.done:
        return
      batch = next(self.batches)
      _busy(w.name, self.trainer.name,
            f"lr={self.lr:g} seed={self.seed} step={self.step + 1}")
      t0 = time.perf_counter()
      params, state, loss = self.trainer(self.params, self.state, batch,
                                         self.lr)
      jax.block_until_ready((params, state, loss))
      dt = time.perf_counter() - t0
      _idle()
      self.params, self.state = params, state
      self.step += 1
      self.train_seconds += dt
      loss = float(loss)
      self.losses.append(loss)
      self.step_seconds.append(dt)
      if not math.isfinite(loss):
        self.diverged = True
      if self.step % w.eval_every == 0 or self.step == w.steps or self.diverged:
        metrics = ({w.metric: float("nan")} if self.diverged
                   else w.eval_fn(self.params))
        self.evals.append(dict(step=self.step, seconds=self.train_seconds,
                               **metrics))
      if self.diverged:
        return

  # -- summaries ------------------------------------------------------------

  def final_metric(self):
    w = self.trainer.workload
    if self.diverged or not self.evals:
      return float("nan")
    return self.evals[-1][w.metric]

  def to_target(self, target):
    w = self.trainer.workload
    for e in self.evals:
      v = e[w.metric]
      if math.isfinite(v) and w.reached(v, target):
        return e["step"], e["seconds"]
    return None, None

  def summary(self):
    w = self.trainer.workload
    out = dict(workload=w.name, optimizer=self.trainer.name, lr=self.lr,
               seed=self.seed, steps=self.step, diverged=self.diverged,
               final_metric=self.final_metric(),
               final_train_loss=float(np.mean(self.losses[-20:]))
               if self.losses else float("nan"),
               train_seconds=self.train_seconds)
    for t in w.targets:
      s, sec = self.to_target(t)
      out[f"steps_to_{t}"] = s
      out[f"seconds_to_{t}"] = sec
    return out

  def record(self):
    return dict(self.summary(), losses=self.losses,
                step_seconds=self.step_seconds, evals=self.evals)


def _rank_key(run: Run):
  """Best run first: more targets reached, then fewer steps, better final."""
  w = run.trainer.workload
  reached = [run.to_target(t)[0] for t in w.targets]
  n = sum(s is not None for s in reached)
  last = next((s for s in reversed(reached) if s is not None), math.inf)
  final = run.final_metric()
  if not math.isfinite(final):
    final = -math.inf if w.higher_is_better else math.inf
  return (-n, last, -final if w.higher_is_better else final)


def train_round_robin(runs: list[Run], label: str):
  """Advances all runs ``eval_every`` steps at a time, in turn."""
  if not runs:
    return
  w = runs[0].trainer.workload
  t0 = time.perf_counter()
  while not all(r.done for r in runs):
    for r in runs:
      r.advance(w.eval_every)
    step = max(r.step for r in runs)
    if step % (w.eval_every * 4) == 0 or all(r.done for r in runs):
      line = "  ".join(
          f"{r.trainer.name}@{r.lr:g}/s{r.seed}:"
          + ("DIVERGED" if r.diverged else
             f"{r.evals[-1][w.metric]:.4f}" if r.evals else "-")
          for r in runs)
      print(f"[{w.name} {label}] step {step}/{w.steps} "
            f"({time.perf_counter() - t0:.0f}s)  {line}", flush=True)


# ---------------------------------------------------------------------------
# Interleaved step timing
# ---------------------------------------------------------------------------


def time_interleaved(workload, trainers: dict[str, Trainer], lrs, rounds: int,
                     options: dict[str, dict]) -> dict[str, Any]:
  """Times each trainer, alternating cycles between them in one process."""
  periods = {n: precondition_every(n, options[n]) for n in trainers}
  cycle = int(np.lcm.reduce(list(periods.values()) or [1]))
  cycle = max(cycle, 2)
  starts = [int(options[n].get("start_preconditioning_step", 1))
            for n in trainers if n != "adamw"]
  warm = max(starts + [0]) + cycle
  it = workload.batches(12345)
  batches = [next(it) for _ in range(cycle)]
  state = {}
  for n, tr in trainers.items():
    p = workload.init_params(0)
    s = tr.init(p)
    for i in range(warm):
      _busy(workload.name, n, f"timing warmup step {i + 1}")
      p, s, _ = tr(p, s, batches[i % cycle], lrs[n])
      jax.block_until_ready((p, s))
    _idle()
    state[n] = (p, s, warm)
  times = {n: [] for n in trainers}      # (count before step, seconds)
  for _ in range(rounds):
    for n, tr in trainers.items():
      p, s, c = state[n]
      for i in range(cycle):
        _busy(workload.name, n, f"timing step {c + 1}")
        t0 = time.perf_counter()
        p, s, loss = tr(p, s, batches[i], lrs[n])
        jax.block_until_ready((p, s, loss))
        times[n].append((c, time.perf_counter() - t0))
        _idle()
        c += 1
      state[n] = (p, s, c)
  out = {}
  for n, ts in times.items():
    k = periods[n]
    secs = np.array([t for _, t in ts])
    phase = np.array([c % k for c, _ in ts])
    medians = np.array([np.median(secs[phase == j]) for j in range(k)])
    refresh_phase = int(np.argmax(medians)) if k > 1 else None
    if k > 1:
      normal = secs[phase != refresh_phase]
      refresh = secs[phase == refresh_phase]
    else:
      normal, refresh = secs, np.array([])
    out[n] = dict(
        precondition_every=k,
        refresh_phase=refresh_phase,
        normal_median=float(np.median(normal)),
        normal_p10=float(np.percentile(normal, 10)),
        normal_p90=float(np.percentile(normal, 90)),
        refresh_median=float(np.median(refresh)) if refresh.size else None,
        amortized_mean=float(secs.mean()),
        n_steps=int(secs.size),
    )
  base = out.get("adamw")
  if base:
    for n, r in out.items():
      r["ratio_normal"] = r["normal_median"] / base["normal_median"]
      r["ratio_refresh"] = (r["refresh_median"] / base["normal_median"]
                            if r["refresh_median"] is not None else None)
      r["ratio_amortized"] = r["amortized_mean"] / base["amortized_mean"]
  return out


# ---------------------------------------------------------------------------
# Aggregation, output
# ---------------------------------------------------------------------------


def _stats(values):
  vals = [v for v in values if v is not None and math.isfinite(v)]
  if not vals:
    return dict(mean=None, std=None, min=None, max=None, n=0,
                of=len(values))
  return dict(mean=float(np.mean(vals)), std=float(np.std(vals)),
              min=float(np.min(vals)), max=float(np.max(vals)), n=len(vals),
              of=len(values))


def summarize(workload, sweep: dict[str, list[Run]],
              seeds: dict[str, list[Run]], timing, trainers) -> dict[str, Any]:
  """One entry per optimizer that ran (see ``run_workload`` for failures)."""
  out = {}
  for name, runs in sweep.items():
    best = sorted(runs, key=_rank_key)[0]
    head = [best] + seeds.get(name, [])
    tr = trainers[name]
    p = workload.init_params(0)
    entry = dict(
        best_lr=best.lr,
        sweep=[r.summary() for r in runs],
        seeds=[r.seed for r in head],
        final_metric=_stats([r.final_metric() for r in head]),
        compile_seconds=tr.compile_seconds,
        state_bytes=tree_bytes(jax.eval_shape(tr.init, p)),
        param_bytes=tree_bytes(p),
        options=tr.options,
    )
    entry["state_over_param_bytes"] = entry["state_bytes"] / entry[
        "param_bytes"]
    for t in workload.targets:
      entry[f"steps_to_{t}"] = _stats([r.to_target(t)[0] for r in head])
      entry[f"seconds_to_{t}"] = _stats([r.to_target(t)[1] for r in head])
    if timing and name in timing:
      entry["timing"] = timing[name]
    out[name] = entry
  return out


def _fmt(st, digits=0, unit=""):
  if st is None or st.get("mean") is None:
    return f"-- (0/{st['of']})" if st else "--"
  m = f"{st['mean']:.{digits}f}{unit}"
  if st["of"] > 1:
    m += f" ±{st['std']:.{digits}f}"
  if st["n"] < st["of"]:
    m += f" ({st['n']}/{st['of']})"
  return m


def table(workload, summary) -> str:
  t = workload.targets
  head = (["optimizer", "best lr"] + [f"steps to {x}" for x in t]
          + [f"sec to {x}" for x in t]
          + [f"final {workload.metric}", "step ratio normal/refresh/amort",
             "compile s", "state/param bytes"])
  rows = [head]
  for name, e in summary.items():
    if "failed" in e:
      reason = " ".join(e["failed"].replace("|", "/").split())
      reason = reason if len(reason) <= 120 else reason[:117] + "..."
      rows.append([name, f"failed: {reason}"] + ["--"] * (len(head) - 2))
      continue
    tm = e.get("timing") or {}
    ratio = "--"
    if "ratio_normal" in tm:
      rr = tm["ratio_refresh"]
      ratio = (f"{tm['ratio_normal']:.2f} / "
               f"{'--' if rr is None else f'{rr:.1f}'} / "
               f"{tm['ratio_amortized']:.2f}")
    rows.append([name, f"{e['best_lr']:g}"]
                + [_fmt(e[f"steps_to_{x}"]) for x in t]
                + [_fmt(e[f"seconds_to_{x}"], 1) for x in t]
                + [_fmt(e["final_metric"], 4), ratio,
                   f"{e['compile_seconds']:.1f}",
                   f"{e['state_over_param_bytes']:.2f}"])
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  lines = ["| " + " | ".join(c.ljust(wd) for c, wd in zip(r, widths)) + " |"
           for r in rows]
  lines.insert(1, "|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
  return "\n".join(lines)


def plot(workload, sweep, seeds, summary, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  colors = {"adamw": "tab:blue", "shampoo": "tab:red", "soap": "tab:pink",
            "reference": "tab:green", "muon": "tab:purple",
            "kron": "tab:orange", "pro": "tab:brown"}
  for name, runs in sweep.items():
    best_lr = summary[name]["best_lr"]
    head = [r for r in runs if r.lr == best_lr][:1] + seeds.get(name, [])
    c = colors.get(name)
    label = f"{name} lr={best_lr:g} ({len(head)} seed{'s' if len(head) > 1 else ''})"
    n = min(len(r.losses) for r in head)
    if n == 0:
      continue
    win = max(1, workload.steps // 50)
    kernel = np.ones(win) / win
    sm = np.stack([np.convolve(np.asarray(r.losses[:n]), kernel, "valid")
                   for r in head])
    x_step = np.arange(win, n + 1)
    x_sec = np.mean([np.cumsum(r.step_seconds[:n])[win - 1:] for r in head],
                    axis=0)
    for ax, x in ((axes[0, 0], x_step), (axes[0, 1], x_sec)):
      ax.plot(x, sm.mean(0), color=c, label=label)
      if len(head) > 1:
        ax.fill_between(x, sm.min(0), sm.max(0), color=c, alpha=0.2)
    ne = min(len(r.evals) for r in head)
    ev = np.array([[e[workload.metric] for e in r.evals[:ne]] for r in head])
    es = np.array([e["step"] for e in head[0].evals[:ne]])
    esec = np.mean([[e["seconds"] for e in r.evals[:ne]] for r in head], 0)
    for ax, x in ((axes[1, 0], es), (axes[1, 1], esec)):
      ax.plot(x, ev.mean(0), color=c, marker=".", label=label)
      if len(head) > 1:
        ax.fill_between(x, ev.min(0), ev.max(0), color=c, alpha=0.2)
  for ax in axes[1]:
    for t in workload.targets:
      ax.axhline(t, color="gray", ls=":", lw=1)
  axes[0, 0].set(xlabel="step", ylabel="train loss (smoothed)",
                 yscale="log")
  axes[0, 1].set(xlabel="training seconds", ylabel="train loss (smoothed)",
                 yscale="log")
  axes[1, 0].set(xlabel="step", ylabel=workload.metric)
  axes[1, 1].set(xlabel="training seconds", ylabel=workload.metric)
  if workload.higher_is_better:
    lo = min(workload.targets) - 0.05
    for ax in axes[1]:
      ax.set_ylim(bottom=lo)
  else:
    hi = max(workload.targets) + 0.6
    for ax in axes[1]:
      ax.set_ylim(top=hi)
  for ax in axes.flat:
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(f"{workload.name}: {workload.description}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_csvs(out_dir, all_results):
  rows = []
  srows = []
  for wname, res in all_results.items():
    for name, e in res["summary"].items():
      if "failed" in e:
        srows.append(dict(workload=wname, optimizer=name, failed=e["failed"]))
        continue
      for r in e["sweep"]:
        rows.append(dict(r, phase="sweep"))
      for r in res["seed_runs"].get(name, []):
        rows.append(dict(r, phase="seed"))
      row = dict(workload=wname, optimizer=name, best_lr=e["best_lr"],
                 n_seeds=len(e["seeds"]),
                 final_metric_mean=e["final_metric"]["mean"],
                 final_metric_std=e["final_metric"]["std"],
                 compile_seconds=e["compile_seconds"],
                 state_over_param_bytes=e["state_over_param_bytes"])
      for k, v in e.items():
        if k.startswith(("steps_to_", "seconds_to_")):
          row[f"{k}_mean"] = v["mean"]
          row[f"{k}_std"] = v["std"]
          row[f"{k}_reached"] = f"{v['n']}/{v['of']}"
      for k in ("ratio_normal", "ratio_refresh", "ratio_amortized",
                "normal_median", "refresh_median", "amortized_mean"):
        row[k] = (e.get("timing") or {}).get(k)
      srows.append(row)
  for fname, rs in (("runs.csv", rows), ("summary.csv", srows)):
    keys = []
    for r in rs:
      keys += [k for k in r if k not in keys]
    with open(os.path.join(out_dir, fname), "w", newline="") as f:
      wr = csv.DictWriter(f, fieldnames=keys)
      wr.writeheader()
      wr.writerows(rs)


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def _failure(e: Exception) -> str:
  if isinstance(e, ImportError):
    return f"not installed ({e}); pip install -e '.[peers]'"
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}"


def run_workload(w, names, options, lrs_override, n_seeds, timing_rounds,
                 failed):
  """Runs the protocol for ``names``, except the peers in ``failed``.

  ``failed`` maps a peer to why it cannot run ``w`` (a stall recorded by an
  earlier attempt); a peer that raises while being built or compiled is added
  to it. The summary has a ``{"failed": reason}`` entry for each.
  """
  failed = dict(failed)
  trainers = {}
  sweep = {}
  lrs = {}
  for name in names:
    if name in failed:
      print(f"[{w.name}] {name}: {failed[name]}", flush=True)
      continue
    _busy(w.name, name, "init and compile")
    try:
      tr = Trainer(w, name, options[name])
      p = w.init_params(0)
      s = tr.init(p)
      batch = next(w.batches(0))
      secs = tr.compile(p, s, batch)
    except Exception as e:  # pylint: disable=broad-except
      if name not in _peers.PEERS:
        raise
      traceback.print_exc()
      failed[name] = _failure(e)
      print(f"[{w.name}] {name}: failed: {failed[name]}", flush=True)
      continue
    finally:
      _idle()
    print(f"[{w.name}] {name}: compiled in {secs:.1f}s, state "
          f"{tree_bytes(s) / tree_bytes(p):.2f}x param bytes", flush=True)
    trainers[name] = tr
    lrs[name] = tuple(lrs_override.get(name) or w.lrs.get(name) or
                      w.lrs["adamw"])
    sweep[name] = [Run(tr, lr, 0) for lr in lrs[name]]
  runs = [r for rs in sweep.values() for r in rs]
  for r in runs:
    r.start()
  train_round_robin(runs, "sweep")
  best = {n: sorted(rs, key=_rank_key)[0] for n, rs in sweep.items()}
  seeds = {n: [Run(trainers[n], best[n].lr, s) for s in range(1, n_seeds)]
           for n in trainers}
  seed_runs = [r for rs in seeds.values() for r in rs]
  for r in seed_runs:
    r.start()
  train_round_robin(seed_runs, "seeds")
  timing = None
  if timing_rounds > 0:
    print(f"[{w.name}] interleaved step timing ({timing_rounds} rounds)",
          flush=True)
    timing = time_interleaved(w, trainers, {n: best[n].lr for n in trainers},
                              timing_rounds, options)
  ran = summarize(w, sweep, seeds, timing, trainers)
  summary = {n: ran[n] if n in ran else dict(failed=failed[n]) for n in names}
  return sweep, seeds, summary


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="much smaller step budget, 1 seed by default")
  ap.add_argument("--workloads", nargs="+",
                  default=list(workloads_lib.WORKLOADS),
                  choices=list(workloads_lib.WORKLOADS))
  ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                  choices=CHOICES,
                  help="default: %(default)s; the peers muon, kron and pro "
                       "(benchmarks/_peers.py) run when listed here")
  ap.add_argument("--seeds", type=int, default=None,
                  help="seeds for the best setting (default 3; 1 with --quick)")
  ap.add_argument("--steps", type=int, default=None,
                  help="override every workload's step budget")
  ap.add_argument("--reference-path", default=None,
                  help="checkout of the public repository google-research/precondition")
  ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
  ap.add_argument("--tag", default=None,
                  help="results subdirectory (default: quick or full)")
  ap.add_argument("--fmnist-path", default=None)
  ap.add_argument("--shakespeare-path", default=None)
  ap.add_argument("--shampoo-options", default="{}",
                  help="JSON dict of shampoo_optax.shampoo keyword options")
  ap.add_argument("--soap-options", default="{}",
                  help="JSON dict of shampoo_optax.soap keyword options")
  ap.add_argument("--reference-options", default="{}",
                  help="JSON dict of reference options (our names, see "
                       "benchmarks/_reference.py); default: same as "
                       "--shampoo-options")
  ap.add_argument("--lrs", default="{}",
                  help='JSON {"adamw": [..], "shampoo": [..], ...} overriding '
                       "the per-workload sweeps")
  ap.add_argument("--peer-options", default="{}",
                  help='JSON {"muon": {..}, "kron": {..}, "pro": {..}} of '
                       "keyword options for the peers")
  ap.add_argument("--watchdog", type=float, default=600.0,
                  help="report a single step running longer than this (s)")
  ap.add_argument("--peer-timeout", type=float, default=300.0,
                  help="a peer whose step or compilation runs longer than "
                       "this (s) fails on that workload: the run restarts "
                       "itself with --resume without it")
  ap.add_argument("--resume", action="store_true",
                  help="keep the workloads already in <out>/<tag>/"
                       "results.json, and the peers recorded as stalled in "
                       "peer_failures.json there; run the other workloads")
  ap.add_argument("--timing-rounds", type=int, default=None,
                  help="interleaved timing rounds (default 8; 3 with --quick)")
  args = ap.parse_args(argv)
  argv_list = sys.argv[1:] if argv is None else list(argv)

  n_seeds = args.seeds or (1 if args.quick else 3)
  timing_rounds = (args.timing_rounds if args.timing_rounds is not None
                   else (3 if args.quick else 8))
  shampoo_options = json.loads(args.shampoo_options)
  reference_options = json.loads(args.reference_options) or dict(
      shampoo_options)
  if "reference" in args.optimizers:
    reference_options = {**shampoo_defaults(), **reference_options}
  lrs_override = json.loads(args.lrs)

  names = [n for n in args.optimizers]
  for name in ("shampoo", "soap"):
    if name in names and _shampoo_fn(name) is None:
      names.remove(name)
  if "reference" in names:
    if args.reference_path is None:
      names.remove("reference")
    else:
      _reference.load_reference(args.reference_path)
  peer_options = json.loads(args.peer_options)
  options = {"adamw": {}, "shampoo": shampoo_options,
             "soap": json.loads(args.soap_options),
             "reference": reference_options,
             **{p: peer_options.get(p, {}) for p in _peers.PEERS}}

  tag = args.tag or ("quick" if args.quick else "full")
  out_dir = os.path.join(args.out, tag)
  os.makedirs(out_dir, exist_ok=True)
  now = datetime.datetime.now(datetime.timezone.utc)
  meta = dict(
      started=now.isoformat(),
      argv=sys.argv if argv is None else argv,
      git=git_info(), machine=machine_info(), optimizers=names,
      n_seeds=n_seeds, options=options,
      reference_path=args.reference_path)
  print(json.dumps({k: meta[k] for k in ("git", "machine")}, indent=1),
        flush=True)

  results = {}
  tables = []
  t_all = time.perf_counter()
  failures_path = os.path.join(out_dir, "peer_failures.json")
  failures = {}       # workload -> {peer: why it stalled}
  results_path = os.path.join(out_dir, "results.json")
  if args.resume and os.path.exists(results_path):
    with open(results_path) as f:
      prev = json.load(f)
    results = {k: v for k, v in prev["workloads"].items()
               if k in args.workloads and "summary" in v and "table" in v}
    tables = [results[k]["table"] for k in args.workloads if k in results]
    started = datetime.datetime.fromisoformat(prev["meta"]["started"])
    meta["started"] = prev["meta"]["started"]
    meta["restarts"] = prev["meta"].get("restarts", []) + [now.isoformat()]
    t_all -= (now - started).total_seconds()
    print(f"[run] resuming: kept {sorted(results)}", flush=True)
  if args.resume and os.path.exists(failures_path):
    with open(failures_path) as f:
      failures = json.load(f)
  elif os.path.exists(failures_path):
    os.remove(failures_path)

  def on_peer_stall(workload, name, reason):
    failures.setdefault(workload, {})[name] = reason
    with open(failures_path, "w") as f:
      json.dump(failures, f, indent=1)
    print(f"[run] {workload} {name}: {reason}; restarting with --resume",
          flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.run"]
             + [a for a in argv_list if a != "--resume"] + ["--resume"])

  # Written before any workload runs, so that a restart (peer stall) finds
  # when the run started even if no workload has finished.
  _write(out_dir, meta, results, tables, n_seeds, t_all)
  _watchdog(args.watchdog, args.peer_timeout, on_peer_stall)
  for wname in args.workloads:
    if wname in results:
      continue
    kw = {}
    if wname.startswith("fmnist"):
      kw["data_path"] = args.fmnist_path
    else:
      kw["data_path"] = args.shakespeare_path
    w = workloads_lib.get(wname, quick=args.quick, steps=args.steps, **kw)
    t0 = time.perf_counter()
    try:
      sweep, seeds, summary = run_workload(w, names, options, lrs_override,
                                           n_seeds, timing_rounds,
                                           failures.get(wname, {}))
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      results[wname] = dict(error=traceback.format_exc())
      continue
    elapsed = time.perf_counter() - t0
    tab = table(w, summary)
    tables.append(f"### {wname} ({w.steps} steps; {w.description})\n\n{tab}\n")
    print(f"\n[{wname}] done in {elapsed:.0f}s\n{tab}\n", flush=True)
    plot(w, sweep, seeds, summary, os.path.join(out_dir, f"{wname}.png"))
    results[wname] = dict(
        description=w.description, steps=w.steps, metric=w.metric,
        targets=list(w.targets), eval_every=w.eval_every,
        weight_decay=w.weight_decay, elapsed_seconds=elapsed,
        summary=summary, table=tables[-1],
        curves={n: [r.record() for r in rs] for n, rs in sweep.items()},
        seed_runs={n: [r.summary() for r in rs] for n, rs in seeds.items()},
        seed_curves={n: [r.record() for r in rs] for n, rs in seeds.items()})
    _write(out_dir, meta, results, tables, n_seeds, t_all)
  _write(out_dir, meta, results, tables, n_seeds, t_all)
  ok = {k: v for k, v in results.items() if "summary" in v}
  print(f"wrote {out_dir} in {meta['elapsed_seconds']:.0f}s", flush=True)
  return 0 if len(ok) == len(results) else 1


def _write(out_dir, meta, results, tables, n_seeds, t_all):
  """Writes everything so far (called after every workload)."""
  meta["elapsed_seconds"] = time.perf_counter() - t_all
  meta["load_average_end"] = (os.getloadavg() if hasattr(os, "getloadavg")
                              else None)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(dict(meta=meta, workloads=results), f, default=_json_default)
  ok = {k: v for k, v in results.items() if "summary" in v}
  write_csvs(out_dir, ok)
  header = (f"commit {meta['git']['commit']}"
            f"{' (dirty)' if meta['git']['dirty'] else ''}; "
            f"{meta['machine']['cpu_model']}, {meta['machine']['cpu_count']} "
            f"cores, jax {meta['machine']['jax_version']}; seeds {n_seeds}; "
            f"load average at start {meta['machine']['load_average']}, at end "
            f"{meta['load_average_end']}\n\n")
  with open(os.path.join(out_dir, "tables.md"), "w") as f:
    f.write(header + "\n".join(tables))


if __name__ == "__main__":
  sys.exit(main())
