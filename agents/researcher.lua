-- researcher.lua: answers questions with tools. It shows the model the daemon's tools
-- (den.tools.list) and how to call one, Hermes-style:
--   <tool_call>{"name": "clock.calculate", "arguments": {"expression": "2*21"}}</tool_call>
-- then runs each call the model writes (den.parse_tool_calls, den.tools.call), gives the
-- result back as a "tool" turn and lets the model go on, up to MAX_STEPS times. Output
-- without a tool call is the answer (so with no tools, or a model that calls none, it answers
-- directly).
--   den serve --config den.yaml     # with the example tools: agents/README.md, "Tools"
--   den agent spawn agents/researcher.lua
--   den agent send researcher "What is 1234 * 5678?"
local MAX_STEPS = 4

-- One line per tool: its name, description and argument names (sorted: a handler must do the
-- same thing when it is replayed, and pairs() has no fixed order).
local function describe(tools)
  local lines = {
    "You can use tools. To call one, write only:",
    '<tool_call>{"name": "TOOL", "arguments": {...}}</tool_call>',
    "You will get its result. When you know the answer, write it without a tool call.",
    "Tools:",
  }
  for _, t in ipairs(tools) do
    local args = {}
    for name in pairs((t.input_schema or {}).properties or {}) do args[#args + 1] = name end
    table.sort(args)
    lines[#lines + 1] = ("- %s(%s): %s"):format(t.name, table.concat(args, ", "), t.description)
  end
  return table.concat(lines, "\n")
end

return {
  on_message = function(ctx, msg)
    local tools = den.tools.list()
    -- The tool list goes into the conversation once, and again only when it changed.
    local shown = describe(tools)
    if #tools > 0 and shown ~= ctx.state.tools_shown then
      ctx.session:append("system", shown)
      ctx.state.tools_shown = shown
    end
    ctx.session:append("user", msg.text or "")

    local answer
    for step = 1, MAX_STEPS do
      local text = ctx.session:generate{max_tokens = 256, temperature = 0.2, stop = {"</tool_call>"}}
      local calls = #tools > 0 and den.parse_tool_calls(text) or {}
      if #calls == 0 then
        answer = text
        break
      end
      for _, call in ipairs(calls) do
        local result, err = den.tools.call(call.name, call.arguments)
        local output = result and result.text or ("error: " .. err)
        if result and result.is_error then output = "error: " .. output end
        ctx:log(("step %d: %s -> %s"):format(step, call.name, output))
        ctx.session:append("tool", output)
      end
    end
    if not answer then  -- out of steps: ask for the answer with what it has
      ctx.session:append("user", "Answer now, without calling a tool.")
      answer = ctx.session:generate{max_tokens = 256, temperature = 0.2}
    end
    ctx:reply(msg, answer)
    ctx.state.questions = (ctx.state.questions or 0) + 1
  end,
}
