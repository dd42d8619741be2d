"""Shared GPU check: a decode step launches work only (no host synchronisation), so it can be graph-captured."""
import torch


def assert_steps_never_sync(loop, steps: int = 2) -> None:
    """Run ``steps`` steps of a prefilled decode loop under CUDA's sync debug mode "error" (any sync raises)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            loop.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
