#include "tool_arguments.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace den::runtime {
namespace {

namespace json = boost::json;

bool json_has_type(const json::value& v, std::string_view type) {
  if (type == "object") return v.is_object();
  if (type == "array") return v.is_array();
  if (type == "string") return v.is_string();
  if (type == "boolean") return v.is_bool();
  if (type == "null") return v.is_null();
  if (type == "number") return v.is_number();
  if (type == "integer")
    return v.is_int64() || v.is_uint64() || (v.is_double() && std::trunc(v.get_double()) == v.get_double());
  return true;  // a type we do not know: the server decides
}

}  // namespace

std::string_view json_type_name(const json::value& v) {
  switch (v.kind()) {
    case json::kind::null: return "null";
    case json::kind::bool_: return "boolean";
    case json::kind::int64:
    case json::kind::uint64:
    case json::kind::double_: return "number";
    case json::kind::string: return "string";
    case json::kind::array: return "array";
    case json::kind::object: return "object";
  }
  return "value";
}

std::optional<std::string> argument_problem(const json::value& schema, const json::object& arguments) {
  const json::object* s = schema.if_object();
  if (!s) return std::nullopt;
  if (const json::value* type = s->if_contains("type"); type && type->is_string() && type->get_string() != "object")
    return "the tool's input schema is of type '" + std::string(type->get_string()) + "', not an object";
  if (const json::value* required = s->if_contains("required"); required && required->is_array()) {
    for (const json::value& key : required->get_array()) {
      if (key.is_string() && !arguments.contains(key.get_string()))
        return "missing required argument '" + std::string(key.get_string()) + "'";
    }
  }
  const json::value* properties = s->if_contains("properties");
  if (!properties || !properties->is_object()) return std::nullopt;
  for (const auto& [key, value] : arguments) {
    const json::value* property = properties->get_object().if_contains(key);
    const json::value* type = property && property->is_object() ? property->get_object().if_contains("type") : nullptr;
    if (!type) continue;
    std::vector<std::string_view> allowed;
    if (type->is_string()) allowed.push_back(type->get_string());
    if (type->is_array())
      for (const json::value& t : type->get_array())
        if (t.is_string()) allowed.push_back(t.get_string());
    if (allowed.empty() || std::any_of(allowed.begin(), allowed.end(), [&](auto t) { return json_has_type(value, t); }))
      continue;
    std::string expected;
    for (size_t i = 0; i < allowed.size(); ++i) expected += (i ? " or " : "") + std::string(allowed[i]);
    return "argument '" + std::string(key) + "' must be " + expected + ", got " + std::string(json_type_name(value));
  }
  return std::nullopt;
}

}  // namespace den::runtime
