"""How this process was started, readable before torch is imported (the command line asks before its imports)."""
import os


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
