# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""What `pip install shampoo-optax[...]` gives users."""

import pathlib
import re
import tomllib

_PROJECT = tomllib.loads(
    (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "project"]


def _name(requirement):
  return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_core_needs_only_jax_optax_and_chex():
  assert sorted(map(_name, _PROJECT["dependencies"])) == [
      "chex", "jax", "jaxlib", "optax"]


def test_users_get_flax_and_orbax_without_the_test_tools():
  extras = _PROJECT["optional-dependencies"]
  assert list(map(_name, extras["flax"])) == ["flax"]
  assert list(map(_name, extras["orbax"])) == ["orbax-checkpoint"]


def test_every_requirement_pins_a_lower_bound_only():
  requirements = _PROJECT["dependencies"] + [
      r for extra in _PROJECT["optional-dependencies"].values() for r in extra]
  for requirement in requirements:
    assert "==" not in requirement and "<" not in requirement, requirement
