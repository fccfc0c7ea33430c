-- wrk script: each connection's loop is "create a confirm-agent run (stream=false), then
-- continue it with confirmed=true (stream=false)". Counts are kept per thread and printed by
-- done() as one JSON line, read by bench/hot_path.py.
local threads = {}
local form = { ["Content-Type"] = "application/x-www-form-urlencoded" }

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  queue, creates, continues, paused, completed, bad = {}, 0, 0, 0, 0, 0
end

local function urlencode(text)
  return (text:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

function request()
  local item = table.remove(queue)
  if item then
    return wrk.format("POST", item.path, form, item.body)
  end
  return wrk.format("POST", "/agents/confirm-agent/runs", form, "message=bench&stream=false")
end

function response(status, headers, body)
  if status ~= 200 then
    bad = bad + 1
    return
  end
  local run = body:match('"run_id":"([^"]+)"')
  local state = body:match('"status":"([^"]+)"')
  if state == "PAUSED" then
    creates, paused = creates + 1, paused + 1
    local call = body:match('"tool_call_id":"([^"]+)"')
    local tools = '[{"tool_call_id":"' .. call .. '","confirmed":true}]'
    table.insert(queue, {
      path = "/agents/confirm-agent/runs/" .. run .. "/continue",
      body = "stream=false&tools=" .. urlencode(tools),
    })
  elseif state == "COMPLETED" then
    continues, completed = continues + 1, completed + 1
  else
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local totals = { creates = 0, continues = 0, bad = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + (thread:get(name) or 0)
    end
  end
  io.write(string.format(
    '{"requests":%d,"seconds":%.3f,"creates":%d,"continues":%d,"bad":%d,' ..
    '"errors":%d,"p50_ms":%.2f,"p95_ms":%.2f,"p99_ms":%.2f}\n',
    summary.requests, summary.duration / 1e6, totals.creates, totals.continues, totals.bad,
    summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.status + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000))
end
