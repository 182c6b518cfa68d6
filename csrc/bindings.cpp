// Python bindings of the host-side C++ components (module selfrag_engine._C).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "selfrag-engine host-side C++ components";
  m.def("abi_version", []() { return 1; }, "Version of the C++ component ABI.");
}
