// build/cpp/ask --model DIR (--passages FILE | --index DIR) "question": answers as `selfrag-engine ask` does.
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

int main(int argc, char** argv) try {
  selfrag::EngineOptions engine_options;
  selfrag::AnswerOptions ask;
  std::string question;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--model" && i + 1 < argc) engine_options.model = argv[++i];
    else if (a == "--index" && i + 1 < argc) engine_options.index = argv[++i];
    else if (a == "--passages" && i + 1 < argc) ask.passages = selfrag::read_passages(argv[++i]);
    else question = a;
  }
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
