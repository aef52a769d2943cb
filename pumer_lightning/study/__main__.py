"""``python -m pumer_lightning.study``: see `pumer_lightning.study`."""

from pumer_lightning.study.run import main

if __name__ == "__main__":
    main()
