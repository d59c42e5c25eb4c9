// actsim::util text helpers: option lists, CSV fields, one-line messages.
//
//   split_list("none,\"ops:mm,bmm\",full")  // {"none", "\"ops:mm,bmm\"", "full"}
//   strip_quotes("\"ops:mm,bmm\"")          // "ops:mm,bmm"
//   csv_field("a,b")                        // "\"a,b\""
//   one_line("bad\nkey")                    // "bad\\nkey"
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace actsim::util {

// The one list syntax of every comma-separated option (--vary, --policies): splits on commas
// outside double quotes. Quotes stay in the items (a --vary value is TOML, where they matter;
// strip_quotes removes them), and every item is kept, empty ones included ("a,,b" gives three
// items, "" gives one empty item), so the caller names an empty item in its own message.
std::vector<std::string> split_list(std::string_view text);
// The text without its double-quote characters.
std::string strip_quotes(std::string_view text);

// RFC 4180 quoting, only where needed (a comma, double quote or newline).
std::string csv_field(std::string_view s);

// One line whatever the text held: a newline, tab or other control character is written as an
// escape (\n, \t, \xNN), never raw.
std::string one_line(std::string_view msg);

}  // namespace actsim::util
