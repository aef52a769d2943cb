"""``python -m pumer_lightning.tune``: see `pumer_lightning.tune`."""

from pumer_lightning.tune import run

if __name__ == "__main__":
    run()
