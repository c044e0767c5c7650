"""``python -m ortho_run.datasets from-jpeg NPZ ROOT``: write the CIFAR-10 pickle layout."""

from ortho_run.datasets.jpeg_archive import main

main()
