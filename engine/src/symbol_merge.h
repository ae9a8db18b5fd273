// The merge loop shared by both BPE flavours: start from single characters and repeatedly
// merge the adjacent pair of highest priority (leftmost first on ties) until none is left.
// SentencePiece uses the merged piece's score as priority, byte-level BPE the negated merge
// rank. Private to engine.
#pragma once

#include <optional>
#include <queue>
#include <string_view>
#include <vector>

namespace den::engine {

struct MergeSymbol {
  size_t begin;  // byte offset into the text
  size_t length;  // 0 once merged into its left neighbour
  int prev;
  int next;
};

// Builds one symbol per character; char_length(text, i) gives the character length at i.
template <typename CharLength>
std::vector<MergeSymbol> split_into_symbols(std::string_view text, CharLength char_length) {
  std::vector<MergeSymbol> symbols;
  for (size_t i = 0; i < text.size();) {
    const size_t n = char_length(text, i);
    const int index = static_cast<int>(symbols.size());
    symbols.push_back({i, n, index - 1, -1});
    if (index > 0) symbols[static_cast<size_t>(index - 1)].next = index;
    i += n;
  }
  return symbols;
}

// priority(left_text, right_text) -> std::optional<double>; nullopt when the pair never merges.
template <typename Priority>
void merge_symbols(std::string_view text, std::vector<MergeSymbol>& symbols, Priority priority) {
  struct Candidate {
    double priority;
    int left;
    size_t length;  // combined length when queued; a different value later means it is stale
    bool operator<(const Candidate& other) const {
      return priority < other.priority || (priority == other.priority && left > other.left);
    }
  };
  std::priority_queue<Candidate> queue;
  auto consider = [&](int left) {
    if (left < 0) return;
    const MergeSymbol& l = symbols[static_cast<size_t>(left)];
    if (l.next < 0) return;
    const MergeSymbol& r = symbols[static_cast<size_t>(l.next)];
    const std::optional<double> p = priority(text.substr(l.begin, l.length), text.substr(r.begin, r.length));
    if (p) queue.push({*p, left, l.length + r.length});
  };
  for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) consider(i);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    MergeSymbol& l = symbols[static_cast<size_t>(c.left)];
    // A symbol's length only grows and its `next` changes only when it grows, so an unchanged
    // combined length proves the pair is the one that was queued.
    if (l.length == 0 || l.next < 0) continue;
    MergeSymbol& r = symbols[static_cast<size_t>(l.next)];
    if (l.length + r.length != c.length) continue;
    l.length += r.length;
    r.length = 0;
    l.next = r.next;
    if (r.next >= 0) symbols[static_cast<size_t>(r.next)].prev = c.left;
    consider(l.prev);
    consider(c.left);
  }
}

}  // namespace den::engine
