// selfrag::Engine over the embedded interpreter: each call takes the GIL only to convert its structs and
// hand them to selfrag_engine.entrypoints.embedded, whose callbacks fulfil the promises on the loop's (or a
// streaming) thread. Waiting on a future never holds the GIL, so C++ threads and the loop run side by side.
#include "selfrag_engine/engine.h"

#include <pybind11/embed.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <utility>

namespace py = pybind11;

#ifndef SELFRAG_ENGINE_PYTHON
#define SELFRAG_ENGINE_PYTHON ""
#endif

namespace selfrag {

Error::Error(std::vector<std::string> kinds, const std::string& message)
    : std::runtime_error((kinds.empty() ? std::string("Error") : kinds.front()) + ": " + message),
      kinds_(kinds.empty() ? std::vector<std::string>{"Error"} : std::move(kinds)),
      message_(message) {}

bool Error::is_a(const std::string& kind) const {
  return std::find(kinds_.begin(), kinds_.end(), kind) != kinds_.end();
}

namespace {

constexpr const char* kFacade = "selfrag_engine.entrypoints.embedded";

// The most specific C++ class among the engine error's own class and its named bases.
std::exception_ptr make_error(std::vector<std::string> kinds, const std::string& message) {
  for (const std::string& k : kinds) {
#define SELFRAG_MATCH(Name) \
  if (k == #Name) return std::make_exception_ptr(Name(kinds, message));
    SELFRAG_MATCH(TokenizerError)
    SELFRAG_MATCH(CheckpointError)
    SELFRAG_MATCH(CorpusError)
    SELFRAG_MATCH(RequestError)
    SELFRAG_MATCH(CacheCapacityError)
    SELFRAG_MATCH(EngineConfigError)
    SELFRAG_MATCH(SchedulingError)
    SELFRAG_MATCH(DeviceError)
    SELFRAG_MATCH(QueueFullError)
    SELFRAG_MATCH(DeadlineExceeded)
    SELFRAG_MATCH(Cancelled)
#undef SELFRAG_MATCH
  }
  return std::make_exception_ptr(Error(std::move(kinds), message));
}

// error: the facade's (kinds, message). Needs the GIL.
std::exception_ptr error_from(const py::handle& error) {
  auto info = error.cast<py::tuple>();
  return make_error(info[0].cast<std::vector<std::string>>(), info[1].cast<std::string>());
}

// The pending Python exception as its C++ class. Needs the GIL; called inside a catch of error_already_set.
[[noreturn]] void rethrow(const py::error_already_set& e) {
  std::exception_ptr converted;
  try {
    converted = error_from(py::module_::import(kFacade).attr("error_info")(e.value()));
  } catch (const py::error_already_set&) {
    // The facade itself did not import (a wrong interpreter or environment): report the original error.
    std::string type = "Error";
    try {
      type = py::str(e.type().attr("__name__")).cast<std::string>();
    } catch (...) {
    }
    converted = make_error({type}, std::string(py::str(e.value())) +
                                       " (is selfrag_engine installed for the embedded Python? "
                                       "set EngineOptions::python or SELFRAG_ENGINE_PYTHON)");
  }
  std::rethrow_exception(converted);
}

std::once_flag runtime_started;

// Starts the interpreter once per process and releases the GIL, which from then on is taken per call.
void start_runtime(const std::string& wanted) {
  std::call_once(runtime_started, [&] {
    if (Py_IsInitialized()) return;  // the host runs Python itself
    std::string python = wanted;
    if (python.empty()) {
      const char* env = std::getenv("SELFRAG_ENGINE_PYTHON");
      python = env != nullptr && *env != '\0' ? env : SELFRAG_ENGINE_PYTHON;
    }
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.parse_argv = 0;
    config.install_signal_handlers = 0;  // signals stay the host's
    if (!python.empty()) {
      // The interpreter finds its standard library and a virtual environment's site-packages
      // (pyvenv.cfg) from the program it believes it is.
      PyStatus status = PyConfig_SetBytesString(&config, &config.program_name, python.c_str());
      if (PyStatus_Exception(status)) {
        PyConfig_Clear(&config);
        throw Error({"RuntimeError"}, "cannot use the Python interpreter " + python);
      }
    }
    try {
      py::initialize_interpreter(&config, 0, nullptr, false);
    } catch (const std::exception& e) {
      throw Error({"RuntimeError"}, std::string("the embedded Python did not start: ") + e.what());
    }
    // Never finalized: torch and the loop's threads live until the process exits.
    PyEval_SaveThread();
  });
}

py::dict params_dict(const SamplingParams& p) {
  py::dict d;
  d["max_tokens"] = p.max_tokens;
  d["temperature"] = p.temperature;
  d["top_p"] = p.top_p;
  d["top_k"] = p.top_k;
  d["seed"] = p.seed ? py::object(py::int_(*p.seed)) : py::object(py::none());
  d["stop"] = py::cast(p.stop);
  d["stop_token_ids"] = py::cast(p.stop_token_ids);
  d["ignore_eos"] = p.ignore_eos;
  d["logprobs"] = p.logprobs ? py::object(py::int_(*p.logprobs)) : py::object(py::none());
  d["reflection"] = p.reflection;
  d["skip_special_tokens"] = p.skip_special_tokens;
  d["include_stop_str_in_output"] = p.include_stop_str_in_output;
  return d;
}

py::object prompt_object(const Prompt& prompt) {
  if (prompt.is_text) return py::str(prompt.text);
  return py::cast(prompt.token_ids);
}

template <class T>
T get(const py::dict& d, const char* key) {
  return d[key].cast<T>();
}

Completion completion_from(const py::dict& d) {
  Completion c;
  c.prompt_token_ids = get<std::vector<int32_t>>(d, "prompt_token_ids");
  c.token_ids = get<std::vector<int32_t>>(d, "token_ids");
  c.text = get<std::string>(d, "text");
  c.finish_reason = get<std::string>(d, "finish_reason");
  c.stop_string = get<std::string>(d, "stop_string");
  c.stop_token_id = get<int32_t>(d, "stop_token_id");
  c.cumulative_logprob = get<double>(d, "cumulative_logprob");
  c.token_logprobs = get<std::vector<double>>(d, "token_logprobs");
  for (const auto& step : d["top_logprobs"]) {
    std::vector<TopLogprob> row;
    for (const auto& entry : step) {
      auto pair = entry.cast<py::tuple>();
      row.push_back({pair[0].cast<int32_t>(), pair[1].cast<double>()});
    }
    c.top_logprobs.push_back(std::move(row));
  }
  c.reflection_groups = get<std::vector<std::string>>(d, "reflection_groups");
  c.reflection_token_ids = get<std::vector<std::vector<int32_t>>>(d, "reflection_token_ids");
  c.reflection_probs = get<std::vector<std::vector<double>>>(d, "reflection_probs");
  return c;
}

Passage passage_from(const py::handle& h) {
  auto d = h.cast<py::dict>();
  return {get<std::string>(d, "title"), get<std::string>(d, "text"), get<std::string>(d, "id")};
}

py::dict passage_dict(const Passage& p) {
  py::dict d;
  d["title"] = p.title;
  d["text"] = p.text;
  d["id"] = p.id.empty() ? py::object(py::none()) : py::object(py::str(p.id));
  return d;
}

template <class T>
std::optional<T> optional_from(const py::handle& h) {
  if (h.is_none()) return std::nullopt;
  return h.cast<T>();
}

template <class T>
py::object optional_object(const std::optional<T>& v) {
  return v ? py::cast(*v) : py::object(py::none());
}

Delta delta_from(const py::handle& h) {
  auto d = h.cast<py::dict>();
  return {get<std::vector<int32_t>>(d, "token_ids"), get<std::string>(d, "text"), get<std::string>(d, "finish_reason")};
}

Segment segment_from(const py::handle& h) {
  auto d = h.cast<py::dict>();
  Segment s;
  s.text = get<std::string>(d, "text");
  if (!d["passage"].is_none()) s.passage = passage_from(d["passage"]);
  s.depth = get<int>(d, "depth");
  s.relevance = optional_from<double>(d["relevance"]);
  s.grounding = optional_from<double>(d["grounding"]);
  s.utility = optional_from<double>(d["utility"]);
  s.final_score = optional_from<double>(d["final"]);
  s.score = optional_from<double>(d["score"]);
  return s;
}

Answer answer_from(const py::dict& d) {
  Answer a;
  a.question = get<std::string>(d, "question");
  a.answer = get<std::string>(d, "answer");
  a.retrieved = get<bool>(d, "retrieved");
  a.retrieval_probability = optional_from<double>(d["retrieval_probability"]);
  for (const auto& b : d["branches"]) {
    auto bd = b.cast<py::dict>();
    a.branches.push_back({passage_from(bd["passage"]), get<std::string>(bd, "text"), get<double>(bd, "relevance"),
                          get<double>(bd, "grounding"), get<double>(bd, "utility"), get<double>(bd, "final")});
  }
  a.best = get<int>(d, "best");
  for (const auto& seg : d["segments"]) a.segments.push_back(segment_from(seg));
  for (const auto& c : d["citations"]) {
    a.citations.push_back(c.is_none() ? std::nullopt : std::optional<Passage>(passage_from(c)));
  }
  a.score = optional_from<double>(d["score"]);
  a.draft = optional_from<std::string>(d["draft"]);
  a.num_generated_tokens = get<int>(d, "num_generated_tokens");
  a.seconds = get<double>(d, "seconds");
  return a;
}

py::dict options_dict(const AnswerOptions& o) {
  py::dict d;
  if (!o.passages.empty()) {
    py::list passages;
    for (const Passage& p : o.passages) passages.append(passage_dict(p));
    d["passages"] = passages;
  }
  d["form"] = o.form;
  d["mode"] = o.mode;
  d["ndocs"] = o.ndocs;
  d["compat"] = o.compat;
  d["threshold"] = optional_object(o.threshold);
  d["w_rel"] = optional_object(o.w_rel);
  d["w_sup"] = optional_object(o.w_sup);
  d["w_use"] = optional_object(o.w_use);
  d["use_seqscore"] = optional_object(o.use_seqscore);
  d["max_tokens"] = optional_object(o.max_tokens);
  d["beam_width"] = optional_object(o.beam_width);
  d["max_depth"] = optional_object(o.max_depth);
  d["timeout_s"] = o.timeout_s > 0 ? py::object(py::float_(o.timeout_s)) : py::object(py::none());
  return d;
}

// A promise fulfilled once, from whichever thread reports first.
template <class T>
struct Outcome {
  std::promise<T> promise;
  std::atomic<bool> settled{false};
  std::exception_ptr callback_error;  // a throwing DeltaCallback or SegmentCallback: what get() rethrows

  void fail(std::exception_ptr e) {
    if (!settled.exchange(true)) promise.set_exception(std::move(e));
  }
  void succeed(T value) {
    if (!settled.exchange(true)) promise.set_value(std::move(value));
  }
};

// on_done(result, error) for the facade; runs with the GIL on a Python thread and must not throw there.
template <class T, class Convert>
py::cpp_function on_done(std::shared_ptr<Outcome<T>> outcome, Convert convert) {
  return py::cpp_function([outcome, convert](py::object result, py::object error) {
    try {
      if (outcome->callback_error) {
        outcome->fail(outcome->callback_error);
      } else if (!error.is_none()) {
        outcome->fail(error_from(error));
      } else {
        outcome->succeed(convert(result.cast<py::dict>()));
      }
    } catch (const py::error_already_set& e) {
      outcome->fail(std::make_exception_ptr(Error({"RuntimeError"}, e.what())));
    } catch (...) {
      outcome->fail(std::current_exception());
    }
  });
}

// on_item(dict) for the facade's streams (deltas, segments): converts the item, calls the callback without the
// GIL, and returns whether to go on; false (the callback threw) stops the request or query, and get() then
// rethrows what the callback threw.
template <class T, class Callback, class Convert>
py::cpp_function on_item(std::shared_ptr<Outcome<T>> outcome, Callback callback, Convert convert) {
  return py::cpp_function([outcome, callback, convert](py::dict d) {
    auto item = convert(d);
    py::gil_scoped_release released;
    try {
      callback(item);
      return true;
    } catch (...) {
      outcome->callback_error = std::current_exception();
      return false;
    }
  });
}

}  // namespace

namespace detail {

struct __attribute__((visibility("hidden"))) Handle {
  explicit Handle(py::object o) : object(std::move(o)) {}
  ~Handle() {
    py::gil_scoped_acquire gil;
    object = py::object();
  }
  py::object object;
};

void cancel(Handle& handle) {
  py::gil_scoped_acquire gil;
  try {
    handle.object.attr("cancel")();
  } catch (const py::error_already_set& e) {
    rethrow(e);
  }
}

std::shared_ptr<Handle> make_handle(py::object o) { return std::make_shared<Handle>(std::move(o)); }

}  // namespace detail

struct __attribute__((visibility("hidden"))) Engine::Impl {
  py::object engine;  // an EmbeddedEngine

  ~Impl() {
    py::gil_scoped_acquire gil;
    if (!engine) return;  // it never opened
    try {
      engine.attr("close")();
    } catch (const py::error_already_set&) {
      // Closing is best effort: the process may be on its way out.
    }
    engine = py::object();
  }

  template <class F>
  auto call(F&& f) -> decltype(f()) {
    py::gil_scoped_acquire gil;
    try {
      return f();
    } catch (const py::error_already_set& e) {
      rethrow(e);
    }
  }
};

Engine::Engine(const std::string& model) : Engine(EngineOptions{model}) {}

Engine::Engine(const EngineOptions& o) {
  start_runtime(o.python);
  py::gil_scoped_acquire gil;
  try {
    py::dict kwargs;
    auto text_or_none = [](const std::string& s) {
      return s.empty() ? py::object(py::none()) : py::object(py::str(s));
    };
    kwargs["index"] = text_or_none(o.index);
    kwargs["encoder"] = text_or_none(o.encoder);
    kwargs["encoder_device"] = text_or_none(o.encoder_device);
    kwargs["device"] = o.device;
    kwargs["dtype"] = text_or_none(o.dtype);
    kwargs["quantization"] = text_or_none(o.quantization);
    kwargs["max_pending"] = o.max_pending;
    py::dict engine_options;
    if (o.num_blocks > 0) engine_options["num_blocks"] = o.num_blocks;
    if (o.max_num_seqs > 0) engine_options["max_num_seqs"] = o.max_num_seqs;
    kwargs["engine_options"] = engine_options;
    auto cls = py::module_::import(kFacade).attr("EmbeddedEngine");
    impl_ = std::make_unique<Impl>();
    impl_->engine = cls(o.model, **kwargs);
    max_model_len_ = impl_->engine.attr("max_model_len").cast<int>();
  } catch (const py::error_already_set& e) {
    rethrow(e);
  }
}

Engine::~Engine() = default;

Request Engine::submit(const Prompt& prompt, const SamplingParams& params, DeltaCallback on_delta,
                       double timeout_s) {
  auto outcome = std::make_shared<Outcome<Completion>>();
  std::future<Completion> future = outcome->promise.get_future();
  auto handle = impl_->call([&] {
    py::object stream = on_delta ? on_item(outcome, on_delta, delta_from) : py::object(py::none());
    py::object timeout = timeout_s > 0 ? py::object(py::float_(timeout_s)) : py::object(py::none());
    return detail::make_handle(impl_->engine.attr("submit")(prompt_object(prompt), params_dict(params), timeout,
                                                            on_done(outcome, completion_from), stream));
  });
  return Request(std::move(future), std::move(handle));
}

Completion Engine::generate(const Prompt& prompt, const SamplingParams& params) {
  return submit(prompt, params).get();
}

Query Engine::submit_answer(const std::string& question, const AnswerOptions& options,
                            SegmentCallback on_segment) {
  auto outcome = std::make_shared<Outcome<Answer>>();
  std::future<Answer> future = outcome->promise.get_future();
  auto handle = impl_->call([&] {
    py::object stream = on_segment ? on_item(outcome, on_segment, segment_from) : py::object(py::none());
    return detail::make_handle(
        impl_->engine.attr("ask")(question, options_dict(options), on_done(outcome, answer_from), stream));
  });
  return Query(std::move(future), std::move(handle));
}

Answer Engine::answer(const std::string& question, const AnswerOptions& options) {
  return submit_answer(question, options).get();
}

CacheStats Engine::cache_stats() {
  return impl_->call([&] {
    auto d = impl_->engine.attr("cache_stats")().cast<py::dict>();
    return CacheStats{get<int>(d, "num_blocks"), get<int>(d, "block_size"), get<int>(d, "free"),
                      get<int>(d, "used"),       get<int>(d, "shared"),     get<int>(d, "cached")};
  });
}

std::vector<int32_t> Engine::encode(const std::string& text, bool add_bos) {
  return impl_->call([&] { return impl_->engine.attr("encode")(text, add_bos).cast<std::vector<int32_t>>(); });
}

std::string Engine::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) {
  return impl_->call([&] { return impl_->engine.attr("decode")(ids, skip_special_tokens).cast<std::string>(); });
}

std::vector<Passage> read_passages(const std::string& path, const std::string& python) {
  start_runtime(python);
  py::gil_scoped_acquire gil;
  try {
    std::vector<Passage> out;
    for (const auto& p : py::module_::import(kFacade).attr("read_passages")(path)) out.push_back(passage_from(p));
    return out;
  } catch (const py::error_already_set& e) {
    rethrow(e);
  }
}

}  // namespace selfrag
