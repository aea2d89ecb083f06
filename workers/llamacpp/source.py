"""llama.cpp's sources, as vendored in the llama-cpp-python archive of the installed version.

Two things need them: the HF-to-GGUF converter (`fleetserve model convert`), which
the package's wheel does not ship, and llama.cpp's own C++ server, which it does
not build (the `llama-server` engine: parallel slots). The archive is fetched once
through pip (whose cache already holds it when the package was built from source)
into ``llama.cpp/src-VERSION`` of the cache (fleetserve/paths.py); llama.cpp is
built beside it, once for both engines:

    python -m workers.llamacpp.source build     # what scripts/setup.sh --llamacpp runs

The build makes llama-server and llama.cpp's shared libraries. scripts/setup.sh
installs llama-cpp-python without compiling its own copy of them
(``CMAKE_ARGS=-DLLAMA_BUILD=OFF``) and this build puts its libraries into the
package, where llama-cpp-python loads them from: llama.cpp is compiled once, not
twice (on 2 cores each compile takes 10 to 25 minutes). A llama-cpp-python that
came with its own libraries keeps them.

The build is for CPUs; ``FLEETSERVE_LLAMA_SERVER_CMAKE_ARGS="-DGGML_CUDA=ON"`` (or
Metal, Vulkan, ...) adds llama.cpp's GPU backends where their toolchains are.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fleetserve import env, paths
from fleetserve.errors import ConfigError

_PACKAGE = "llama-cpp-python"
# Not needed to convert or build (vocabulary test files, documentation): 115 MB less.
_SKIPPED = ("models/", "docs/", "media/")
_CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",  # llama-cpp-python loads the same libraries (see above)
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",  # models come from files; no downloads
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",  # the web UI would be fetched from the hub; the gateway has one
    "-DLLAMA_USE_PREBUILT_UI=OFF",
]
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _version() -> str:
    try:
        return importlib.metadata.version(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "llama.cpp's sources come with llama-cpp-python: pip install 'fleetserve[llamacpp]'"
        ) from None


def source_dir() -> Path:
    """llama.cpp's source tree (converter included), fetched on first use."""
    checkout = env.llamacpp_source()
    if checkout is not None:
        return checkout
    version = _version()
    target = paths.llamacpp_dir() / f"src-{version}"
    if (target / "CMakeLists.txt").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        cmd += ["--no-binary", ":all:", "--dest", tmp, f"{_PACKAGE}=={version}"]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise ConfigError(f"cannot fetch the {_PACKAGE} {version} sources (llama.cpp's)")
        (archive,) = Path(tmp).glob("*.tar.gz")
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(archive) as tar:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            for member in tar.getmembers():
                name = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and name and not name.startswith(_SKIPPED):
                    member.name = name
                    tar.extract(member, staging, filter="data")
        staging.rename(target)
    return target


def _build_dir() -> Path:
    # "-shared": builds before the shared libraries were linked in another directory
    return paths.llamacpp_dir() / f"build-{_version()}-shared"


def _built_server() -> Path:
    return _build_dir() / "bin" / "llama-server"


def _python_package_libraries() -> Path | None:
    """Where llama-cpp-python loads libllama from (found without importing it: the import
    loads the library, which may not be there yet)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _install_python_libraries(built: Path) -> None:
    """Give a llama-cpp-python installed without its libraries those of this build."""
    target = _python_package_libraries()
    if target is None or any(target.glob("libllama.*")):
        return
    target.mkdir(exist_ok=True)
    for library in [*built.glob("lib*.so*"), *built.glob("lib*.dylib")]:
        shutil.copy2(library, target / library.name, follow_symlinks=False)


def server_binary() -> Path | None:
    """The llama-server to run: the one built here, else one on PATH (Homebrew's, ...)."""
    try:
        built = _built_server()
    except ConfigError:
        built = None
    if built is not None and built.is_file():
        return built
    found = shutil.which("llama-server")
    return Path(found) if found else None


def build_server(console: Console) -> Path:
    """Build llama-server and llama.cpp's libraries from :func:`source_dir` (minutes; once per
    version), and give them to llama-cpp-python if it has none."""
    binary = _built_server()
    if not binary.is_file():
        _build(binary, console)
    _install_python_libraries(binary.parent)
    return binary


def _build(binary: Path, console: Console) -> None:
    if shutil.which("cmake") is None:
        raise ConfigError("building llama-server needs cmake and a C++ compiler (cmake, g++)")
    build = binary.parent.parent
    extra = env.llama_server_cmake_args()
    configure = ["cmake", "-S", str(source_dir()), "-B", str(build), *_CMAKE_ARGS, *extra]
    compile_ = ["cmake", "--build", str(build), "--target", "llama-server"]
    compile_ += ["-j", str(len(os.sched_getaffinity(0)))]
    log = build.parent / f"{build.name}.log"
    build.mkdir(parents=True, exist_ok=True)
    console.print(f"building llama-server from llama.cpp's sources (minutes; log: {log})")
    columns = (TextColumn("building llama-server"), BarColumn(), TextColumn("{task.completed}%"))
    progress = Progress(*columns, TimeElapsedColumn(), console=console, transient=True)
    with log.open("w") as out, progress:
        task = progress.add_task("build", total=100)
        for cmd in (configure, compile_):
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if match := _PERCENT.match(line):
                    progress.update(task, completed=int(match.group(1)))
            if proc.wait() != 0:
                raise ConfigError(f"building llama-server failed ({shlex.join(cmd)}); see {log}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["build"]:
        sys.exit("usage: python -m workers.llamacpp.source build")
    try:
        print(f"llama-server: {build_server(Console(stderr=True))}")
    except ConfigError as exc:
        sys.exit(f"fleetserve: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
