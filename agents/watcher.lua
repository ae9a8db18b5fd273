-- watcher.lua: runs forever on timers. on_start schedules the first look; each on_timer reads
-- the clock (the `clock.now` tool when the daemon has it, else den.now()), records in
-- ctx.state when the minute changed since the last look, logs it, and schedules the next look.
-- The timer's payload carries the period, so nothing else is needed to keep going, also across
-- daemon restarts (timers are durable; one that fell due meanwhile fires at the start).
--   den agent spawn agents/watcher.lua
--   den agent logs watcher --follow
local PERIOD = 10  -- seconds

-- "HH:MM" (UTC) from the clock tool, or from the daemon's clock when there is no such tool.
local function minute_now()
  for _, t in ipairs(den.tools.list()) do
    if t.name == "clock.now" then
      local result = den.tools.call("clock.now", {})
      local hhmm = result and result.text:match("T(%d%d:%d%d)")
      if hhmm then return hhmm, "clock.now" end
    end
  end
  local now = den.now()
  return ("%02d:%02d"):format(math.floor(now / 3600) % 24, math.floor(now / 60) % 60), "den.now"
end

return {
  on_start = function(ctx)
    ctx.state.looks, ctx.state.changes = 0, 0
    ctx:schedule(PERIOD, {period = PERIOD})
    ctx:log(("watching the clock every %d s"):format(PERIOD))
  end,

  on_timer = function(ctx, payload)
    local period = (payload and payload.period) or PERIOD
    local minute, source = minute_now()
    local st = ctx.state
    st.looks = (st.looks or 0) + 1
    if minute ~= st.minute then
      st.changes = (st.changes or 0) + 1
      ctx:log(("look %d: the minute changed from %s to %s (%s)"):format(st.looks, st.minute or "nothing", minute, source))
      st.minute = minute
    end
    ctx:schedule(period, {period = period})
  end,
}
