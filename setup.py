"""``uspan`` and ``uspan-wg`` are one small compiled launcher (uspan/launcher.c) under two
names: it blocks stop signals and execs the console script ``NAME-python`` beside it, so
none lands in the interpreter's start-up (see uspan.signals). Without a C compiler they
are Python scripts, as console scripts are."""

from __future__ import annotations

from distutils.ccompiler import new_compiler
from distutils.command.build_scripts import build_scripts
from distutils.sysconfig import customize_compiler
from pathlib import Path

from setuptools import setup

NAMES = {"uspan": "uspan", "uspan-wg": "wg"}  # program -> its function in uspan.launch
_FALLBACK = "#!python\nimport sys\nfrom uspan.launch import {}\nsys.exit({}())\n"


class BuildLauncher(build_scripts):
    """Compile bin/uspan and bin/uspan-wg (they hold no path: each finds its script
    beside itself when it runs); Python scripts where that fails."""

    def run(self) -> None:
        work = Path(self.get_finalized_command("build").build_temp) / "uspan-launcher"
        work.mkdir(parents=True, exist_ok=True)
        try:
            binary = self._compile(work)
        except Exception as exc:  # no compiler: the interpreter's own start-up window stays
            print(f"uspan: compiled launcher not built ({exc}); Python scripts instead")
            self.scripts = []
            for name, function in NAMES.items():
                (work / name).write_text(_FALLBACK.format(function, function))
                self.scripts.append(str(work / name))
            super().run()  # writes this interpreter into the #! lines
            return
        self.mkpath(self.build_dir)
        for name in NAMES:  # binaries: no #! line to rewrite
            self.copy_file(str(binary), str(Path(self.build_dir) / name))

    @staticmethod
    def _compile(work: Path) -> Path:
        compiler = new_compiler()
        customize_compiler(compiler)
        objects = compiler.compile(["uspan/launcher.c"], output_dir=str(work))
        compiler.link_executable(objects, "launcher", output_dir=str(work))
        return work / "launcher"


# The source stands in the scripts list so that the build has scripts to build (and an
# sdist carries it); BuildLauncher turns it into bin/uspan and bin/uspan-wg.
setup(scripts=["uspan/launcher.c"], cmdclass={"build_scripts": BuildLauncher})
