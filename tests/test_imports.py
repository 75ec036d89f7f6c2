"""The core imports without Ray, and the learner runs with only torch and numpy (DESIGN principle 1);
the package's layout and layering (docs/architecture.md): parts as folders, each importing only the
parts below it, no import cycle, no test seam in production code."""

import ast
import re
import subprocess
import sys
from pathlib import Path

BLOCK = "import sys\nfor name in {names}:\n    sys.modules[name] = None\n"


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_core_imports_without_ray():
    out = run_python(BLOCK.format(names=["ray"]) + "import sacfleet.learner, sacfleet.replay_server, sacfleet.common\n"
                     "import sacfleet.common.codec, sacfleet.common.config, sacfleet.common.envs\n")
    assert out.returncode == 0, out.stderr


def test_learner_updates_with_only_torch_and_numpy():
    code = BLOCK.format(names=["ray", "gymnasium", "yaml", "msgpack", "tensorboard", "mujoco"]) + """
import numpy as np, torch
from sacfleet.learner import Batch, SACLearner
learner = SACLearner(3, 2, np.array([-1, -1], np.float32), np.array([1, 1], np.float32), hidden_sizes=(16,))
batch = Batch(obs=torch.randn(8, 3), action=torch.zeros(8, 2), reward=torch.ones(8), next_obs=torch.randn(8, 3),
              terminated=torch.zeros(8))
learner.update(batch)
assert learner.updates == 1
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr


# The package's parts from the top down (docs/architecture.md): each imports only parts below it.
LAYERS = ["__main__", "cli", "sweep", "bench", "drills", "driver", "actors", "learner", "replay_server", "common"]
PACKAGE = Path(__file__).resolve().parent.parent / "sacfleet"


def sacfleet_imports() -> dict[str, set[str]]:
    """Each module of sacfleet/ and the sacfleet modules it imports, at module level or in a function."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    imports: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sacfleet":
                for alias in node.names:  # `from sacfleet.x import y` imports module sacfleet.x.y if there is one
                    imported = f"{node.module}.{alias.name}"
                    imports[name].add(imported if imported in modules else node.module)
            elif isinstance(node, ast.Import):
                imports[name] |= {alias.name for alias in node.names if alias.name.split(".")[0] == "sacfleet"}
    return imports


def part_of(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_the_package_root_holds_the_command_line_and_the_parts_as_folders():
    files = sorted(p.name for p in PACKAGE.iterdir() if p.is_file() and p.suffix == ".py")
    assert files == ["__init__.py", "__main__.py", "cli.py"]
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS[2:]) | {"configs"}
    assert (PACKAGE / "driver" / "__init__.py").read_text() == ""  # the inline trainer imports without Ray


def test_each_part_imports_only_the_parts_below_it():
    upward = sorted(f"{module} imports {imported}" for module, targets in sacfleet_imports().items()
                    for imported in targets if part_of(module) in LAYERS and part_of(imported) in LAYERS
                    and LAYERS.index(part_of(imported)) < LAYERS.index(part_of(module)))
    assert upward == []


def test_no_import_cycle_in_the_package():
    imports = sacfleet_imports()
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(imports.get(module, ())):
            if state.get(imported) == "open":
                cycles.append(" -> ".join(path[path.index(imported):] + [imported]))
            elif imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in sorted(imports):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_production_module_mentions_an_injected_fault():
    """Fault tests inject their own classes (driver.fleet.FleetParts) and kill real processes."""
    mentions = [f"{path.relative_to(PACKAGE.parent)}:{i}" for path in PACKAGE.rglob("*.py")
                for i, line in enumerate(path.read_text().splitlines(), 1)
                if re.search(r"\bfaults?\b|inject", line, re.IGNORECASE)]
    assert mentions == []


def test_the_inline_trainer_and_checkpoint_evaluation_import_without_ray():
    out = run_python(BLOCK.format(names=["ray"]) + "import sacfleet.driver.train_inline\n"
                     "import sacfleet.driver.eval_checkpoint\n")
    assert out.returncode == 0, out.stderr
