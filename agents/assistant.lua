-- assistant.lua: a chat assistant. Every message is a user turn in the agent's own
-- conversation (a daemon session), so it remembers what was said before; it answers each one
-- and counts the turns in ctx.state.
--   den agent spawn agents/assistant.lua --name assistant
--   den agent send assistant "Give me three names for a cat."
local SYSTEM = "You are a helpful, friendly assistant. Keep your answers short."

return {
  on_start = function(ctx)
    ctx.session:append("system", SYSTEM)
    ctx.state.turns = 0
  end,

  on_message = function(ctx, msg)
    ctx.session:append("user", msg.text or "")
    local answer, info = ctx.session:generate{max_tokens = 200, temperature = 0.7}
    if info.finish_reason == "failed" then error("generation failed: " .. tostring(info.error)) end
    ctx:reply(msg, answer)
    ctx.state.turns = (ctx.state.turns or 0) + 1
    ctx:log(("turn %d: %d tokens (%s)"):format(ctx.state.turns, info.tokens, info.finish_reason))
  end,
}
