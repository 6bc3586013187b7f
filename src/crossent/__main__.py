"""``python -m crossent`` == the ``crossent`` console script."""
import sys

from crossent.cli import main

sys.exit(main())
