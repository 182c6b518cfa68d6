#include "selfrag_engine/block_manager.h"

#include <algorithm>
#include <string>
#include <unordered_set>

// Tests narrow the hash to a few bits to force collisions; a hit is verified, so results must not change.
#ifndef SELFRAG_BLOCK_HASH_MASK
#define SELFRAG_BLOCK_HASH_MASK (~0ULL)
#endif

namespace selfrag {

namespace {

constexpr uint64_t kChainSeed = 0x6a09e667f3bcc908ULL;

uint64_t mix64(uint64_t x) {  // splitmix64's finalizer
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Chained: a block's hash covers its tokens and, through `prev`, every token before them, because K/V
// at a position depend on the whole prefix.
uint64_t hash_block(uint64_t prev, const int32_t* tokens, int n) {
  uint64_t h = mix64(prev + 0x9e3779b97f4a7c15ULL);
  for (int i = 0; i < n; ++i) h = mix64(h ^ static_cast<uint32_t>(tokens[i]));
  return h & SELFRAG_BLOCK_HASH_MASK;
}

}  // namespace

OutOfBlocks::OutOfBlocks(int needed, int available)
    : std::runtime_error("out of KV cache blocks: need " + std::to_string(needed) + ", only " +
                         std::to_string(available) + " free"),
      needed_(needed),
      available_(available) {}

UnknownSequence::UnknownSequence(int64_t seq)
    : std::out_of_range("unknown sequence id " + std::to_string(seq)) {}

DuplicateSequence::DuplicateSequence(int64_t seq)
    : std::invalid_argument("sequence id " + std::to_string(seq) + " already exists") {}

BlockManager::BlockManager(int num_blocks, int block_size, bool enable_prefix_caching)
    : block_size_(block_size), prefix_caching_(enable_prefix_caching) {
  if (block_size <= 0) throw std::invalid_argument("block_size must be positive, got " + std::to_string(block_size));
  if (num_blocks <= 0) throw std::invalid_argument("num_blocks must be positive, got " + std::to_string(num_blocks));
  blocks_.resize(num_blocks);
  free_.reserve(num_blocks);
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // a stack: hands out 0, 1, 2, ... first
}

const BlockManager::Sequence& BlockManager::get(int64_t seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw UnknownSequence(seq);
  return it->second;
}

BlockManager::Sequence& BlockManager::get(int64_t seq) {
  return const_cast<Sequence&>(static_cast<const BlockManager*>(this)->get(seq));
}

int BlockManager::blocks_for(size_t num_tokens) const {
  return static_cast<int>((num_tokens + block_size_ - 1) / block_size_);
}

int BlockManager::refcount(int block) const {
  if (block < 0 || block >= num_blocks())
    throw std::out_of_range("block " + std::to_string(block) + " is outside the pool of " +
                            std::to_string(num_blocks()));
  return blocks_[block].refcount;
}

void BlockManager::extend_hashes(Sequence& s) const {
  if (!prefix_caching_) return;
  const size_t full = (s.tokens.size() - s.reserved) / block_size_;
  for (size_t i = s.hashes.size(); i < full; ++i) {
    const uint64_t prev = i == 0 ? kChainSeed : s.hashes[i - 1];
    s.hashes.push_back(hash_block(prev, s.tokens.data() + i * block_size_, block_size_));
  }
}

int BlockManager::lookup(uint64_t hash, const int32_t* tokens, int prev) const {
  auto it = index_.find(hash);
  if (it == index_.end()) return -1;
  const Block& b = blocks_[it->second];
  // Equal tokens after an equal prefix: the predecessor must be the very block (same reuse generation)
  // this one was filled after, so even a colliding hash never aliases different K/V.
  const bool same_prefix = b.prev == prev && (prev < 0 || b.prev_generation == blocks_[prev].generation);
  if (!same_prefix || !std::equal(b.tokens.begin(), b.tokens.end(), tokens)) return -1;
  return it->second;
}

int BlockManager::take_block() {
  int b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else {
    b = evictable_.front();
    evictable_.pop_front();
    unindex(blocks_[b]);
  }
  Block& blk = blocks_[b];
  ++blk.generation;
  blk.refcount = 1;
  ++used_;
  return b;
}

void BlockManager::unindex(Block& b) {
  index_.erase(b.hash);
  b.indexed = false;
  b.tokens.clear();
}

void BlockManager::retain(int block) {
  Block& b = blocks_[block];
  if (b.refcount == 0) {
    evictable_.erase(b.lru_pos);  // only indexed blocks are retained from refcount 0
    ++used_;
  } else if (b.refcount == 1) {
    ++shared_;
  }
  ++b.refcount;
}

void BlockManager::release(int block, bool keep_cached) {
  Block& b = blocks_[block];
  --b.refcount;
  if (b.refcount == 1) {
    --shared_;
  } else if (b.refcount == 0) {
    --used_;
    if (b.indexed && !keep_cached) unindex(b);
    if (b.indexed) {
      b.lru_pos = evictable_.insert(evictable_.end(), block);
    } else {
      free_.push_back(block);
    }
  }
}

void BlockManager::index_full_blocks(Sequence& s, size_t first_block) {
  if (!prefix_caching_) return;
  for (size_t i = first_block; i < s.hashes.size(); ++i) {
    Block& b = blocks_[s.table[i]];
    // A block is indexed only if a lookup can reach it through its predecessor; the first holder of
    // a hash keeps it, as other sequences may already be chaining from it.
    if (b.indexed || index_.count(s.hashes[i])) continue;
    const int prev = i == 0 ? -1 : s.table[i - 1];
    if (prev >= 0 && !blocks_[prev].indexed) continue;
    b.indexed = true;
    b.hash = s.hashes[i];
    b.prev = prev;
    b.prev_generation = prev >= 0 ? blocks_[prev].generation : 0;
    b.tokens.assign(s.tokens.begin() + i * block_size_, s.tokens.begin() + (i + 1) * block_size_);
    index_.emplace(b.hash, s.table[i]);
  }
}

int BlockManager::allocate(int64_t seq, TokenSpan prompt, bool reuse_prefix) {
  if (has(seq)) throw DuplicateSequence(seq);
  Sequence s;
  s.tokens.assign(prompt.begin(), prompt.end());
  extend_hashes(s);

  std::vector<int32_t> hits;
  int reclaimed = 0;  // hits that are evictable now, so no longer count as available
  if (prefix_caching_ && reuse_prefix && !s.tokens.empty()) {
    // The last token always stays uncached: the caller computes the logits from it.
    const size_t reusable = (s.tokens.size() - 1) / block_size_;
    for (size_t i = 0; i < reusable; ++i) {
      const int b = lookup(s.hashes[i], s.tokens.data() + i * block_size_, hits.empty() ? -1 : hits.back());
      if (b < 0) break;
      hits.push_back(b);
      reclaimed += blocks_[b].refcount == 0;
    }
  }
  const int fresh = blocks_for(s.tokens.size()) - static_cast<int>(hits.size());
  if (fresh > available() - reclaimed) throw OutOfBlocks(fresh, available() - reclaimed);

  for (int b : hits) retain(b);  // before take_block, which could otherwise evict them
  s.table = hits;
  for (int i = 0; i < fresh; ++i) s.table.push_back(take_block());
  index_full_blocks(s, hits.size());
  seqs_.emplace(seq, std::move(s));
  return static_cast<int>(hits.size()) * block_size_;
}

int BlockManager::blocks_to_append(const Sequence& s, size_t num_tokens) const {
  const size_t n = s.tokens.size();
  const bool copy_last = n % block_size_ != 0 && must_copy(blocks_[s.table.back()]);
  return blocks_for(n + num_tokens) - static_cast<int>(s.table.size()) + (copy_last ? 1 : 0);
}

std::vector<std::pair<int, int>> BlockManager::grow(Sequence& s, TokenSpan tokens) {
  std::vector<std::pair<int, int>> copies;
  const int needed = blocks_to_append(s, tokens.size());
  if (needed > available()) throw OutOfBlocks(needed, available());

  if (s.tokens.size() % block_size_ != 0 && must_copy(blocks_[s.table.back()])) {
    // Writing into a block others still read (or that the prefix index serves as full, for a sequence
    // truncated into it) would change their K/V: write into a private copy.
    const int src = s.table.back();
    const int dst = take_block();
    release(src);
    s.table.back() = dst;
    copies.emplace_back(src, dst);
  }
  s.tokens.insert(s.tokens.end(), tokens.begin(), tokens.end());
  const int total = blocks_for(s.tokens.size());
  while (static_cast<int>(s.table.size()) < total) s.table.push_back(take_block());
  return copies;
}

std::vector<std::pair<int, int>> BlockManager::append_tokens(int64_t seq, TokenSpan tokens) {
  Sequence& s = get(seq);
  if (tokens.size() == 0) return {};
  if (s.reserved > 0)
    throw std::invalid_argument("sequence " + std::to_string(seq) + " has " + std::to_string(s.reserved) +
                                " reserved tokens: commit or cancel them before appending");
  auto copies = grow(s, tokens);
  const size_t first_new_full = s.hashes.size();
  extend_hashes(s);
  index_full_blocks(s, first_new_full);
  return copies;
}

std::vector<std::pair<int, int>> BlockManager::reserve_tokens(int64_t seq, int n) {
  Sequence& s = get(seq);
  if (n < 0) throw std::invalid_argument("cannot reserve " + std::to_string(n) + " tokens");
  if (n == 0) return {};
  const std::vector<int32_t> placeholders(n, -1);
  auto copies = grow(s, placeholders);
  s.reserved += n;
  return copies;
}

void BlockManager::commit_reserved(int64_t seq, TokenSpan tokens) {
  Sequence& s = get(seq);
  if (static_cast<int>(tokens.size()) > s.reserved)
    throw std::invalid_argument("sequence " + std::to_string(seq) + " has " + std::to_string(s.reserved) +
                                " reserved tokens, not " + std::to_string(tokens.size()));
  std::copy(tokens.begin(), tokens.end(), s.tokens.end() - s.reserved);
  s.reserved -= static_cast<int>(tokens.size());
  const size_t first_new_full = s.hashes.size();
  extend_hashes(s);
  index_full_blocks(s, first_new_full);
}

void BlockManager::cancel_reserved(int64_t seq) {
  Sequence& s = get(seq);
  s.tokens.resize(s.tokens.size() - s.reserved);
  s.reserved = 0;
  // Blocks past the known tokens held only placeholders: never indexed, so they go straight back to the pool.
  const size_t keep = blocks_for(s.tokens.size());
  while (s.table.size() > keep) {
    release(s.table.back(), false);
    s.table.pop_back();
  }
}

void BlockManager::truncate(int64_t seq, int num_tokens) {
  Sequence& s = get(seq);
  const int n = static_cast<int>(s.tokens.size());
  if (num_tokens < 0 || num_tokens > n)
    throw std::out_of_range("cannot truncate sequence " + std::to_string(seq) + " of " + std::to_string(n) +
                            " tokens to " + std::to_string(num_tokens));
  if (num_tokens == n) return;
  const int known = n - s.reserved;
  s.reserved = std::max(0, num_tokens - known);
  s.tokens.resize(num_tokens);
  const size_t keep = blocks_for(s.tokens.size());
  while (s.table.size() > keep) {
    release(s.table.back());
    s.table.pop_back();
  }
  if (prefix_caching_) s.hashes.resize(std::min(s.hashes.size(), (s.tokens.size() - s.reserved) / block_size_));
}

void BlockManager::fork(int64_t parent, const std::vector<int64_t>& children) {
  const Sequence& p = get(parent);
  if (p.reserved > 0)
    throw std::invalid_argument("sequence " + std::to_string(parent) + " has reserved tokens and cannot be forked");
  std::unordered_set<int64_t> seen;
  for (int64_t c : children) {
    if (c == parent || has(c) || !seen.insert(c).second) throw DuplicateSequence(c);
  }
  // References to unordered_map elements survive rehashing, so `p` stays valid while children are added.
  for (int64_t c : children) {
    seqs_.emplace(c, p);
    for (int b : p.table) retain(b);
  }
}

void BlockManager::free(int64_t seq, int computed_tokens) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw UnknownSequence(seq);
  const std::vector<int32_t>& table = it->second.table;
  const size_t valid_blocks = computed_tokens < 0 ? table.size() : computed_tokens / block_size_;
  // Last block first: it lands earliest in the LRU and is evicted before the prefix it extends,
  // which other prompts are more likely to share and without which it is useless anyway.
  for (size_t i = table.size(); i-- > 0;) release(table[i], i < valid_blocks);
  seqs_.erase(it);
}

int64_t BlockManager::slot(int64_t seq, int token_index) const {
  const Sequence& s = get(seq);
  if (token_index < 0 || static_cast<size_t>(token_index) >= s.tokens.size())
    throw std::out_of_range("token index " + std::to_string(token_index) + " is outside sequence " +
                            std::to_string(seq) + " of " + std::to_string(s.tokens.size()) + " tokens");
  return static_cast<int64_t>(s.table[token_index / block_size_]) * block_size_ + token_index % block_size_;
}

std::vector<int64_t> BlockManager::slot_mapping(const std::vector<int64_t>& seqs, const std::vector<int32_t>& counts,
                                                const std::vector<int32_t>& starts) const {
  if (counts.size() != seqs.size() || (!starts.empty() && starts.size() != seqs.size()))
    throw std::invalid_argument("slot_mapping: " + std::to_string(seqs.size()) + " sequences but " +
                                std::to_string(counts.size()) + " counts and " + std::to_string(starts.size()) +
                                " starts");
  std::vector<int64_t> slots;
  size_t total = 0;
  for (int32_t c : counts) total += c > 0 ? c : 0;
  slots.reserve(total);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& s = get(seqs[i]);
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    const int64_t start = starts.empty() ? n - counts[i] : starts[i];
    const int64_t end = start + counts[i];
    if (counts[i] < 0 || start < 0 || end > n)
      throw std::out_of_range("slot_mapping: tokens [" + std::to_string(start) + ", " + std::to_string(end) +
                              ") are outside sequence " + std::to_string(seqs[i]) + " of " + std::to_string(n) +
                              " tokens");
    for (int64_t t = start; t < end; ++t)
      slots.push_back(static_cast<int64_t>(s.table[t / block_size_]) * block_size_ + t % block_size_);
  }
  return slots;
}

PaddedTables BlockManager::block_tables(const std::vector<int64_t>& seqs, int32_t pad) const {
  std::vector<const Sequence*> rows;
  rows.reserve(seqs.size());
  PaddedTables out;
  for (int64_t id : seqs) {
    rows.push_back(&get(id));
    out.width = std::max(out.width, static_cast<int>(rows.back()->table.size()));
  }
  out.rows = static_cast<int>(rows.size());
  out.data.assign(static_cast<size_t>(out.rows) * out.width, pad);
  for (size_t r = 0; r < rows.size(); ++r)
    std::copy(rows[r]->table.begin(), rows[r]->table.end(), out.data.begin() + r * out.width);
  return out;
}

bool BlockManager::can_allocate(int num_tokens) const {
  return num_tokens >= 0 && blocks_for(num_tokens) <= available();
}

bool BlockManager::can_append(int64_t seq, int num_tokens) const {
  const Sequence& s = get(seq);
  return num_tokens >= 0 && (num_tokens == 0 || blocks_to_append(s, num_tokens) <= available());
}

void BlockManager::check_invariants() const {
  auto fail = [](const std::string& what) { throw std::logic_error("block manager invariant: " + what); };
  std::vector<int> refs(blocks_.size(), 0);
  for (const auto& [id, s] : seqs_) {
    if (static_cast<int>(s.table.size()) != blocks_for(s.tokens.size()))
      fail("sequence " + std::to_string(id) + " has " + std::to_string(s.table.size()) + " blocks for " +
           std::to_string(s.tokens.size()) + " tokens");
    if (s.reserved < 0 || static_cast<size_t>(s.reserved) > s.tokens.size())
      fail("sequence " + std::to_string(id) + " has " + std::to_string(s.reserved) + " reserved tokens");
    if (prefix_caching_ && s.hashes.size() != (s.tokens.size() - s.reserved) / block_size_)
      fail("sequence " + std::to_string(id) + " has hashes for " + std::to_string(s.hashes.size()) + " blocks");
    for (size_t i = 0; i < s.table.size(); ++i) {
      const int b = s.table[i];
      if (b < 0 || b >= num_blocks()) fail("sequence " + std::to_string(id) + " holds bad block " + std::to_string(b));
      ++refs[b];
      const Block& blk = blocks_[b];
      // A shared indexed block may be partly held by a sequence truncated into it (copied before its next write).
      const size_t held = std::min<size_t>(block_size_, s.tokens.size() - i * block_size_);
      if (blk.indexed && !std::equal(blk.tokens.begin(), blk.tokens.begin() + held, s.tokens.begin() + i * block_size_))
        fail("indexed block " + std::to_string(b) + " disagrees with sequence " + std::to_string(id));
    }
  }
  int used = 0, shared = 0, indexed = 0;
  for (size_t b = 0; b < blocks_.size(); ++b) {
    const Block& blk = blocks_[b];
    if (blk.refcount != refs[b])
      fail("block " + std::to_string(b) + " has refcount " + std::to_string(blk.refcount) + " but " +
           std::to_string(refs[b]) + " holders");
    used += blk.refcount > 0;
    shared += blk.refcount > 1;
    if (blk.indexed) {
      ++indexed;
      auto it = index_.find(blk.hash);
      if (it == index_.end() || it->second != static_cast<int>(b))
        fail("indexed block " + std::to_string(b) + " is missing from the index");
      if (static_cast<int>(blk.tokens.size()) != block_size_)
        fail("indexed block " + std::to_string(b) + " is not full");
    }
  }
  if (used != used_ || shared != shared_) fail("used/shared counters are stale");
  if (indexed != static_cast<int>(index_.size())) fail("the index maps blocks that are not marked indexed");
  std::vector<char> pooled(blocks_.size(), 0);
  for (int b : free_) {
    if (blocks_[b].refcount != 0 || blocks_[b].indexed || pooled[b]++)
      fail("free block " + std::to_string(b) + " is referenced, indexed or listed twice");
  }
  for (auto it = evictable_.begin(); it != evictable_.end(); ++it) {
    const int b = *it;
    if (blocks_[b].refcount != 0 || !blocks_[b].indexed || pooled[b]++ || blocks_[b].lru_pos != it)
      fail("evictable block " + std::to_string(b) + " is referenced, unindexed or listed twice");
  }
  if (static_cast<int>(free_.size() + evictable_.size()) + used != num_blocks())
    fail("free, evictable and used blocks do not add up to the pool");
}

}  // namespace selfrag
