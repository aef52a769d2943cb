"""``python -m pumer_lightning {fit,validate,test,predict} -c experiments/base.yaml -c experiments/<name>.yaml``."""

from pumer_lightning.cli import main

if __name__ == "__main__":
    main()
