// The C++ API over a real checkpoint:
//   test_engine --model DIR --passages FILE [--expected FILE]
// FILE of expectations (tests/test_cpp_api.py writes it from the Python API), one tab-separated record a line:
//   generate <prompt> <max_tokens> <token ids> <text> <finish_reason>      (greedy)
//   answer <question> <ndocs> <passage ids,...> <answer> <retrieved 0|1> <best> <final scores>
//   long <question> <ndocs> <passage ids,...> <max_tokens> <max_depth> <answer> <segment texts, \x1f apart>
//                                                                         (long form, mode always)
// with \t, \n and \\ escaped. Prints "N passed, N failed"; exits 1 on a failure.
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "selfrag_engine/engine.h"

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

void run(const char* name, const std::function<void()>& body) {
  std::printf("%s\n", name);
  std::fflush(stdout);
  try {
    body();
  } catch (const std::exception& e) {
    check(false, std::string(name) + ": unexpected exception: " + e.what());
  }
}

// Whether body throws an E (its what() into *message).
template <class E>
bool throws(const std::function<void()>& body, std::string* message = nullptr) {
  try {
    body();
  } catch (const E& e) {
    if (message) *message = e.what();
    return true;
  } catch (const std::exception& e) {
    std::printf("  threw something else: %s\n", e.what());
  }
  return false;
}

std::vector<std::string> split(const std::string& line, char sep) {
  std::vector<std::string> out;
  std::string field;
  for (char c : line) {
    if (c == sep) {
      out.push_back(field);
      field.clear();
    } else {
      field += c;
    }
  }
  out.push_back(field);
  return out;
}

std::string unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      char c = s[++i];
      out += c == 't' ? '\t' : c == 'n' ? '\n' : c;
    } else {
      out += s[i];
    }
  }
  return out;
}

struct ExpectedGeneration {
  std::string prompt;
  int max_tokens;
  std::vector<int32_t> token_ids;
  std::string text, finish_reason;
};

struct ExpectedAnswer {
  std::string question;
  selfrag::AnswerOptions options;
  std::string answer;
  bool retrieved;
  int best;
  std::vector<double> finals;
};

struct ExpectedLong {
  std::string question;
  selfrag::AnswerOptions options;
  std::string answer;
  std::vector<std::string> segments;
};

std::string join(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t t : ids) s += (s.empty() ? "" : " ") + std::to_string(t);
  return s;
}

bool same_answer(const selfrag::Answer& a, const selfrag::Answer& b, double tol) {
  if (a.answer != b.answer || a.retrieved != b.retrieved || a.best != b.best ||
      a.branches.size() != b.branches.size())
    return false;
  for (size_t i = 0; i < a.branches.size(); ++i) {
    if (a.branches[i].text != b.branches[i].text || a.branches[i].passage.text != b.branches[i].passage.text ||
        std::fabs(a.branches[i].final_score - b.branches[i].final_score) > tol)
      return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model, passages_file, expected_file;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    (a == "--model" ? model : a == "--passages" ? passages_file : expected_file) = argv[i + 1];
  }
  if (model.empty() || passages_file.empty()) {
    std::fprintf(stderr, "usage: test_engine --model DIR --passages FILE [--expected FILE]\n");
    return 2;
  }

  run("a bad model path is a CheckpointError", [&] {
    std::string message;
    check(throws<selfrag::CheckpointError>([] { selfrag::Engine bad("/nonexistent/selfrag-model"); }, &message),
          "opening a missing directory throws CheckpointError");
    check(message.find("/nonexistent/selfrag-model") != std::string::npos, "the message names the path: " + message);
    try {
      selfrag::Engine bad("/nonexistent/selfrag-model");
    } catch (const selfrag::Error& e) {
      check(e.is_a("CheckpointError") && e.is_a("SelfragEngineError"), "kinds name the named bases: " + e.kind());
    }
  });
  run("a bad passages file is a CorpusError, a RequestError", [&] {
    check(throws<selfrag::RequestError>([] { selfrag::read_passages("/nonexistent/passages.jsonl"); }),
          "a missing passages file throws RequestError");
  });

  std::vector<selfrag::Passage> corpus = selfrag::read_passages(passages_file);
  std::map<std::string, selfrag::Passage> by_id;
  for (const auto& p : corpus) by_id[p.id] = p;
  std::vector<ExpectedGeneration> generations;
  std::vector<ExpectedAnswer> answers;
  std::vector<ExpectedLong> longs;
  if (!expected_file.empty()) {
    std::ifstream in(expected_file);
    std::string line;
    while (std::getline(in, line)) {
      auto f = split(line, '\t');
      for (auto& x : f) x = unescape(x);
      if (f[0] == "generate" && f.size() == 6) {
        ExpectedGeneration g{f[1], std::stoi(f[2]), {}, f[4], f[5]};
        for (const auto& t : split(f[3], ' ')) g.token_ids.push_back(std::stoi(t));
        generations.push_back(g);
      } else if (f[0] == "answer" && f.size() == 8) {
        ExpectedAnswer a{f[1], {}, f[4], f[5] == "1", std::stoi(f[6]), {}};
        a.options.ndocs = std::stoi(f[2]);
        for (const auto& id : split(f[3], ',')) a.options.passages.push_back(by_id.at(id));
        if (!f[7].empty())
          for (const auto& x : split(f[7], ' ')) a.finals.push_back(std::stod(x));
        answers.push_back(a);
      } else if (f[0] == "long" && f.size() == 8) {
        ExpectedLong l{f[1], {}, f[6], split(f[7], '\x1f')};
        l.options.form = "long";
        l.options.mode = "always";
        l.options.ndocs = std::stoi(f[2]);
        for (const auto& id : split(f[3], ',')) l.options.passages.push_back(by_id.at(id));
        l.options.max_tokens = std::stoi(f[4]);
        l.options.max_depth = std::stoi(f[5]);
        longs.push_back(l);
      } else {
        check(false, "a malformed expectation: " + line);
      }
    }
    check(!generations.empty() && !answers.empty(), "the expectations file has both kinds of record");
    std::printf("expectations: %zu generations, %zu answers, %zu long-form answers\n", generations.size(),
                answers.size(), longs.size());
  }

  selfrag::EngineOptions options;
  options.model = model;
  selfrag::Engine engine(options);
  check(engine.max_model_len() > 0, "the engine reports its context length");
  const int baseline = engine.cache_stats().used;
  check(baseline == 0, "an idle engine holds no blocks");

  run("generate as the Python API does", [&] {
    for (const auto& g : generations) {
      selfrag::SamplingParams p;
      p.max_tokens = g.max_tokens;
      p.temperature = 0.0;
      selfrag::Completion c = engine.generate(g.prompt, p);
      check(c.token_ids == g.token_ids, "tokens of '" + g.prompt + "': " + join(c.token_ids) + " vs " +
                                            join(g.token_ids));
      check(c.text == g.text, "text of '" + g.prompt + "': '" + c.text + "' vs '" + g.text + "'");
      check(c.finish_reason == g.finish_reason, "finish reason " + c.finish_reason + " vs " + g.finish_reason);
      selfrag::Completion by_ids = engine.generate(engine.encode(g.prompt), p);
      check(by_ids.prompt_token_ids == c.prompt_token_ids && by_ids.token_ids == c.token_ids,
            "the prompt as token ids gives the same tokens");
    }
  });

  run("log-probabilities and reflection probabilities", [&] {
    selfrag::SamplingParams p;
    p.max_tokens = 6;
    p.temperature = 0.0;
    p.ignore_eos = true;
    p.logprobs = 3;
    p.reflection = true;
    selfrag::Completion c = engine.generate("Which country is Vanvrar in?", p);
    check(c.token_ids.size() == 6 && c.token_logprobs.size() == 6 && c.top_logprobs.size() == 6,
          "one log-probability and one top list per token");
    double sum = 0.0;
    for (size_t i = 0; i < c.token_ids.size() && i < c.top_logprobs.size(); ++i) {
      const auto& top = c.top_logprobs[i];
      check(!top.empty() && top.front().token_id == c.token_ids[i], "greedy: the chosen token is the most likely");
      check(!top.empty() && std::fabs(top.front().logprob - c.token_logprobs[i]) < 1e-9,
            "the top list and token_logprobs agree");
      for (size_t j = 1; j < top.size(); ++j) check(top[j - 1].logprob >= top[j].logprob, "most likely first");
      sum += c.token_logprobs[i];
    }
    check(std::fabs(sum - c.cumulative_logprob) < 1e-6, "the cumulative log-probability is their sum");
    check(c.reflection_probs.size() == 6 && !c.reflection_groups.empty(), "a reflection row per step");
    for (const auto& row : c.reflection_probs) {
      size_t at = 0;
      for (const auto& group : c.reflection_token_ids) {
        double s = 0.0;
        for (size_t k = 0; k < group.size() && at < row.size(); ++k) s += row[at++];
        check(std::fabs(s - 1.0) < 1e-5, "each group's probabilities sum to 1");
      }
      check(at == row.size(), "a row spans the groups exactly");
    }
  });

  run("bad requests are RequestErrors", [&] {
    selfrag::SamplingParams bad;
    bad.temperature = -1.0;
    std::string message;
    check(throws<selfrag::RequestError>([&] { engine.submit("hello", bad); }, &message),
          "a negative temperature is refused at submission");
    check(message.find("temperature") != std::string::npos, "the message names the field: " + message);
    selfrag::SamplingParams too_long;
    too_long.max_tokens = 4;
    std::vector<int32_t> huge(engine.max_model_len() + 10, 5);
    check(throws<selfrag::RequestError>([&] { engine.generate(huge, too_long); }),
          "a prompt longer than the context fails its future");
    selfrag::AnswerOptions no_passages;
    check(throws<selfrag::RequestError>([&] { engine.answer("Which country is Vanvrar in?", no_passages); }),
          "a query without passages or an index is refused");
  });

  run("streamed deltas add up to the completion", [&] {
    selfrag::SamplingParams p;
    p.max_tokens = 12;
    p.temperature = 0.0;
    std::vector<int32_t> ids;
    std::string text;
    int finals = 0;
    std::string last_reason;
    selfrag::Request r = engine.submit("Hey there!", p, [&](const selfrag::Delta& d) {
      ids.insert(ids.end(), d.token_ids.begin(), d.token_ids.end());
      text += d.text;
      if (!d.finish_reason.empty()) {
        ++finals;
        last_reason = d.finish_reason;
      }
    });
    selfrag::Completion c = r.get();
    check(ids == c.token_ids && text == c.text, "deltas: '" + text + "' vs '" + c.text + "'");
    check(finals == 1 && last_reason == c.finish_reason, "exactly the last delta has the finish reason");
  });

  run("answers equal the Python API's", [&] {
    for (const auto& e : answers) {
      selfrag::Answer a = engine.answer(e.question, e.options);
      check(a.answer == e.answer, "answer to '" + e.question + "': '" + a.answer + "' vs '" + e.answer + "'");
      check(a.retrieved == e.retrieved && a.best == e.best, "retrieval decision and best branch of " + e.question);
      bool scores = a.branches.size() == e.finals.size();
      for (size_t i = 0; scores && i < e.finals.size(); ++i)
        scores = std::fabs(a.branches[i].final_score - e.finals[i]) < 1e-6;
      check(scores, "branch scores of " + e.question);
      check(a.question == e.question, "the answer names its question");
    }
  });

  run("long-form answers equal the Python API's, their segments streamed in order", [&] {
    for (const auto& e : longs) {
      std::vector<selfrag::Segment> streamed;
      selfrag::Answer a = engine.submit_answer(e.question, e.options, [&](const selfrag::Segment& s) {
                                  streamed.push_back(s);
                                }).get();
      check(a.answer == e.answer, "long answer to '" + e.question + "': '" + a.answer + "' vs '" + e.answer + "'");
      std::vector<std::string> texts;
      for (const auto& s : a.segments) texts.push_back(s.text);
      check(texts == e.segments, "the segments of the long answer to '" + e.question + "'");
      bool same = streamed.size() == a.segments.size() && a.citations.size() == a.segments.size();
      for (size_t i = 0; same && i < streamed.size(); ++i) {
        const auto& s = streamed[i];
        const auto& t = a.segments[i];
        same = s.text == t.text && s.depth == t.depth && s.passage.has_value() == t.passage.has_value() &&
               (!s.passage || s.passage->id == t.passage->id) && s.score == t.score &&
               a.citations[i].has_value() == t.passage.has_value() &&
               (!t.passage || a.citations[i]->id == t.passage->id);
      }
      check(same, "streamed segments are the answer's, in order, with its citations");
    }
    if (!longs.empty()) {
      const int before = engine.cache_stats().used;
      int seen = 0;
      check(throws<std::runtime_error>([&] {
              engine.submit_answer(longs[0].question, longs[0].options, [&](const selfrag::Segment&) {
                      ++seen;
                      throw std::runtime_error("the service stops reading");
                    }).get();
            }),
            "a throwing segment callback stops the query and get() rethrows it");
      check(seen == 1, "no segment after the callback threw");
      check(engine.cache_stats().used == before, "the stopped query freed its blocks");
    }
  });

  run("8 threads at once get what they get alone", [&] {
    if (answers.empty()) return;
    std::vector<selfrag::Answer> alone;
    for (const auto& e : answers) alone.push_back(engine.answer(e.question, e.options));
    const int n = 8;
    std::vector<selfrag::Answer> got(n);
    std::vector<std::string> errors(n);
    std::mutex m;
    std::condition_variable cv;
    int ready = 0;
    std::vector<std::thread> threads;
    for (int t = 0; t < n; ++t) {
      threads.emplace_back([&, t] {
        {
          std::unique_lock<std::mutex> lock(m);
          ++ready;
          cv.notify_all();
          cv.wait(lock, [&] { return ready == n; });  // submit together
        }
        try {
          const auto& e = answers[t % answers.size()];
          got[t] = engine.answer(e.question, e.options);
        } catch (const std::exception& ex) {
          errors[t] = ex.what();
        }
      });
    }
    for (auto& th : threads) th.join();
    for (int t = 0; t < n; ++t) {
      check(errors[t].empty(), "thread " + std::to_string(t) + ": " + errors[t]);
      check(errors[t].empty() && same_answer(got[t], alone[t % alone.size()], 1e-6),
            "thread " + std::to_string(t) + " answers as alone: '" + got[t].answer + "'");
    }
    check(engine.cache_stats().used == baseline, "every block is free after the queries");
  });

  run("a cancelled request frees its blocks", [&] {
    selfrag::SamplingParams p;
    p.max_tokens = 400;
    p.ignore_eos = true;
    std::mutex m;
    std::condition_variable cv;
    int deltas = 0;
    selfrag::Request r = engine.submit("Write 'cold letter' in capital letters.", p, [&](const selfrag::Delta&) {
      std::lock_guard<std::mutex> lock(m);
      ++deltas;
      cv.notify_all();
    });
    {
      std::unique_lock<std::mutex> lock(m);
      cv.wait(lock, [&] { return deltas > 0; });
    }
    int held = engine.cache_stats().used;
    r.cancel();
    check(throws<selfrag::Cancelled>([&] { r.get(); }), "the cancelled request's future throws Cancelled");
    check(held > baseline, "the running request held blocks: " + std::to_string(held));
    check(engine.cache_stats().used == baseline, "its blocks are free again");
  });

  run("a cancelled query frees its blocks", [&] {
    if (answers.empty()) return;
    selfrag::Query q = engine.submit_answer(answers[0].question, answers[0].options);
    q.cancel();
    check(throws<selfrag::Cancelled>([&] { q.get(); }), "the cancelled query's future throws Cancelled");
    check(engine.cache_stats().used == baseline, "its branches' blocks are free again");
  });

  run("a deadline aborts a request", [&] {
    selfrag::SamplingParams p;
    p.max_tokens = 400;
    p.ignore_eos = true;
    selfrag::Request r = engine.submit("Hey there!", p, {}, 0.05);
    check(throws<selfrag::DeadlineExceeded>([&] { r.get(); }), "past its deadline the future throws");
    check(engine.cache_stats().used == baseline, "its blocks are free again");
  });

  run("a throwing stream callback cancels its request", [&] {
    selfrag::SamplingParams p;
    p.max_tokens = 400;
    p.ignore_eos = true;
    std::atomic<int> calls{0};
    selfrag::Request r = engine.submit("Hey there!", p, [&](const selfrag::Delta&) {
      ++calls;
      throw std::logic_error("the consumer went away");
    });
    std::string message;
    check(throws<std::logic_error>([&] { r.get(); }, &message) && message == "the consumer went away",
          "get() rethrows the callback's exception");
    check(calls == 1, "no delta after the throw");
    check(engine.cache_stats().used == baseline, "its blocks are free again");
  });

  run("the admission bound, and closing an engine with a query in flight", [&] {
    if (answers.empty()) return;
    selfrag::EngineOptions bounded = options;
    bounded.max_pending = 1;
    std::optional<selfrag::Query> query;
    {
      selfrag::Engine small(bounded);
      selfrag::SamplingParams p;
      p.max_tokens = 400;
      p.ignore_eos = true;
      selfrag::Request r = small.submit("Hey there!", p);
      check(throws<selfrag::QueueFullError>([&] { small.submit("Hey there!", p); }),
            "a request past max_pending is refused with QueueFullError");
      r.cancel();
      check(throws<selfrag::Cancelled>([&] { r.get(); }), "the first request is cancelled");
      query.emplace(small.submit_answer(answers[0].question, answers[0].options));
    }
    check(throws<selfrag::Cancelled>([&] { query->get(); }), "the engine closed under the query: Cancelled");
  });

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
