"""The README's two commands are the ones CI and a newcomer run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_blocks():
    """.ci/run's lines, split at each `python3 -m venv` (one fresh environment per block)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("python3 -m venv ")]
    return [lines[a:b] for a, b in zip(starts, starts[1:] + [len(lines)])]


def test_ci_runs_each_readme_command_verbatim_in_its_own_fresh_venv():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^    (pip install .+)$", readme, flags=re.M)
    test_cmd = next(c for c in commands if "pytest" in c)
    demo_cmd = next(c for c in commands if "lowrank demo" in c)
    assert demo_cmd.startswith("pip install . ") and "[" not in demo_cmd      # the main job takes no extras
    blocks = _ci_blocks()
    assert len(blocks) == 2
    assert test_cmd in blocks[0] and demo_cmd in blocks[1]
    venvs = [b[0].split()[-1] for b in blocks]
    assert len(set(venvs)) == 2
    assert f"rm -rf {' '.join(venvs)}" in (ROOT / ".ci" / "run").read_text()          # fresh, not reused
    assert all(f"source {v}/bin/activate" in b for v, b in zip(venvs, blocks))


def test_setup_cfg_installs_every_subpackage():
    cfg = (ROOT / "setup.cfg").read_text()
    listed = set(re.search(r"packages =\n((?:    .+\n)+)", cfg).group(1).split())
    subpackages = {"lowrank." + ".".join(p.parent.relative_to(ROOT / "lowrank").parts)
                   for p in (ROOT / "lowrank").rglob("*/__init__.py")}
    assert {"lowrank", "lowrank.kernels"} | subpackages <= listed
    assert "package_dir" not in cfg                      # lowrank/kernels is a link to kernels/, no mapping
    assert (ROOT / "lowrank" / "kernels").resolve() == (ROOT / "kernels").resolve()
