# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Two real JAX processes train with Shampoo together and match one process.

``examples/multihost.py`` runs as 2 OS processes with 4 simulated CPU devices
each, joined by ``jax.distributed`` over loopback (gloo CPU collectives) into
one mesh of 8 devices; they train, then write their parameters and an Orbax
checkpoint. This pytest process (8 devices, like every ``multidevice`` test)
trains on the same global batches for the reference, then restores the
checkpoint and continues training.
"""

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from examples import multihost

pytestmark = pytest.mark.multidevice

REPO = pathlib.Path(__file__).resolve().parent.parent
NUM_PROCESSES = 2
SAVE_STEP = 4  # After two root refreshes (precondition_every=2).
TOTAL_STEPS = 6
TIMEOUT_S = 90  # A normal run takes about 20 s.
# max |difference| <= RTOL * max |parameter|, for every parameter array:
# float32 round-off (the gradient is reduced across processes in another
# order), far below one step's change.
RTOL = 1e-5

# Runs the script given as its first argument, with gloo listening on
# loopback (by default it takes the address the host name resolves to; jax has
# no public option for it). On an error it exits at once, skipping jax's exit
# barrier, which would wait for the peers.
LAUNCHER = """
import functools, os, runpy, sys, traceback
from jax._src.lib import _jax
_jax.make_gloo_tcp_collectives = functools.partial(
    _jax.make_gloo_tcp_collectives, hostname="127.0.0.1")
sys.argv = sys.argv[1:]
try:
  runpy.run_path(sys.argv[0], run_name="__main__")
except Exception:
  traceback.print_exc()
  sys.stderr.flush()
  os._exit(1)
"""


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@contextlib.contextmanager
def processes(out_dir: pathlib.Path, steps: int):
  """Starts the example as NUM_PROCESSES processes; after the block, waits.

  Fails, with their stderr, unless all exit with 0 within TIMEOUT_S.
  """
  coordinator = f"127.0.0.1:{free_port()}"
  env = dict(
      os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1",
      # Not the 8 devices of this process: 4 each.
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
      PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  deadline = time.monotonic() + TIMEOUT_S
  procs, stderrs = [], []
  try:
    for i in range(NUM_PROCESSES):
      stderrs.append(out_dir / f"stderr_{i}.txt")
      with open(out_dir / f"stdout_{i}.txt", "w") as out, open(
          stderrs[-1], "w") as err:
        procs.append(subprocess.Popen(
            [sys.executable, "-c", LAUNCHER,
             str(REPO / "examples" / "multihost.py"),
             "--num-processes", str(NUM_PROCESSES), "--process-id", str(i),
             "--coordinator", coordinator, "--local-devices", "4",
             "--steps", str(steps), "--out", str(out_dir)],
            env=env, stdout=out, stderr=err))
    yield
    # Stop at the first failure: the peers would wait for it in a collective.
    while (any(p.poll() is None for p in procs)
           and all(p.poll() in (None, 0) for p in procs)
           and time.monotonic() < deadline):
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  codes = [p.returncode for p in procs]
  if codes != [0] * NUM_PROCESSES:
    logs = "\n".join(
        f"--- stderr of process {i} ---\n{path.read_text()[-4000:]}"
        for i, path in enumerate(stderrs))
    pytest.fail(f"exit codes {codes} (negative: killed, after a peer failed "
                f"or after {TIMEOUT_S} s)\n{logs}")


def assert_params_close(actual, expected, what: str):
  assert sorted(actual) == sorted(expected), what
  for name in expected:
    diff = np.max(np.abs(actual[name] - expected[name]))
    scale = np.max(np.abs(expected[name]))
    assert diff <= RTOL * scale, (
        f"{what}, {name}: max |difference| {diff:.3g} > {RTOL} * {scale:.3g}")


def test_two_processes_match_one_and_checkpoint_restores_in_one(tmp_path):
  with processes(tmp_path, SAVE_STEP):
    reference = multihost.main(["--steps", str(TOTAL_STEPS)])  # Meanwhile.
  for i in range(NUM_PROCESSES):
    assert_params_close(dict(np.load(tmp_path / f"params_{i}.npz")),
                        reference[SAVE_STEP - 1], f"process {i}")

  continued = multihost.main(["--restore", str(tmp_path / "checkpoint"),
                              "--steps", str(TOTAL_STEPS)])
  assert len(continued) == TOTAL_STEPS - SAVE_STEP
  assert_params_close(continued[-1], reference[-1], "restored and continued")
  # The tolerance is far below what training changes.
  with pytest.raises(AssertionError):
    assert_params_close(reference[-1], reference[SAVE_STEP - 1], "")
