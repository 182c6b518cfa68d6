# find_package(selfrag_engine): the selfrag_engine::engine and selfrag_engine::block_manager targets.
#
#   cmake -Dselfrag_engine_DIR="$(python -m selfrag_engine.cmake_dir)" [-DPython_EXECUTABLE=...] ...
#
# The engine embeds the Python interpreter that has selfrag_engine installed. Without Python_EXECUTABLE, the
# one next to this package is used: the environment a wheel was installed into, or a source checkout's .venv.
get_filename_component(_selfrag_root "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

if(NOT DEFINED Python_EXECUTABLE)
  get_filename_component(_selfrag_above "${_selfrag_root}/.." ABSOLUTE)
  if(EXISTS "${_selfrag_above}/__init__.py")
    # A wheel: <prefix>/lib/pythonX.Y/site-packages/selfrag_engine/csrc.
    set(_selfrag_python "${_selfrag_above}/../../../../bin/python3")
  else()
    # A source checkout: <checkout>/csrc beside <checkout>/.venv.
    set(_selfrag_python "${_selfrag_above}/.venv/bin/python3")
  endif()
  if(EXISTS "${_selfrag_python}")
    # Normalized but not resolved: a virtual environment's python is a symbolic link out of it.
    get_filename_component(_selfrag_python "${_selfrag_python}" ABSOLUTE)
    set(Python_EXECUTABLE "${_selfrag_python}" CACHE FILEPATH "the Python that has selfrag_engine installed")
  endif()
endif()
find_package(Python 3 COMPONENTS Interpreter Development.Embed REQUIRED)

execute_process(COMMAND "${Python_EXECUTABLE}" -c
                "import importlib.util, sys; sys.exit(importlib.util.find_spec('selfrag_engine') is None)"
                RESULT_VARIABLE _selfrag_missing OUTPUT_QUIET ERROR_QUIET)
if(_selfrag_missing)
  message(WARNING "selfrag_engine is not importable by ${Python_EXECUTABLE}; an Engine will fail to open "
                  "unless SELFRAG_ENGINE_PYTHON names an interpreter that has it")
endif()

if(NOT TARGET pybind11::embed)
  if(NOT DEFINED pybind11_DIR)
    execute_process(COMMAND "${Python_EXECUTABLE}" -m pybind11 --cmakedir OUTPUT_VARIABLE pybind11_DIR
                    OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _pybind11_missing)
    if(_pybind11_missing)
      message(FATAL_ERROR "pybind11 is not installed for ${Python_EXECUTABLE} (pip install pybind11)")
    endif()
  endif()
  set(PYBIND11_FINDPYTHON ON)
  find_package(pybind11 CONFIG REQUIRED)
endif()

include("${CMAKE_CURRENT_LIST_DIR}/selfrag_engine_targets.cmake")
set(selfrag_engine_FOUND TRUE)
