import sys

from steering_artifacts.builder.cli import main

sys.exit(main())
