"""Hardware profiles: one TOML file per device; `sim.timing.hardware` reads them."""

from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent
