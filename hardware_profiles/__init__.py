"""Hardware profiles: one TOML file per device; `sim.hardware` reads them."""

from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent
