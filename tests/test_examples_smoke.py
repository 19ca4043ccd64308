# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Smoke test of examples/demo.py on tiny synthetic data."""

from examples import demo


def test_demo_smoke(tmp_path, capsys):
  out = demo.main(
      [
          "--synthetic",
          "--steps",
          "6",
          "--eval-every",
          "3",
          "--batch-size",
          "32",
          "--hidden",
          "32",
          "--target",
          "0.2",
          "--output-dir",
          str(tmp_path),
      ]
  )
  printed = capsys.readouterr().out
  assert "| optimizer" in printed
  assert "| shampoo" in printed and "| adamw" in printed
  assert "steps to 0.2" in out["table"]
  png = tmp_path / "demo_loss.png"
  assert out["png"] == png
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert str(png) in printed
  assert (tmp_path / "demo_curves.csv").read_text().count("\n") == 1 + 2 * 6
  for result in out["results"]:
    assert len(result.losses) == 6
    assert result.eval_steps == [3, 6]
