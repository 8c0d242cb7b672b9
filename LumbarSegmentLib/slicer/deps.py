"""Python packages LumbarSegment needs inside Slicer, installed on first use, with the user's consent.

Slicer ships numpy, SimpleITK, pydicom and Pillow; LumbarSegment adds PyTorch,
safetensors and tqdm. The rules:

* **Ask first.** Nothing is installed until ``confirm(message)`` (a dialog in Slicer)
  returns True; the message lists exactly what will be installed and how.
* **PyTorch through the PyTorch extension when it is there.** Its ``PyTorchUtils``
  module picks the build matching the GPU driver (CUDA or CPU). Without it, plain
  ``pip`` installs the default build for the platform.
* **Never touch Slicer's own packages.** Every pip run gets a constraints file pinning
  the installed numpy, SimpleITK, pydicom and Pillow to their current versions, so a
  dependency can never upgrade or replace them.
* **Restart when needed.** If a package was already imported (an older torch, say)
  or still cannot be imported after installing, the result says ``restart_required``
  and the module offers to restart Slicer.

The installer, the confirmation and the PyTorchUtils lookup are injected, so all of
this is unit-tested without Slicer or a network.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable

TORCH_REQUIREMENT = ">=2.1,<3"
# import name -> pip requirement
REQUIREMENTS = {
    "torch": f"torch{TORCH_REQUIREMENT}",
    "safetensors": "safetensors>=0.4",
    "tqdm": "tqdm>=4.60",
}
# Distributions Slicer ships: pinned, never installed, upgraded or removed by us.
PROTECTED = ("numpy", "SimpleITK", "pydicom", "Pillow")


class DependencyError(RuntimeError):
    """The packages could not be installed (or the user declined)."""


@dataclass
class InstallPlan:
    missing: list[str]  # import names
    torch_via: str | None  # "PyTorchUtils", "pip" or None (torch present)
    pinned: dict[str, str] = field(default_factory=dict)

    @property
    def needed(self) -> bool:
        return bool(self.missing)

    def pip_requirements(self) -> list[str]:
        return [REQUIREMENTS[m] for m in self.missing if not (m == "torch" and self.torch_via == "PyTorchUtils")]

    def describe(self) -> str:
        if not self.missing:
            return "All packages LumbarSegment needs are installed."
        lines = ["LumbarSegment needs these Python packages, which are not installed yet:", ""]
        if "torch" in self.missing:
            how = ("through the PyTorch extension (it picks the build that matches your GPU driver, or the CPU "
                   "build)" if self.torch_via == "PyTorchUtils" else
                   "with pip (the default build for this platform; install the PyTorch extension first to get "
                   "a build matched to your GPU)")
            lines.append(f"  - PyTorch ({REQUIREMENTS['torch']}), {how}; a download of up to a few GB")
        for m in self.missing:
            if m != "torch":
                lines.append(f"  - {REQUIREMENTS[m]} (with pip)")
        if self.pinned:
            lines += ["", "Slicer's own packages stay exactly as they are: " +
                      ", ".join(f"{k} {v}" for k, v in self.pinned.items()) + "."]
        lines += ["", "Install now? This can take several minutes; Slicer may need a restart afterwards."]
        return "\n".join(lines)


@dataclass
class InstallResult:
    installed: list[str]
    restart_required: bool = False
    message: str = ""


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _default_pytorch_utils():
    """The PyTorch extension's logic, or None when the extension is not installed."""
    with contextlib.suppress(Exception):
        import slicer  # noqa: F401

        return slicer.util.getModuleLogic("PyTorchUtils")
    with contextlib.suppress(Exception):
        import PyTorchUtils  # the module's folder is on sys.path once Slicer loaded it

        return PyTorchUtils.PyTorchUtilsLogic()
    return None


def _default_pip_install(requirements: list[str], constraints: str) -> None:
    """Slicer's pip_install, passing the constraints file the way this Slicer version accepts it."""
    import slicer

    pip_install = slicer.util.pip_install
    try:
        accepts = "constraints" in inspect.signature(pip_install).parameters
    except (TypeError, ValueError):
        accepts = False
    if accepts:
        pip_install(" ".join(requirements), constraints=constraints)
    else:
        pip_install(list(requirements) + ["-c", constraints])


class DependencyInstaller:
    """Checks for and installs LumbarSegment's packages; see the module doc."""

    def __init__(self, *, pip_install: Callable[[list[str], str], None] | None = None,
                 confirm: Callable[[str], bool] | None = None,
                 pytorch_utils: Callable[[], object] | None = None,
                 find_spec: Callable[[str], object] | None = None,
                 import_module: Callable[[str], object] | None = None,
                 requirements: dict[str, str] | None = None, imported=None):
        self.pip_install = pip_install or _default_pip_install
        self.confirm = confirm
        self.pytorch_utils = pytorch_utils or _default_pytorch_utils
        self.find_spec = find_spec or importlib.util.find_spec
        self.import_module = import_module or importlib.import_module
        self.requirements = dict(requirements or REQUIREMENTS)
        self.imported = sys.modules if imported is None else imported  # modules already loaded in this process

    def missing(self) -> list[str]:
        out = []
        for name in self.requirements:
            try:
                spec = self.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec is None:
                out.append(name)
        return out

    def plan(self) -> InstallPlan:
        missing = self.missing()
        torch_via = None
        if "torch" in missing:
            torch_via = "PyTorchUtils" if self.pytorch_utils() is not None else "pip"
        pinned = {d: v for d in PROTECTED if (v := installed_version(d))}
        return InstallPlan(missing=missing, torch_via=torch_via, pinned=pinned)

    def _constraints_file(self, plan: InstallPlan) -> str:
        fd, path = tempfile.mkstemp(prefix="lumbarsegment-constraints-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{k}=={v}\n" for k, v in plan.pinned.items()))
        return path

    def ensure(self, *, ask: bool = True) -> InstallResult:
        """Install whatever is missing. Raises :class:`DependencyError` if declined or failed."""
        plan = self.plan()
        if not plan.needed:
            return InstallResult(installed=[], message=plan.describe())
        if ask:
            if self.confirm is None:
                raise DependencyError("packages are missing and no way to ask the user was given:\n"
                                      + plan.describe())
            if not self.confirm(plan.describe()):
                raise DependencyError("installation declined; LumbarSegment cannot segment without "
                                      + ", ".join(plan.missing))
        previously_imported = [m for m in plan.missing if m in self.imported]
        constraints = self._constraints_file(plan)
        try:
            if plan.torch_via == "PyTorchUtils":
                self._install_torch_with_extension()
            reqs = plan.pip_requirements()
            if reqs:
                try:
                    self.pip_install(reqs, constraints)
                except Exception as exc:
                    raise DependencyError(f"pip could not install {', '.join(reqs)}: {exc}. Check the internet "
                                          f"connection (or a proxy), then try again; details are in the Python "
                                          f"console") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(constraints)
        importlib.invalidate_caches()
        broken = []
        for m in plan.missing:
            try:
                self.import_module(m)
            except Exception:
                broken.append(m)
        restart = bool(previously_imported or broken)
        msg = f"Installed {', '.join(plan.missing)}."
        if restart:
            msg += (" Restart Slicer to finish the installation"
                    + (f" ({', '.join(broken)} cannot be imported until then)." if broken else "."))
        return InstallResult(installed=list(plan.missing), restart_required=restart, message=msg)

    def _install_torch_with_extension(self) -> None:
        logic = self.pytorch_utils()
        try:
            torch = logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
        except Exception as exc:
            raise DependencyError(
                f"the PyTorch extension could not install PyTorch: {exc}. Restart Slicer and try again; if it "
                f"keeps failing, uninstall PyTorch in the 'PyTorch Utils' module and reinstall") from exc
        if torch is None:
            raise DependencyError("PyTorch was not installed (the PyTorch extension reported no result)")


def check_environment(installer: DependencyInstaller | None = None) -> str:
    """A one-paragraph summary for the module's status line (no side effects)."""
    installer = installer or DependencyInstaller()
    plan = installer.plan()
    if plan.needed:
        return f"Missing packages: {', '.join(plan.missing)} (installed on first use, after asking)."
    return "Python packages: " + ", ".join(f"{d} {installed_version(d) or '?'}"
                                           for d in ("torch", "safetensors", "numpy", "SimpleITK"))


__all__ = ["DependencyInstaller", "DependencyError", "InstallPlan", "InstallResult", "REQUIREMENTS",
           "PROTECTED", "check_environment"]
