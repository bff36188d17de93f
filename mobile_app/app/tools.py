"""The demo tools the chat offers the model; each runs on the device and never raises.

The calculator and the clock are lfm-chat's own (one implementation for the terminal and the app); the
battery is the app's addition: plyer where it is installed (Android, iOS), the kernel's power_supply
class on Linux, otherwise an honest "unavailable".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lfm_edge.runtime.demo_tools import calculator, current_time

POWER_SUPPLY = Path("/sys/class/power_supply")


def battery() -> dict:
    """The device's battery charge and whether it is charging."""
    try:
        return _plyer_battery() or _sysfs_battery(POWER_SUPPLY) or {"battery": "unavailable"}
    except Exception as e:  # a tool must answer the model, whatever the platform layer does
        return {"battery": "unavailable", "error": f"{type(e).__name__}: {e}"}


def _plyer_battery() -> dict | None:
    try:
        from plyer import battery as plyer_battery
    except ImportError:
        return None
    try:
        status = plyer_battery.status  # a dict on Android / iOS; raises NotImplementedError elsewhere
    except NotImplementedError:
        return None
    if not status or status.get("percentage") is None:
        return None
    return {"percent": round(float(status["percentage"])), "charging": bool(status.get("isCharging"))}


def _sysfs_battery(root: Path) -> dict | None:
    """The first power supply of type Battery under `root` (laptops, Linux phones)."""
    if not root.is_dir():
        return None
    for supply in sorted(root.iterdir()):
        try:
            if (supply / "type").read_text().strip() != "Battery":
                continue
            percent = int((supply / "capacity").read_text().strip())
            status = (supply / "status").read_text().strip() if (supply / "status").is_file() else "Unknown"
        except (OSError, ValueError):
            continue
        return {"percent": percent, "charging": status in ("Charging", "Full"), "status": status}
    return None


DEMO_TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator, "current_time": current_time,
                                             "battery": battery}
