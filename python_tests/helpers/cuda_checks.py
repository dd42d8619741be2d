"""Shared GPU checks of the decode-step contract: a step launches work only (no host
synchronisation), so it can be captured in a CUDA graph and replayed."""
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


def capture_after_warmup(step, preserve=()):
    """Run ``step()`` once on a side stream (kernel compiles and workspaces happen outside the
    capture), then capture one call in a CUDA graph; returns ``(graph, what the captured call returned)``.
    ``preserve``: tensors the warm-up may change, restored before the capture."""
    saved = [t.clone() for t in preserve]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
        for dst, src in zip(preserve, saved):
            dst.copy_(src)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
