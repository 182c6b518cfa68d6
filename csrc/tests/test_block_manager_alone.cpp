// The block manager through selfrag_engine::block_manager only: no Python is built or linked. A Self-RAG
// shaped workload (a prompt, K forked branches, frees) must leave the pool as it found it.
#include <cstdio>
#include <vector>

#include "selfrag_engine/block_manager.h"

int main() {
  int passed = 0, failed = 0;
  auto check = [&](bool ok, const char* what) {
    ok ? ++passed : ++failed;
    if (!ok) std::printf("FAILED: %s\n", what);
  };
  selfrag::BlockManager bm(64, 4);
  std::vector<int32_t> prompt = {1, 5, 9, 13, 17, 21, 25, 29, 33, 37};
  check(bm.allocate(0, prompt) == 0, "a first prompt has nothing cached");
  bm.fork(0, {1, 2, 3});
  check(bm.num_shared_blocks() == 3, "forked branches share the prompt's three blocks");
  for (int64_t seq = 1; seq <= 3; ++seq) {
    auto copies = bm.append_tokens(seq, std::vector<int32_t>{static_cast<int32_t>(100 + seq)});
    check(copies.size() == 1, "a branch writing into the shared partial block copies it first");
  }
  for (int64_t seq = 0; seq <= 3; ++seq) bm.free(seq);
  bm.check_invariants();
  check(bm.num_used_blocks() == 0 && bm.num_free_blocks() == 64, "every block is free again");
  check(bm.allocate(4, prompt) == 8, "the freed prompt's full blocks are reused");
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
