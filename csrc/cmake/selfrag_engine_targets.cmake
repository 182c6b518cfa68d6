# The targets of the C++ API, compiled from the sources around this file in the consumer's own build (so they
# match its compiler and flags): selfrag_engine::block_manager (the KV block manager alone, no Python) and
# selfrag_engine::engine (selfrag::Engine over an embedded interpreter).
get_filename_component(_selfrag_root "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

if(NOT TARGET selfrag_engine_block_manager)
  add_library(selfrag_engine_block_manager STATIC "${_selfrag_root}/block_manager.cpp")
  target_include_directories(selfrag_engine_block_manager PUBLIC "${_selfrag_root}/include")
  target_compile_features(selfrag_engine_block_manager PUBLIC cxx_std_17)
  set_target_properties(selfrag_engine_block_manager PROPERTIES OUTPUT_NAME selfrag_block_manager
                        POSITION_INDEPENDENT_CODE ON)
  add_library(selfrag_engine::block_manager ALIAS selfrag_engine_block_manager)
endif()

if(NOT TARGET selfrag_engine_engine)
  find_package(Threads REQUIRED)
  add_library(selfrag_engine_engine STATIC "${_selfrag_root}/embed/engine.cpp")
  target_include_directories(selfrag_engine_engine PUBLIC "${_selfrag_root}/include")
  target_compile_features(selfrag_engine_engine PUBLIC cxx_std_17)
  # pybind11 stays private: the public header speaks plain C++. A static library still hands its link
  # dependencies (libpython) on to the program.
  target_link_libraries(selfrag_engine_engine PRIVATE pybind11::embed PUBLIC Threads::Threads)
  # The interpreter whose environment (site-packages) the engine imports by default.
  target_compile_definitions(selfrag_engine_engine PRIVATE SELFRAG_ENGINE_PYTHON="${Python_EXECUTABLE}")
  # The bridge only converts structs and hands them to Python: -O1 compiles it fastest at no cost that shows.
  target_compile_options(selfrag_engine_engine PRIVATE -O1)
  set_target_properties(selfrag_engine_engine PROPERTIES OUTPUT_NAME selfrag_engine POSITION_INDEPENDENT_CODE ON)
  add_library(selfrag_engine::engine ALIAS selfrag_engine_engine)
endif()
