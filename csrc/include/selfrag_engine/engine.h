// The engine from C++: load a Self-RAG checkpoint, generate, and answer questions with Self-RAG.
//
// The model runs in an embedded Python interpreter (started once per process, on the first Engine), driven
// by the same engine loop as `selfrag-engine serve`: one thread owns the model steps, and every request and
// query from any C++ thread joins them. The calls below only convert plain structs and hand them over; no
// C++ thread holds the GIL while it waits for a result.
//
// Errors are exceptions: a named engine error arrives as the C++ class of the same name (RequestError,
// CheckpointError, ...), all derived from selfrag::Error, whose kind() is the engine's class name.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace selfrag {

// ---- errors ------------------------------------------------------------------------------------------

class Error : public std::runtime_error {
 public:
  // kinds: the engine's class name, then its named bases (most specific first).
  Error(std::vector<std::string> kinds, const std::string& message);
  const std::string& kind() const { return kinds_.front(); }
  const std::vector<std::string>& kinds() const { return kinds_; }
  bool is_a(const std::string& kind) const;
  const std::string& message() const { return message_; }

 private:
  std::vector<std::string> kinds_;
  std::string message_;
};

#define SELFRAG_ERROR(Name, Base) \
  class Name : public Base {      \
   public:                        \
    using Base::Base;             \
  };
SELFRAG_ERROR(CheckpointError, Error)
SELFRAG_ERROR(TokenizerError, CheckpointError)
SELFRAG_ERROR(RequestError, Error)
SELFRAG_ERROR(CorpusError, RequestError)
SELFRAG_ERROR(CacheCapacityError, Error)
SELFRAG_ERROR(EngineConfigError, Error)
SELFRAG_ERROR(SchedulingError, Error)
SELFRAG_ERROR(DeviceError, Error)
SELFRAG_ERROR(QueueFullError, Error)
SELFRAG_ERROR(DeadlineExceeded, Error)
SELFRAG_ERROR(Cancelled, Error)
#undef SELFRAG_ERROR

// ---- options and results -------------------------------------------------------------------------------

struct EngineOptions {
  std::string model;           // a Self-RAG (Llama-2) checkpoint directory, Hugging Face model id or "tiny"
  std::string index;           // retrieval index directory (`selfrag-engine index build`); empty: none
  std::string encoder;         // query encoder spec; empty: the index's own
  std::string encoder_device;  // empty: cuda when available
  std::string device = "auto";    // auto: CUDA when there is one, else the CPU; cuda, cuda:N or cpu
  std::string dtype;           // empty: the checkpoint's on CUDA, float32 on the CPU
  std::string quantization;    // empty or "fp8"
  int max_pending = 256;       // requests and queries in flight at once; QueueFullError beyond
  int num_blocks = 0;          // KV cache blocks; 0: the engine's default
  int max_num_seqs = 0;        // 0: the engine's default
  // The Python interpreter whose packages the engine imports (a virtual environment's bin/python).
  // Empty: $SELFRAG_ENGINE_PYTHON, else the one the library was built against. Only the first Engine of a
  // process chooses it; it must be the Python version the library links.
  std::string python;
};

// As selfrag_engine.SamplingParams; the engine checks every field (RequestError).
struct SamplingParams {
  int max_tokens = 16;
  double temperature = 1.0;  // 0: greedy
  double top_p = 1.0;
  int64_t top_k = 0;         // 0: disabled
  std::optional<int64_t> seed;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  std::optional<int> logprobs;  // the top-n log-probabilities at every step (1..20)
  bool reflection = false;      // the reflection-token probabilities at every step
  bool skip_special_tokens = true;
  bool include_stop_str_in_output = false;
};

struct Prompt {
  Prompt(const char* text) : text(text) {}  // NOLINT: a prompt is naturally written as a string
  Prompt(std::string text) : text(std::move(text)) {}  // NOLINT
  Prompt(std::vector<int32_t> ids) : token_ids(std::move(ids)), is_text(false) {}  // NOLINT
  std::string text;                // encoded with BOS, as the Python API does
  std::vector<int32_t> token_ids;  // used as given
  bool is_text = true;
};

struct TopLogprob {
  int32_t token_id;
  double logprob;
};

struct Completion {
  std::vector<int32_t> prompt_token_ids;
  std::vector<int32_t> token_ids;
  std::string text;
  std::string finish_reason;  // "stop", "length" or "abort"
  std::string stop_string;    // the stop string that ended it, if one did
  int32_t stop_token_id = -1;  // the stop token that ended it, if one did
  double cumulative_logprob = 0.0;
  std::vector<double> token_logprobs;  // of each generated token, at temperature 1
  std::vector<std::vector<TopLogprob>> top_logprobs;  // per step, most likely first (params.logprobs)
  // params.reflection: per step, the reflection-token probabilities normalized within each group; a row
  // holds the groups one after another, in reflection_groups order, each over its reflection_token_ids.
  std::vector<std::string> reflection_groups;
  std::vector<std::vector<int32_t>> reflection_token_ids;
  std::vector<std::vector<double>> reflection_probs;
};

// New output of a streamed request since the previous delta; the last one has a finish_reason.
struct Delta {
  std::vector<int32_t> token_ids;
  std::string text;
  std::string finish_reason;
};
using DeltaCallback = std::function<void(const Delta&)>;

struct Passage {
  std::string title;
  std::string text;
  std::string id;
};

struct Branch {
  Passage passage;
  std::string text;
  double relevance = 0.0, grounding = 0.0, utility = 0.0;
  double final_score = 0.0;  // the score that ranks the branches
};

// A long-form segment: the text written from one passage (or none) at one depth of the tree.
struct Segment {
  std::string text;
  std::optional<Passage> passage;  // unset: written without retrieval
  int depth = 0;
  std::optional<double> relevance, grounding, utility;  // the critique of a segment written from a passage
  std::optional<double> final_score;  // this segment's own score
  std::optional<double> score;        // the product of the scores along the path down to it
};
using SegmentCallback = std::function<void(const Segment&)>;

struct AnswerOptions {
  std::vector<Passage> passages;  // used as given (the first ndocs); empty: retrieve from the engine's index
  std::string form = "short";     // "short" or "long"
  std::string mode = "adaptive";  // "adaptive", "always" or "never"
  int ndocs = 5;
  std::string compat = "paper";   // "paper" or "released"
  std::optional<double> threshold = 0.2;
  std::optional<double> w_rel, w_sup, w_use;
  std::optional<bool> use_seqscore;
  std::optional<int> max_tokens;  // unset: the form's default (100 short, 300 long)
  std::optional<int> beam_width, max_depth;  // long form
  double timeout_s = 0.0;         // 0: no deadline
};

struct Answer {
  std::string question;
  std::string answer;
  bool retrieved = false;
  std::optional<double> retrieval_probability;  // unset when the mode forced the decision
  std::vector<Branch> branches;                 // short form: one per passage
  int best = -1;                                // index into branches; -1: none
  std::vector<Segment> segments;                // long form: the answer's segments, in order
  std::vector<std::optional<Passage>> citations;  // long form: each segment's passage
  std::optional<double> score;                  // long form: the chosen path's score
  std::optional<std::string> draft;             // compat "released": the draft decoded before the gate
  int num_generated_tokens = 0;
  double seconds = 0.0;
};

struct CacheStats {
  int num_blocks = 0, block_size = 0, free = 0, used = 0, shared = 0, cached = 0;
};

// ---- submissions -----------------------------------------------------------------------------------------

namespace detail {
struct Handle;  // the engine's handle of a request or query
void cancel(Handle& handle);
}  // namespace detail

// A request or query on its way. get() waits (and throws its error); cancel(), from any thread, aborts it
// and frees its KV blocks at the next step (its future then throws Cancelled). Move-only.
template <class T>
class Pending {
 public:
  Pending(std::future<T> future, std::shared_ptr<detail::Handle> handle)
      : future_(std::move(future)), handle_(std::move(handle)) {}
  T get() { return future_.get(); }
  template <class Rep, class Period>
  std::future_status wait_for(const std::chrono::duration<Rep, Period>& d) const { return future_.wait_for(d); }
  std::future<T>& future() { return future_; }
  void cancel() { detail::cancel(*handle_); }

 private:
  std::future<T> future_;
  std::shared_ptr<detail::Handle> handle_;
};
using Request = Pending<Completion>;
using Query = Pending<Answer>;

// ---- the engine ------------------------------------------------------------------------------------------

class Engine {
 public:
  explicit Engine(const EngineOptions& options);
  explicit Engine(const std::string& model);
  // Stops the loop; requests and queries still in flight fail with Cancelled.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  Completion generate(const Prompt& prompt, const SamplingParams& params = {});
  // on_delta runs on a streaming thread, one delta at a time; if it throws, the request is cancelled and
  // get() rethrows that exception. timeout_s > 0 is a deadline (DeadlineExceeded).
  Request submit(const Prompt& prompt, const SamplingParams& params = {}, DeltaCallback on_delta = {},
                 double timeout_s = 0.0);

  Answer answer(const std::string& question, const AnswerOptions& options = {});
  // on_segment (long form) gets each segment of the answer, in order, as soon as no later choice of the beam
  // can drop it; it runs on the query's thread, one segment at a time. If it throws, the query stops, its
  // blocks are freed and get() rethrows that exception.
  Query submit_answer(const std::string& question, const AnswerOptions& options = {},
                      SegmentCallback on_segment = {});

  CacheStats cache_stats();
  std::vector<int32_t> encode(const std::string& text, bool add_bos = true);
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = true);
  int max_model_len() const { return max_model_len_; }

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  int max_model_len_ = 0;
};

// Every passage of a file in `selfrag-engine ask --passages`'s formats (.tsv, .jsonl, .json); CorpusError
// names the file and line of a bad one. Starts the interpreter if no Engine has (python as in EngineOptions).
std::vector<Passage> read_passages(const std::string& path, const std::string& python = "");

}  // namespace selfrag
