# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Smoke test of examples/demo.py on tiny synthetic data."""

from examples import demo


def test_demo_smoke(tmp_path, capsys):
  out = demo.main([
      "--synthetic", "--steps", "6", "--eval-every", "3",
      "--batch-sizes", "64,32", "--hidden", "32", "--target", "0.2",
      "--output-dir", str(tmp_path),
  ])
  printed = capsys.readouterr().out
  assert "| shampoo" in printed and "| adamw" in printed
  assert [run["batch_size"] for run in out["runs"]] == [64, 32]
  for run in out["runs"]:
    assert "steps to 0.2" in run["table"]
    assert run["verdict"].startswith(f"batch {run['batch_size']}: a Shampoo"
                                      " step costs")
    assert run["verdict"] in printed
    png = run["png"]
    assert png == tmp_path / f"demo_loss_batch{run['batch_size']}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in printed
    for result in run["results"]:
      assert len(result.losses) == 6
      assert result.eval_steps == [3, 6]
  assert (tmp_path / "demo_curves.csv").read_text().count("\n") == 1 + 4 * 6


def _result(name, steps_to_target, seconds_to_target, step_seconds):
  return demo.RunResult(
      name=name, compile_seconds=1.0, losses=[1.0] * 10,
      seconds=[step_seconds * (i + 1) for i in range(10)], eval_steps=[],
      eval_accuracy=[], eval_loss=[], steps_to_target=steps_to_target,
      seconds_to_target=seconds_to_target)


def test_verdict_names_the_winner_per_second():
  fast = [_result("shampoo", 5, 0.6, 0.12), _result("adamw", 10, 1.0, 0.1)]
  line = demo.verdict(fast, 0.87, 4096)
  assert line == ("batch 4096: a Shampoo step costs 1.20x an AdamW step;"
                  " Shampoo reached 0.87 in 0.50x AdamW's steps and 0.60x its"
                  " seconds: Shampoo wins per second.")
  slow = [_result("shampoo", 5, 1.5, 0.3), _result("adamw", 10, 1.0, 0.1)]
  line = demo.verdict(slow, 0.87, 256)
  assert "1.50x its seconds: AdamW wins per second." in line
  assert "Tuning guide" in line
  missed = [_result("shampoo", 5, 1.5, 0.3), _result("adamw", None, None, 0.1)]
  assert demo.verdict(missed, 0.87, 256).endswith(
      "adamw did not reach 0.87.")
