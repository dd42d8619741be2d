"""``python -m tidar_kernels COMMAND [options]``: generate, train, evaluate or demo."""
import importlib
import sys

COMMANDS = {
    "generate": ("tidar_kernels.model.generate", "stream TiDAR (and AR) generation from a checkpoint"),
    "train": ("tidar_kernels.training.trainer", "train a TiDAR model (torchrun-ready)"),
    "evaluate": ("tidar_kernels.training.evaluate", "T/NFE and perplexity report of a model"),
    "demo": ("tidar_kernels.training.demo", "train a small model on the CPU, then decode with AR and TiDAR"),
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items())
        print(f"usage: python -m tidar_kernels COMMAND [options]\n\ncommands:\n{listing}", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
