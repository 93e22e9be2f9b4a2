"""The built wheel installs only the `fedlora` namespace, with the design card's folders under it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_only_the_fedlora_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fedlora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops - {"fedlora"} == {n for n in tops if n.endswith(".dist-info")} and "fedlora" in tops
    for module in (
        "fedlora/clients/app.py",
        "fedlora/server/app.py",
        "fedlora/strategies/fedsa.py",
        "fedlora/defaults.toml",
    ):
        assert module in names
    # every subpackage of the source tree is in the wheel (a non-editable install imports them all)
    for init in sorted((ROOT / "fedlora").glob("*/__init__.py")):
        assert f"fedlora/{init.parent.name}/__init__.py" in names, f"fedlora.{init.parent.name} is not packaged"
    assert not [n for n in names if n.startswith(("server/", "clients/", "strategies/", "tests/"))]
