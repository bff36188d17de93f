import os
import sys
from pathlib import Path

# tests import their helpers (tiny_models) as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
# keep runs reproducible and polite on a shared 2-core machine
os.environ.setdefault("OMP_NUM_THREADS", "1")
