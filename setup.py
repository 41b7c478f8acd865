"""Only here to place the TGI activation hook (``loader_plugins_tgi.pth``) at the root of the wheel,
where Python's ``site`` module runs it at start-up; all other metadata lives in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = os.path.join("loader_plugins", "tgi_adapter", "loader_plugins_tgi.pth")


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, os.path.basename(PTH)), preserve_mode=False)
        # CUDA C sources (native/) ship inside the package; cupy.RawModule compiles them at first use
        native_out = os.path.join(self.build_lib, "loader_plugins", "_native")
        self.mkpath(native_out)
        for name in sorted(os.listdir("native")):
            if name.endswith((".cu", ".cuh")):
                self.copy_file(os.path.join("native", name), os.path.join(native_out, name), preserve_mode=False)

    def get_outputs(self, *args, **kwargs):
        return [*super().get_outputs(*args, **kwargs), os.path.join(self.build_lib, os.path.basename(PTH))]


setup(cmdclass={"build_py": BuildPyWithPth})
