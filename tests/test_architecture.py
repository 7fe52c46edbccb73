"""The rooms of the package and which may import which: one table, checked on every import (at the top of a
module or inside a function), and no import circles."""

import ast
from pathlib import Path

import pi0

# room -> the rooms it may import besides itself and the foundation. The longest room a module's name starts
# with is its room. Anything not listed may not be imported: the engine and the reference never meet, the
# checkpoint readers and the model maths know no backend, robots' pipelines know no server.
FOUNDATION = {"pi0", "pi0.errors", "pi0.hardware", "pi0.timing"}  # import nothing of pi0; anyone may import them
ROOMS: dict[str, set[str]] = {
    "pi0.model": set(),  # config, the typed config.json view, shared maths, Observation, RTC, the Backend Protocol
    "pi0.data": set(),  # LeRobot v3 datasets
    "pi0.checkpoint": {"pi0.model"},  # containers, key layouts, load / save / convert
    "pi0.backends.reference": {"pi0.model"},  # the numeric specification
    "pi0.backends.engine": {"pi0.model"},  # the fast runtime
    "pi0.backends.ttnn": {"pi0.model"},  # ttnn ops: a Tenstorrent card, or emulated on the host
    "pi0.backends": {"pi0.model", "pi0.checkpoint", "pi0.backends.reference", "pi0.backends.engine",
                     "pi0.backends.ttnn"},  # the registry
    "pi0.robot": {"pi0.model", "pi0.checkpoint", "pi0.backends"},  # observation pipelines, presets, Policy
    "pi0.serving": {"pi0.model", "pi0.robot", "pi0.data"},  # the service, its transports, the robot side (recording)
    "pi0.train": {"pi0.model", "pi0.checkpoint", "pi0.backends", "pi0.robot", "pi0.data"},
    "pi0.sim": {"pi0.model", "pi0.data", "pi0.robot", "pi0.serving"},
    "pi0.cli": {"pi0.model", "pi0.data", "pi0.checkpoint", "pi0.backends", "pi0.backends.reference",
                "pi0.backends.engine", "pi0.backends.ttnn", "pi0.robot", "pi0.serving", "pi0.train",
                "pi0.sim"},  # the commands
}


def modules() -> dict[str, Path]:
    root = Path(pi0.__file__).parent
    mods = {}
    for f in root.rglob("*.py"):
        name = ".".join(("pi0", *f.relative_to(root).with_suffix("").parts))
        mods[name.removesuffix(".__init__")] = f
    return mods


def module_graph() -> dict[str, set[str]]:
    """pi0's modules -> the pi0 modules each imports (`from pi0.cli import bench` counts as importing
    pi0.cli.bench)."""
    mods = modules()
    graph = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pi0"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d not in (name, "pi0")}
    return graph


def room(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    rooms = [r for r in ROOMS if module == r or module.startswith(r + ".")]
    assert rooms, f"{module} is in no room of tests/test_architecture.py: give its folder a row"
    return max(rooms, key=len)


def test_every_import_follows_the_table():
    bad = []
    for module, deps in module_graph().items():
        mine = room(module)
        allowed = {mine} | ({"foundation"} if mine == "foundation" else {"foundation"} | ROOMS[mine])
        if mine == "foundation":
            allowed = {"foundation"} if module != "pi0" else set(ROOMS) | {"foundation"}  # pi0's lazy exports
        bad += [f"{module} ({mine}) imports {d} ({room(d)})" for d in sorted(deps) if room(d) not in allowed]
    assert not bad, "\n".join(bad)


def test_the_table_can_fail():
    """The table is not vacuous: the reference importing the engine would be refused."""
    assert "pi0.backends.engine" not in ROOMS["pi0.backends.reference"]
    assert room("pi0.backends.engine.ops") == "pi0.backends.engine" and room("pi0.backends.factory") == "pi0.backends"


def test_no_import_circles():
    """No module reaches itself through imports: rooms stay rooms."""
    graph = module_graph()
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for d in sorted(graph[m]):
            visit(d, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_every_module_says_its_job_in_its_first_line_and_stays_small():
    """Each file opens with a one-line docstring saying its job, and stays under ~450 lines."""
    long, silent = [], []
    for name, f in modules().items():
        text = f.read_text()
        if f.name == "__init__.py" and not text.strip():
            continue
        doc = ast.get_docstring(ast.parse(text))
        if not doc or not doc.splitlines()[0].strip():
            silent.append(name)
        if len(text.splitlines()) > 450:
            long.append(f"{name}: {len(text.splitlines())} lines")
    assert not silent, f"modules without a first line saying their job: {silent}"
    assert not long, f"modules over 450 lines (split them by job): {long}"
