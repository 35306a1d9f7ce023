"""``python -m cvfp_lightning`` is ``cvfp``."""

from cvfp_lightning.cli import main

main()
