-- pong.lua (with ping.lua): answers every round an agent sends it with the same round, and logs
-- it. See ping.lua for how to run the pair.
return {
  on_message = function(ctx, msg)
    local peer = msg.from:match("^agent:(.+)$")
    if not peer or type(msg.body) ~= "table" or not msg.body.round then
      ctx:reply(msg, "pong only plays with agents: den agent send ping go")
      return
    end
    ctx.state.rounds = (ctx.state.rounds or 0) + 1
    ctx:log(("round %d: pong (from %s)"):format(msg.body.round, peer))
    ctx:send(peer, {round = msg.body.round})
  end,
}
