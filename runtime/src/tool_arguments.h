// Arguments of a tool call against the tool's JSON Schema, as far as den checks them before
// the server does (tools.cpp). Internal to runtime/.
#pragma once

#include <boost/json.hpp>

#include <optional>
#include <string>
#include <string_view>

namespace den::runtime {

// "object", "array", "string", "boolean", "null" or "number".
std::string_view json_type_name(const boost::json::value& v);

// What is wrong with `arguments` for `schema` (a required key missing, a top-level property of
// the wrong type), or nullopt. The server validates the rest.
std::optional<std::string> argument_problem(const boost::json::value& schema, const boost::json::object& arguments);

}  // namespace den::runtime
