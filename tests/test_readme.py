"""The README's two commands are the ones CI and a newcomer run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^    (pip install .+)$", readme, flags=re.M)
    test_cmd = next(c for c in commands if "pytest" in c)
    demo_cmd = next(c for c in commands if "lowrank demo" in c)
    assert test_cmd in ci.splitlines()
    assert demo_cmd.startswith("pip install ") and "[test]" not in demo_cmd


def test_setup_cfg_installs_every_subpackage():
    cfg = (ROOT / "setup.cfg").read_text()
    listed = set(re.search(r"packages =\n((?:    .+\n)+)", cfg).group(1).split())
    subpackages = {f"lowrank.{p.parent.name}" for p in (ROOT / "lowrank").glob("*/__init__.py")}
    assert {"lowrank", "lowrank.kernels"} | subpackages <= listed
    assert "lowrank.kernels = kernels" in cfg
