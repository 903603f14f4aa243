"""The command line imports downward only (DESIGN.md): cli.py dispatches to the command
modules, the commands share the helpers of cli_args and cli_checks, no module imports cli.py
back, and the helper modules import no command. Read from the source with ast, so that an
import inside a function (where a circle hides from import-time errors) counts too."""
import ast
from pathlib import Path

import layerskip_kernels

PACKAGE = Path(layerskip_kernels.__file__).parent
ENTRY = "layerskip_kernels.cli"
COMMANDS = {ENTRY, "layerskip_kernels.benchmark", "layerskip_kernels.sweep",
            "layerskip_kernels.task_eval", "layerskip_kernels.training.cli",
            "layerskip_kernels.integrations.lm_eval_model"}
HELPERS = ("cli_args.py", "cli_checks.py")


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path):
    """The absolute names of the modules the file's import statements name, anywhere in it;
    `from X import y` names X and X.y (y may be a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imports_entry(names):
    return any(n == ENTRY or n.startswith(ENTRY + ".") for n in names)


def test_the_import_reader_sees_relative_and_function_level_imports():
    """Controls: the readings the tests below rely on."""
    assert imports_entry(imported(PACKAGE / "__main__.py"))  # from .cli import main
    assert "layerskip_kernels.benchmark" in imported(PACKAGE / "cli.py")
    # cli.py imports task_eval inside build_parser, and training/cli.py's `..` is the package
    assert "layerskip_kernels.task_eval" in imported(PACKAGE / "cli.py")
    assert "layerskip_kernels.files" in imported(PACKAGE / "training" / "cli.py")


def test_no_module_imports_the_cli_back():
    importers = sorted(module_name(path) for path in PACKAGE.rglob("*.py")
                       if path.name != "__main__.py" and module_name(path) != ENTRY
                       and imports_entry(imported(path)))
    assert importers == [], f"{importers} import {ENTRY} back: import its helpers from " \
                            "layerskip_kernels.cli_args / cli_checks instead"


def test_the_cli_helpers_import_no_command():
    for helper in HELPERS:
        commands = sorted(imported(PACKAGE / helper) & COMMANDS)
        assert commands == [], f"{helper} imports the commands {commands}"
