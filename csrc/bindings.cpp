// Python bindings of the host-side C++ components (module selfrag_engine._C).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "selfrag_engine/block_manager.h"

namespace py = pybind11;
using selfrag::BlockManager;

namespace {

// Hands the vector's buffer to NumPy without a copy; the capsule frees it with the array.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, owned->data(), free_when_done);
}

void bind_block_manager(py::module_& m) {
  // The module keeps the type alive; a leaked handle avoids destroying a Python object at process exit.
  static py::handle out_of_blocks =
      py::exception<selfrag::OutOfBlocks>(m, "OutOfBlocksError", PyExc_RuntimeError).release();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const selfrag::OutOfBlocks& e) {
      // Attributes let a scheduler decide how many blocks to reclaim without parsing the message.
      py::object err = out_of_blocks(e.what());
      err.attr("needed") = e.needed();
      err.attr("available") = e.available();
      PyErr_SetObject(out_of_blocks.ptr(), err.ptr());
    }
  });
  py::register_exception<selfrag::UnknownSequence>(m, "UnknownSequenceError", PyExc_KeyError);
  py::register_exception<selfrag::DuplicateSequence>(m, "DuplicateSequenceError", PyExc_ValueError);

  py::class_<BlockManager>(m, "BlockManager",
                           "Reference-counted KV cache blocks with copy-on-write and automatic prefix caching.")
      .def(py::init<int, int, bool>(), py::arg("num_blocks"), py::arg("block_size") = 16,
           py::arg("enable_prefix_caching") = true)
      .def(
          "allocate",
          [](BlockManager& bm, int64_t seq, const std::vector<int32_t>& prompt, bool reuse_prefix) {
            return bm.allocate(seq, prompt, reuse_prefix);
          },
          py::arg("seq_id"), py::arg("prompt_tokens"), py::arg("reuse_prefix") = true,
          "Creates the sequence; returns how many leading tokens are already cached (a multiple of "
          "block_size, less than len(prompt_tokens)).")
      .def(
          "append_tokens",
          [](BlockManager& bm, int64_t seq, const std::vector<int32_t>& tokens) {
            return bm.append_tokens(seq, tokens);
          },
          py::arg("seq_id"), py::arg("tokens"),
          "Grows the sequence; returns the (src, dst) block copies to perform before writing the tokens.")
      .def("reserve_tokens", &BlockManager::reserve_tokens, py::arg("seq_id"), py::arg("num_tokens"),
           "Room for tokens whose ids are not known yet; returns the (src, dst) block copies as append_tokens.")
      .def(
          "commit_reserved",
          [](BlockManager& bm, int64_t seq, const std::vector<int32_t>& tokens) { bm.commit_reserved(seq, tokens); },
          py::arg("seq_id"), py::arg("tokens"), "Gives the ids of the first len(tokens) reserved tokens.")
      .def("cancel_reserved", &BlockManager::cancel_reserved, py::arg("seq_id"),
           "Drops the reserved tokens and the blocks that held nothing else.")
      .def("num_reserved", &BlockManager::num_reserved, py::arg("seq_id"))
      .def("truncate", &BlockManager::truncate, py::arg("seq_id"), py::arg("num_tokens"),
           "Keeps the first num_tokens tokens (rolls back rejected draft slots); a shared last block stays "
           "shared and is copied on the next append, a private indexed one leaves the prefix index.")
      .def("fork", &BlockManager::fork, py::arg("parent"), py::arg("children"))
      .def("free", &BlockManager::free, py::arg("seq_id"), py::arg("computed_tokens") = -1,
           "Releases the blocks; full blocks stay cached for reuse unless they lie past the first "
           "computed_tokens (negative: all), whose K/V a sequence freed mid-prefill never wrote.")
      .def("has", &BlockManager::has, py::arg("seq_id"))
      .def("__contains__", &BlockManager::has)
      .def("num_seqs", &BlockManager::num_seqs)
      .def("block_table", &BlockManager::block_table, py::arg("seq_id"))
      .def("tokens", &BlockManager::tokens, py::arg("seq_id"))
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq_id"))
      .def("slot", &BlockManager::slot, py::arg("seq_id"), py::arg("token_index"))
      .def(
          "slot_mapping",
          [](const BlockManager& bm, const std::vector<int64_t>& seqs, const std::vector<int32_t>& counts,
             std::optional<std::vector<int32_t>> starts) {
            std::vector<int64_t> slots = bm.slot_mapping(seqs, counts, starts.value_or(std::vector<int32_t>{}));
            const auto n = static_cast<py::ssize_t>(slots.size());
            return to_numpy(std::move(slots), {n});
          },
          py::arg("seq_ids"), py::arg("counts"), py::arg("starts") = py::none(),
          "int64 array: slots of tokens [starts[i], starts[i] + counts[i]) of each sequence, concatenated; "
          "of the last counts[i] tokens when starts is None.")
      .def(
          "block_tables",
          [](const BlockManager& bm, const std::vector<int64_t>& seqs, int32_t pad) {
            selfrag::PaddedTables t = bm.block_tables(seqs, pad);
            return to_numpy(std::move(t.data), {t.rows, t.width});
          },
          py::arg("seq_ids"), py::arg("pad") = -1, "int32 array [len(seq_ids), longest table], padded.")
      .def("can_allocate", &BlockManager::can_allocate, py::arg("num_tokens"))
      .def("can_append", &BlockManager::can_append, py::arg("seq_id"), py::arg("num_tokens"))
      .def("num_blocks", &BlockManager::num_blocks)
      .def("block_size", &BlockManager::block_size)
      .def("prefix_caching", &BlockManager::prefix_caching)
      .def("num_free_blocks", &BlockManager::num_free_blocks, "Free plus evictable cached blocks.")
      .def("num_used_blocks", &BlockManager::num_used_blocks)
      .def("num_shared_blocks", &BlockManager::num_shared_blocks)
      .def("num_cached_blocks", &BlockManager::num_cached_blocks, "Unreferenced blocks kept for prefix reuse.")
      .def("refcount", &BlockManager::refcount, py::arg("block"))
      .def("check_invariants", &BlockManager::check_invariants)
      .def("__repr__", [](const BlockManager& bm) {
        return "BlockManager(num_blocks=" + std::to_string(bm.num_blocks()) +
               ", block_size=" + std::to_string(bm.block_size()) + ", seqs=" + std::to_string(bm.num_seqs()) +
               ", used=" + std::to_string(bm.num_used_blocks()) + ", free=" + std::to_string(bm.num_free_blocks()) +
               ")";
      });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "selfrag-engine host-side C++ components";
  m.def("abi_version", []() { return 1; }, "Version of the C++ component ABI.");
  bind_block_manager(m);
}
