"""The smallest budget `hermes generate` plans for a model, as a fresh process states it when refused."""
import re
import subprocess
import sys


def least_generation_mib(model, *generate_args: str) -> float:
    """MiB: 1 MiB is refused at the session's construction with the floor any input needs; just above
    that floor the generation plan is refused with its own minimum (or, when that floor already fits, the
    floor is the minimum)."""
    def refused(budget: str) -> str:
        out = subprocess.run([sys.executable, "-m", "hermes_ort", "generate", str(model), *generate_args, "--budget",
                              budget], capture_output=True, text=True)
        return out.stderr if out.returncode else ""

    floor = float(re.search(r"below what any input needs, ([\d.]+) MiB", refused("1MiB")).group(1)) + 1
    found = re.search(r"smallest feasible plan, ([\d.]+) MiB", refused(f"{floor}MiB"))
    return float(found.group(1)) if found else floor
