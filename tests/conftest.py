# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Shared pytest configuration.

Tests marked ``multidevice`` need 8 devices. ``make test`` runs them in a
separate process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``;
in any run with fewer devices they are skipped, with the reason given.
"""

import pytest

_NEEDED_DEVICES = 8


def pytest_collection_modifyitems(config, items):
  multidevice = [
      item for item in items if item.get_closest_marker("multidevice")
  ]
  if not multidevice:
    return
  import jax

  count = jax.device_count()
  if count >= _NEEDED_DEVICES:
    return
  skip = pytest.mark.skip(
      reason=(
          f"multidevice: needs {_NEEDED_DEVICES} devices, found {count}; run "
          "with XLA_FLAGS=--xla_force_host_platform_device_count=8 "
          "(as `make test` does)"
      )
  )
  for item in multidevice:
    item.add_marker(skip)
