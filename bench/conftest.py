"""pytest configuration for the benchmark's own tests: the peers' adapters live in bench/peers and
import each other as `peers.*`, as the benchmark scripts (run from bench/) do."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
