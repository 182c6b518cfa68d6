"""`python -m selfrag_engine.cmake_dir`: the directory of the CMake config package of the C++ API, for

    cmake -Dselfrag_engine_DIR="$(python -m selfrag_engine.cmake_dir)" ...

(as `python -m pybind11 --cmakedir`). An installed wheel carries the C++ sources in `selfrag_engine/csrc/`; a
source checkout (and its editable install) has them in `csrc/` beside the package.
"""
from __future__ import annotations

import sys
from pathlib import Path

CONFIG = "selfrag_engineConfig.cmake"


def cmake_dir() -> Path:
    here = Path(__file__).resolve().parent
    for root in (here / "csrc", here.parent / "csrc"):
        if (root / "cmake" / CONFIG).is_file():
            return root / "cmake"
    raise FileNotFoundError(f"no {CONFIG} in {here / 'csrc'} or {here.parent / 'csrc'}: this installation of "
                            "selfrag_engine was built without its C++ sources")


def main() -> int:
    try:
        print(cmake_dir())
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
