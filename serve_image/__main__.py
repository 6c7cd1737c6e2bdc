import sys

from serve_image.cli import main

sys.exit(main())
