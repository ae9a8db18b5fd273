-- ping.lua (with pong.lua): two agents that talk with ctx:send. On start, ping sends pong
-- {round = 1}; pong sends each round back; ping logs it and sends the next one, until ROUNDS.
-- A message from a client (den agent send ping go) starts a new game.
--   den agent spawn agents/pong.lua      # first: ping sends to it at once
--   den agent spawn agents/ping.lua
--   den agent logs ping
local ROUNDS = 5

local function serve(ctx, round)
  ctx:send("pong", {round = round})
  ctx:log(("round %d: ping"):format(round))
end

return {
  on_start = function(ctx)
    ctx.state.games = 1
    serve(ctx, 1)
  end,

  on_message = function(ctx, msg)
    if msg.from == "client" then  -- a person asks for a new game
      ctx.state.games = (ctx.state.games or 0) + 1
      serve(ctx, 1)
      ctx:reply(msg, ("game %d started"):format(ctx.state.games))
      return
    end
    local round = msg.body.round
    ctx.state.rounds = (ctx.state.rounds or 0) + 1
    if round < ROUNDS then
      serve(ctx, round + 1)
    else
      ctx:log(("game %d over after %d rounds"):format(ctx.state.games or 1, round))
    end
  end,
}
