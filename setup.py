"""``uspan-wg`` is a small compiled launcher (uspan/daemon/launcher.c): it blocks stop
signals and execs the console script ``uspan-wg-python`` beside it, so none lands in the
interpreter's start-up (see uspan.signals). Without a C compiler it is a Python script,
as the console script was."""

from __future__ import annotations

from distutils.ccompiler import new_compiler
from distutils.command.build_scripts import build_scripts
from distutils.sysconfig import customize_compiler
from pathlib import Path

from setuptools import setup

_FALLBACK = "#!python\nimport sys\nfrom uspan.daemon.launch import main\nsys.exit(main())\n"


class BuildLauncher(build_scripts):
    """Compile bin/uspan-wg (it holds no path: it finds uspan-wg-python beside itself
    when it runs); the Python script where that fails."""

    def run(self) -> None:
        work = Path(self.get_finalized_command("build").build_temp) / "uspan-launcher"
        work.mkdir(parents=True, exist_ok=True)
        target = work / "uspan-wg"
        try:
            self._compile(work, target)
        except Exception as exc:  # no compiler: the interpreter's own start-up window stays
            print(f"uspan-wg: compiled launcher not built ({exc}); a Python script instead")
            target.write_text(_FALLBACK)
            self.scripts = [str(target)]
            super().run()  # writes this interpreter into the #! line
            return
        self.mkpath(self.build_dir)
        self.copy_file(str(target), self.build_dir)  # a binary: no #! line to rewrite

    @staticmethod
    def _compile(work: Path, target: Path) -> None:
        compiler = new_compiler()
        customize_compiler(compiler)
        objects = compiler.compile(["uspan/daemon/launcher.c"], output_dir=str(work))
        compiler.link_executable(objects, target.name, output_dir=str(work))


# The source stands in the scripts list so that the build has scripts to build (and an
# sdist carries it); BuildLauncher turns it into bin/uspan-wg.
setup(scripts=["uspan/daemon/launcher.c"], cmdclass={"build_scripts": BuildLauncher})
