// build/cpp/ask --model MODEL (--passages FILE | --index DIR) "question": answers as `selfrag-engine ask` does.
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "selfrag_engine/engine.h"

// One line of at most `width` characters, an ellipsis where cut, padded to `width` if asked: `ask`'s cells.
static std::string cell(const std::string& text, size_t width, bool pad) {
  std::istringstream words(text);
  std::string flat, word;
  while (words >> word) flat += (flat.empty() ? "" : " ") + word;
  std::vector<size_t> starts;  // where each UTF-8 character begins
  for (size_t i = 0; i < flat.size(); ++i)
    if ((flat[i] & 0xC0) != 0x80) starts.push_back(i);
  if (starts.size() > width) return flat.substr(0, starts[width - 1]) + "\u2026";
  return pad ? flat + std::string(width - starts.size(), ' ') : flat;
}

static const char kUsage[] =
    "usage: ask [-h] --model MODEL (--passages FILE | --index DIR) [--device DEVICE] question\n";
static const char kHelp[] =
    "\nAnswer a question with Self-RAG, as `selfrag-engine ask` does: the answer, the retrieval decision and\n"
    "the table of branches.\n\n"
    "positional arguments:\n"
    "  question          the question\n\n"
    "options:\n"
    "  -h, --help        show this help message and exit\n"
    "  --model MODEL     checkpoint directory, Hugging Face model id (from the local cache) or 'tiny'\n"
    "  --passages FILE   use these passages as given (.tsv, .jsonl or .json), no index\n"
    "  --index DIR       retrieve from this index (`selfrag-engine index build`)\n"
    "  --device DEVICE   auto (CUDA when there is one, else the CPU), cuda or cpu\n";

// A command-line mistake: the usage and one line naming it, exit status 2 (as argparse does).
static int usage_error(const std::string& message) {
  std::fprintf(stderr, "%sask: error: %s\n", kUsage, message.c_str());
  return 2;
}

int main(int argc, char** argv) try {
  selfrag::EngineOptions engine_options;
  selfrag::AnswerOptions ask;
  std::string question, passages;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    bool has_value = i + 1 < argc;
    if (a == "-h" || a == "--help") {
      std::printf("%s%s", kUsage, kHelp);
      return 0;
    } else if (a == "--model" || a == "--index" || a == "--passages" || a == "--device") {
      if (!has_value) return usage_error("argument " + a + ": expected one argument");
      std::string value = argv[++i];
      if (a == "--model") engine_options.model = value;
      else if (a == "--index") engine_options.index = value;
      else if (a == "--passages") passages = value;
      else engine_options.device = value;
    } else if (a.size() > 1 && a[0] == '-' && a != "--") {
      return usage_error("unrecognized argument: " + a);
    } else if (!question.empty()) {
      return usage_error("unrecognized argument: " + a + " (one question at a time)");
    } else {
      question = a == "--" && has_value ? argv[++i] : a;
    }
  }
  if (engine_options.model.empty()) return usage_error("the following arguments are required: --model");
  if (question.empty()) return usage_error("the following arguments are required: question");
  if (!passages.empty() && !engine_options.index.empty())
    return usage_error("argument --passages: not allowed with argument --index");
  if (!passages.empty()) ask.passages = selfrag::read_passages(passages);
  selfrag::Engine engine(engine_options);
  selfrag::Answer ans = engine.answer(question, ask);

  std::printf("Answer: %s\n", ans.answer.c_str());
  if (ans.retrieval_probability)
    std::printf("Retrieval: %s (p = %.4f %s threshold %g)\n", ans.retrieved ? "yes" : "no",
                *ans.retrieval_probability, ans.retrieved ? ">" : "<=", *ask.threshold);
  else
    std::printf("Retrieval: %s (the model's first token)\n", ans.retrieved ? "yes" : "no");
  if (!ans.branches.empty())
    std::printf("\n   %2s  %-24s  %9s  %9s  %7s  %7s  text\n", "#", "passage", "relevance", "grounding", "utility",
                "final");
  for (size_t i = 0; i < ans.branches.size(); ++i) {
    const selfrag::Branch& b = ans.branches[i];
    std::printf(" %c %2zu  %s  %9.4f  %9.4f  %7.4f  %7.4f  %s\n", int(i) == ans.best ? '*' : ' ', i,
                cell(b.passage.title.empty() ? "(untitled)" : b.passage.title, 24, true).c_str(), b.relevance,
                b.grounding, b.utility, b.final_score, cell(b.text, 60, false).c_str());
  }
  std::printf("\n%d tokens generated in %.2f s\n", ans.num_generated_tokens, ans.seconds);
  return 0;
} catch (const selfrag::Error& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 2;
}
