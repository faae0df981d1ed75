import sys

from steering_artifacts.cli import main

sys.exit(main())
