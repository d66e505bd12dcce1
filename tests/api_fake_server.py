"""`sandboxd serve` over the FakeRuntime, as a separate process (for signal and crash tests).

    python tests/api_fake_server.py CONFIG
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sandboxd.api.server import serve  # noqa: E402
from tests.api_helpers import FakeRuntime  # noqa: E402

if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], runtime=FakeRuntime()))
