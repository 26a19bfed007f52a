"""The project's shape: imports point down (config, then data/model/optim, then the run's library in
training/, then the run and the tools), and the run is a script nothing imports."""
import ast
import os

from tests.util import REPO_ROOT

# The layer of each top-level name: a module may import its own package and any lower layer.
LAYERS = {"config": 0, "data": 1, "model": 1, "optim": 1, "training": 2, "train_gpt": 3, "scripts": 3, "evals": 3}


def project_files():
    for top in LAYERS:
        path = os.path.join(REPO_ROOT, top)
        if os.path.isfile(path + ".py"):
            yield top + ".py"
        for folder, _, files in os.walk(path):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(folder, name), REPO_ROOT)


def imported_project_modules(path):
    """(line, top-level project name) of every import in a file, including those inside functions."""
    tree = ast.parse(open(os.path.join(REPO_ROOT, path), encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in LAYERS:
                yield node.lineno, top


def test_imports_point_down_only():
    upward = []
    checked = 0
    for path in project_files():
        top = path.split(os.sep)[0].removesuffix(".py")
        for line, imported in imported_project_modules(path):
            checked += 1
            sideways = LAYERS[imported] == LAYERS[top] and imported != top
            if LAYERS[imported] > LAYERS[top] or sideways or imported == "train_gpt":
                upward.append(f"{path}:{line} imports {imported} (layer {LAYERS[imported]}; {top} is layer "
                              f"{LAYERS[top]})")
    assert checked > 50  # the walk found the project's imports
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_the_import_check_sees_an_upward_arrow(tmp_path, monkeypatch):
    # The check reads imports inside functions too: the way optim/schedules.py once reached config's parsers.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.py").write_text("def f():\n    from optim.schedules import lr_multiplier\n")
    monkeypatch.setattr("tests.test_structure.REPO_ROOT", str(tmp_path))
    assert list(imported_project_modules(os.path.join("data", "bad.py"))) == [(2, "optim")]


def test_every_top_level_module_has_a_layer():
    # A new top-level module or package would escape the import check: it must join LAYERS first.
    tops = {name.removesuffix(".py") for name in os.listdir(REPO_ROOT)
            if name.endswith(".py") or (os.path.isdir(os.path.join(REPO_ROOT, name)) and any(
                f.endswith(".py") for _, _, files in os.walk(os.path.join(REPO_ROOT, name)) for f in files))}
    assert tops - {"tests"} <= set(LAYERS), sorted(tops - {"tests"} - set(LAYERS))
