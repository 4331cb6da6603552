"""Second Python environments for tests of engines that run on an interpreter of their own."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path


def make_environment(folder: Path, *, hidden: tuple[str, ...] = ()) -> Path:
    """A virtual environment that sees this one's packages (llmgrpc's editable install among them),
    except the modules in hidden, which cannot be imported there (as if not installed)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    inner_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # addsitedir also runs the .pth files there (the editable install's finder among them).
    lines = [f"import site; site.addsitedir({path!r})" for path in site.getsitepackages()]
    # A None entry in sys.modules is Python's own "not importable": import raises
    # ModuleNotFoundError and importlib.util.find_spec returns None.
    lines += [f"import sys; sys.modules[{module!r}] = None" for module in hidden]
    Path(inner_site, "outer-environment.pth").write_text("\n".join(lines) + "\n")
    return python
