"""``python -m lrzoo.train ...`` = ``lrzoo-train ...`` (handy under ``torchrun -m`` / ``accelerate launch -m``)."""

from ..cli.train import main

if __name__ == "__main__":
    main()
