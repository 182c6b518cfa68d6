// Bookkeeping for the paged KV cache: which pool blocks hold which sequence's tokens.
//
// Self-RAG forks one branch per retrieved passage from a shared prompt, so blocks are reference counted
// and a shared prefix is stored once. Full blocks are also indexed by a chained hash of their tokens
// (automatic prefix caching): a new prompt that starts like an earlier one reuses its blocks, even after
// the earlier sequence was freed, until the pool needs them back (least recently used first).
//
// The manager hands out block ids only; the engine owns the K/V tensors, writes the tokens the manager
// reports as uncached and performs the copy-on-write copies that append_tokens returns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

namespace selfrag {

// Not enough free or evictable blocks. The manager's state is unchanged when this is thrown.
class OutOfBlocks : public std::runtime_error {
 public:
  OutOfBlocks(int needed, int available);
  int needed() const { return needed_; }
  int available() const { return available_; }

 private:
  int needed_, available_;
};

class UnknownSequence : public std::out_of_range {
 public:
  explicit UnknownSequence(int64_t seq);
};

class DuplicateSequence : public std::invalid_argument {
 public:
  explicit DuplicateSequence(int64_t seq);
};

// A read-only view of token ids, so callers can pass a slice of a longer list without copying it.
class TokenSpan {
 public:
  TokenSpan(const int32_t* data, size_t size) : data_(data), size_(size) {}
  // Implicit, so that a std::vector can be passed where a span is expected.
  TokenSpan(const std::vector<int32_t>& v) : data_(v.data()), size_(v.size()) {}  // NOLINT
  const int32_t* begin() const { return data_; }
  const int32_t* end() const { return data_ + size_; }
  const int32_t& operator[](size_t i) const { return data_[i]; }
  size_t size() const { return size_; }

 private:
  const int32_t* data_;
  size_t size_;
};

// Block tables of several sequences, row-major, rows padded to the longest one.
struct PaddedTables {
  std::vector<int32_t> data;
  int rows = 0;
  int width = 0;
};

class BlockManager {
 public:
  explicit BlockManager(int num_blocks, int block_size = 16, bool enable_prefix_caching = true);

  // Creates `seq` holding `prompt`. Returns how many leading tokens already have their K/V in the pool
  // (a multiple of block_size, always less than the prompt length); the caller computes the rest.
  // reuse_prefix=false skips the lookup (every position is computed), yet still indexes the full blocks.
  int allocate(int64_t seq, TokenSpan prompt, bool reuse_prefix = true);

  // Adds tokens to `seq`. Returns the (src, dst) block copies the caller must perform before writing
  // the new tokens: a partially filled last block that is shared with another sequence is copied first.
  std::vector<std::pair<int, int>> append_tokens(int64_t seq, TokenSpan tokens);

  // Room for `n` tokens whose ids are not known yet: a decode step launched while the step before it, which
  // samples its input token, still runs on the device. Slots and copies as for append_tokens; the reserved
  // tokens are neither hashed nor indexed until commit_reserved gives their ids. While a sequence holds
  // reserved tokens, append_tokens and fork refuse it.
  std::vector<std::pair<int, int>> reserve_tokens(int64_t seq, int n);

  // Gives the ids of the first tokens.size() reserved tokens, which may complete (and index) blocks.
  void commit_reserved(int64_t seq, TokenSpan tokens);

  // Drops every reserved token, releasing the blocks that held nothing else.
  void cancel_reserved(int64_t seq);

  int num_reserved(int64_t seq) const { return get(seq).reserved; }

  // Keeps the first `num_tokens` tokens (reserved ones included, as placeholders): a speculative step rolls
  // back the slots of draft tokens it rejected. Blocks wholly past the end are released (full indexed ones
  // stay cached: their K/V are valid for the tokens they hold). The block the cut falls in is kept as it is;
  // if other sequences share it or the prefix index serves it (full), the next append or reservation copies
  // it on write, so neither ever sees the new tail. Throws std::out_of_range past the sequence's length.
  void truncate(int64_t seq, int num_tokens);

  // Each child starts as an exact copy of `parent`, sharing all of its blocks.
  void fork(int64_t parent, const std::vector<int64_t>& children);

  // Releases the sequence's blocks. Full blocks stay cached for reuse, except those past the first
  // `computed_tokens` (negative: all computed): a sequence freed mid-prefill never wrote their K/V.
  void free(int64_t seq, int computed_tokens = -1);

  bool has(int64_t seq) const { return seqs_.count(seq) != 0; }
  int num_seqs() const { return static_cast<int>(seqs_.size()); }
  const std::vector<int32_t>& block_table(int64_t seq) const { return get(seq).table; }
  const std::vector<int32_t>& tokens(int64_t seq) const { return get(seq).tokens; }
  int num_tokens(int64_t seq) const { return static_cast<int>(get(seq).tokens.size()); }
  int64_t slot(int64_t seq, int token_index) const;

  // Pool slots of tokens [starts[i], starts[i] + counts[i]) of seqs[i], concatenated; with `starts`
  // empty, of the last counts[i] tokens of each sequence.
  std::vector<int64_t> slot_mapping(const std::vector<int64_t>& seqs, const std::vector<int32_t>& counts,
                                    const std::vector<int32_t>& starts = {}) const;
  PaddedTables block_tables(const std::vector<int64_t>& seqs, int32_t pad = -1) const;

  // Conservative: prefix-cache hits that could make a request fit are not counted.
  bool can_allocate(int num_tokens) const;
  bool can_append(int64_t seq, int num_tokens) const;

  int num_blocks() const { return static_cast<int>(blocks_.size()); }
  int block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  int num_free_blocks() const { return static_cast<int>(free_.size() + evictable_.size()); }
  int num_used_blocks() const { return used_; }
  int num_shared_blocks() const { return shared_; }
  int num_cached_blocks() const { return static_cast<int>(evictable_.size()); }
  int refcount(int block) const;

  // Cross-checks every internal structure against the others; throws std::logic_error on a mismatch.
  // O(pool + tokens): for tests.
  void check_invariants() const;

 private:
  struct Block {
    int refcount = 0;
    uint64_t generation = 0;  // bumped on every reuse, so stale references to it can be told apart
    bool indexed = false;     // the prefix index maps `hash` to this block
    uint64_t hash = 0;
    int prev = -1;            // the block before this one in the sequence it was filled for
    uint64_t prev_generation = 0;
    std::vector<int32_t> tokens;  // kept while indexed, to verify a hash hit
    std::list<int>::iterator lru_pos;  // valid while evictable
  };
  struct Sequence {
    std::vector<int32_t> tokens;
    std::vector<int32_t> table;
    std::vector<uint64_t> hashes;  // chained hash of each full block of known tokens
    int reserved = 0;              // trailing tokens whose ids are not known yet (placeholders in `tokens`)
  };

  const Sequence& get(int64_t seq) const;
  Sequence& get(int64_t seq);
  int blocks_for(size_t num_tokens) const;
  int available() const { return num_free_blocks(); }
  int blocks_to_append(const Sequence& s, size_t num_tokens) const;
  // A sequence's partly filled last block that others read: shared, or indexed as full (after a truncate).
  static bool must_copy(const Block& b) { return b.refcount > 1 || b.indexed; }
  std::vector<std::pair<int, int>> grow(Sequence& s, TokenSpan tokens);
  void extend_hashes(Sequence& s) const;
  int lookup(uint64_t hash, const int32_t* tokens, int prev) const;
  int take_block();
  void retain(int block);
  void release(int block, bool keep_cached = true);
  void unindex(Block& b);
  void index_full_blocks(Sequence& s, size_t first_block);

  int block_size_;
  bool prefix_caching_;
  std::vector<Block> blocks_;
  std::vector<int> free_;        // refcount 0, not indexed; a stack
  std::list<int> evictable_;     // refcount 0, indexed; least recently used first
  std::unordered_map<uint64_t, int> index_;  // chained block hash -> block
  std::unordered_map<int64_t, Sequence> seqs_;
  int used_ = 0;
  int shared_ = 0;
};

}  // namespace selfrag
