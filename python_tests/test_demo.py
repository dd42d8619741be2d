"""The demo runs end to end on the CPU and reports measured, consistent figures."""
import pytest

from tidar_kernels.training import demo


def test_demo_short_run_prints_measured_figures(capsys):
    summary = demo.main(["--device", "cpu", "--steps", "30", "--prompts", "2", "--new-tokens", "24"])
    out = capsys.readouterr().out
    assert "tokens per forward" in out and "tokens/s" in out and "identical to AR" in out
    assert summary["prompts"] == 2
    assert summary["identical"] == 2  # beta = 1: TiDAR commits exactly the AR greedy tokens
    assert summary["tidar_tokens_per_forward"] >= 1.0
    assert summary["ar_tokens_per_s"] > 0 and summary["tidar_tokens_per_s"] > 0


@pytest.mark.parametrize("flag", ["--prompts", "--new-tokens"])
def test_demo_rejects_empty_work_before_training(flag):
    with pytest.raises(ValueError, match=f"{flag} must be >= 1, got 0"):
        demo.main(["--device", "cpu", flag, "0"])
