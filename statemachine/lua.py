"""The Lua scripts of the Redis store. They compare and set; they never encode run rules.

COMMIT's KEYS: run hash, events list, idempotency key, new approvals, approvals to expire,
approvals to retain, then the document, the bell and the outbox. ARGV 1-19 are scalars (see
`RedisRunStore.commit`; the document ARGV[3] is '' when the commit keeps the stored one;
ARGV[18] the index writes on a single server, '' for none; ARGV[19] the agent name of the
events' envelope), then the events (JSON, '~' before one stored without its envelope), then
new approval documents. ARGV 15-17 are the commit's conditions and token: honour a cancel
request ('1'), apply only while the stored lease is lapsed at this time, the commit's token.
CREATE's KEYS: run hash, events list, idempotency key, document, bell; ARGV: event count, the
run's fields, the document, the events, then the remembered outcome ('' for none), its TTL and
the index writes on a single server ('' for none). RESOLVE's KEYS: run hash, approval,
document, outbox; ARGV: the expected version, status, resolution, time, the run's new
document ('' keeps it), then the outbox tail.

Return codes shared by the scripts: -1 run (or session) missing, -2 stale version (or a
session that gained runs, a lease that is no longer lapsed, a state that moved), -3
approval missing, -4 approval not pending (its status follows), -5 run (or session)
already exists, -6 session owned by another user, -7 a cancel request is recorded on
the run.
"""

BELL_MS = 3000
"""How long a run's bell outlives the commit that paused or ended it: a follower that read
the run just before that commit still finds the commit's entry when it blocks."""

# Index writes made inside the script that commits the run, on a single Redis server (see
# `RedisIndex.inline`): the run's latest hinted version, its identity (a create's), the
# sorted-set entries it makes true (a score, or the member's score in another set), its
# approvals' owners, then the entries it makes stale.
INDEX_WRITES = """
local function index_writes(raw)
  local ix = cjson.decode(raw)
  redis.call('HSET', ix.h, ix.run, ix.v)
  if ix.id then redis.call('HSETNX', ix.id[1], ix.run, ix.id[2]) end
  for _, z in ipairs(ix.z) do
    local score = z[2]
    if z[4] ~= '' then score = redis.call('ZSCORE', z[4], z[3]) end
    if score then redis.call('ZADD', z[1], score, z[3]) end
  end
  for _, f in ipairs(ix.s) do redis.call('HSET', f[1], f[2], f[3]) end
  for _, r in ipairs(ix.r) do redis.call('ZREM', r[1], r[2]) end
end
"""

# The outbox block that COMMIT, RESOLVE and DELETE_RUN share (issue 15).
OUTBOX_TAIL = """
-- outbox (issue 15) ------------------------------------------------------------------
-- The last key is the run's outbox hash; ARGV ends with <id, payload, time> triples and
-- their count, so a notification is written exactly when the fact it announces is.
local nout = tonumber(ARGV[#ARGV])
local obase = #ARGV - 3 * nout - 1
for i = 0, nout - 1 do
  local id, at = ARGV[obase + 3 * i + 1], ARGV[obase + 3 * i + 3]
  redis.call('HSET', KEYS[#KEYS], 'p:' .. id, ARGV[obase + 3 * i + 2], 'n:' .. id, at,
    't:' .. id, 0, 'c:' .. id, at)
end
-- end outbox ------------------------------------------------------------------------------
"""

COMMIT = INDEX_WRITES + """
local cur = redis.call('HMGET', KEYS[1], 'version', 'cancel_requested', 'lease_until',
  'last_seq', 'pending_approvals')
local v = cur[1]
if not v then return {-1} end
if ARGV[15] == '1' and cur[2] == '1' then return {-7} end
if tonumber(v) ~= tonumber(ARGV[1]) then return {-2} end
if ARGV[16] ~= '' then
  local lease = tonumber(cur[3] or '')
  if (not lease) or lease > tonumber(ARGV[16]) then return {-2} end
end
local doc, bell = KEYS[#KEYS - 2], KEYS[#KEYS - 1]
local nev, nnew, nexp = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local nall = tonumber(ARGV[12])
local E = 19
if ARGV[19] ~= '' then redis.call('HSETNX', KEYS[1], 'agent_name', ARGV[19]) end
local seq = tonumber(cur[4] or '0')
local out = {tonumber(v) + 1}
if nev > 0 then
  for i = E + 1, E + nev, 1000 do
    redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, E + nev)))
  end
  for i = 1, nev do out[#out + 1] = seq + i end
  seq = seq + nev
  redis.call('XADD', bell, 'MAXLEN', 1, '0-' .. seq, 'n', nev)
end
-- followers elsewhere block on the bell only while the run executes
if ARGV[5] ~= '' then redis.call('PERSIST', bell) else redis.call('PEXPIRE', bell, BELL_MS) end
local pending = tonumber(cur[5] or '0')
for i = 1, nnew do
  redis.call('HSET', KEYS[3 + i], 'status', 'pending', 'doc', ARGV[E + nev + i])
  pending = pending + 1
end
for i = 1, nexp do
  local k = KEYS[3 + nnew + i]
  if redis.call('HGET', k, 'status') == 'pending' then
    redis.call('HSET', k, 'status', 'expired', 'updated_at', ARGV[4])
    pending = pending - 1
  end
end
redis.call('HSET', KEYS[1], 'version', tonumber(v) + 1, 'state', ARGV[2],
  'updated_at', ARGV[4], 'last_seq', seq, 'pending_approvals', pending,
  'lease_owner', ARGV[5], 'lease_until', ARGV[6], 'paused_at', ARGV[7],
  'cancel_requested', '0', 'commit_token', ARGV[17])
if ARGV[3] ~= '' then
  redis.call('SET', doc, ARGV[3])
  redis.call('HDEL', KEYS[1], 'doc')  -- where versions before the doc key kept it
end
if ARGV[8] ~= '' then
  local ttl = tonumber(ARGV[8])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', doc, ttl)
  for i = 1, nall do redis.call('EXPIRE', KEYS[3 + nnew + nexp + i], ttl) end
end
if ARGV[13] ~= '' then
  redis.call('SET', KEYS[3], ARGV[13], 'EX', tonumber(ARGV[14]))
end
if ARGV[18] ~= '' then index_writes(ARGV[18]) end
""".replace("BELL_MS", str(BELL_MS)) + OUTBOX_TAIL + """return out
"""

# KEYS: run hash, its document, its events, an idempotency key. ARGV: read the events after
# this one ('' for none), read the remembered outcome ('1'). One atomic read of a run.
READ_RUN = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {0} end
local events = {}
if ARGV[1] ~= '' then events = redis.call('LRANGE', KEYS[3], tonumber(ARGV[1]), -1) end
local remembered = false
if ARGV[2] == '1' then remembered = redis.call('GET', KEYS[4]) end
return {1, fields, redis.call('GET', KEYS[2]) or '', events, remembered or ''}
"""

RESOLVE = """
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return {-1} end
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return {-3} end
if status ~= 'pending' then return {-4, status} end
if tonumber(v) ~= tonumber(ARGV[1]) then return {-2} end
redis.call('HSET', KEYS[2], 'status', ARGV[2], 'resolution', ARGV[3], 'updated_at', ARGV[4])
local pending = tonumber(redis.call('HGET', KEYS[1], 'pending_approvals') or '0') - 1
if pending < 0 then pending = 0 end
redis.call('HSET', KEYS[1], 'version', tonumber(v) + 1, 'pending_approvals', pending,
  'updated_at', ARGV[4])
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[3], ARGV[5])
  redis.call('HDEL', KEYS[1], 'doc')
end
""" + OUTBOX_TAIL + """return {tonumber(v) + 1}
"""

DELETE_APPROVAL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -3 end
if status == 'pending' then return -4 end
redis.call('DEL', KEYS[1])
return 1
"""

REQUEST_CANCEL = """
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return -1 end
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then return -2 end
redis.call('HSET', KEYS[1], 'version', tonumber(v) + 1, 'cancel_requested', '1',
  'updated_at', ARGV[2])
return tonumber(v) + 1
"""

RENEW_LEASE = """
if redis.call('HGET', KEYS[1], 'lease_owner') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'lease_until', ARGV[2])
  return 1
end
return 0
"""

# KEYS: session hash, session runs. ARGV: session_id, agent_id, user_id ('' none), message,
# now, run_id, exclusive ('1' refuses another user's session). Makes the session (code 1) or
# joins it (0; 2 when it had no agent and takes the run's); answers {code, agent_id, user_id,
# created_at} of the session.
LINK_FUNCTION = """
local function link_session(skey, sruns, a)
  local owner = redis.call('HGET', skey, 'user_id')
  if not owner then
    redis.call('HSET', skey, 'session_id', a[1], 'agent_id', a[2], 'user_id', a[3],
      'first_message', a[4], 'session_state', '{}', 'created_at', a[5], 'updated_at', a[5])
    redis.call('ZADD', sruns, a[5], a[6])
    return {1, a[2], a[3], a[5]}
  end
  if a[7] == '1' and owner ~= a[3] then return {-6} end
  redis.call('HSETNX', skey, 'first_message', a[4])
  local code = 0
  local agent = redis.call('HGET', skey, 'agent_id')
  if agent == '' then
    agent = a[2]
    code = 2
    redis.call('HSET', skey, 'agent_id', agent)
  end
  if tonumber(a[5]) > tonumber(redis.call('HGET', skey, 'updated_at')) then
    redis.call('HSET', skey, 'updated_at', a[5])
  end
  redis.call('ZADD', sruns, a[5], a[6])
  return {code, agent, owner, redis.call('HGET', skey, 'created_at')}
end
"""

LINK_SESSION = LINK_FUNCTION + """
return link_session(KEYS[1], KEYS[2], ARGV)
"""

# KEYS: run hash, events, an idempotency key, document, bell; with a session link also the
# session hash and its runs. ARGV: the number n of events, the hash's fields (JSON), the
# document, the n events, the remembered outcome and its ttl, the index writes (JSON, single
# server), the session link (JSON: `a` LINK_SESSION's arguments, `nx`/`gt` the session's
# listing entries; single server). Answers {-5} for an existing run, {-6} for another user's
# session, else {1, the events' seqs..., and the link's answer when it linked}.
CREATE = INDEX_WRITES + LINK_FUNCTION + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {-5} end
local n = tonumber(ARGV[1])
local linked = false
if ARGV[7 + n] and ARGV[7 + n] ~= '' then
  local link = cjson.decode(ARGV[7 + n])
  linked = link_session(KEYS[6], KEYS[7], link.a)
  if linked[1] == -6 then return {-6} end
  for _, key in ipairs(link.nx) do redis.call('ZADD', key, 'NX', link.a[5], link.a[1]) end
  for _, key in ipairs(link.gt) do redis.call('ZADD', key, 'GT', link.a[5], link.a[1]) end
end
local fields = cjson.decode(ARGV[2])
local flat = {}
for k, val in pairs(fields) do flat[#flat + 1] = k; flat[#flat + 1] = tostring(val) end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('SET', KEYS[4], ARGV[3])
local out = {1}
if n > 0 then
  for i = 4, 3 + n, 1000 do
    redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, 3 + n)))
  end
  redis.call('XADD', KEYS[5], 'MAXLEN', 1, '0-' .. n, 'n', n)
end
for i = 1, n do out[#out + 1] = i end
if fields.lease_owner == '' then redis.call('PEXPIRE', KEYS[5], BELL_MS) end
redis.call('HSET', KEYS[1], 'last_seq', n)
if ARGV[4 + n] and ARGV[4 + n] ~= '' then
  redis.call('SET', KEYS[3], ARGV[4 + n], 'EX', tonumber(ARGV[5 + n]))
end
if ARGV[6 + n] and ARGV[6 + n] ~= '' then index_writes(ARGV[6 + n]) end
if linked then out[#out + 1] = linked end
return out
""".replace("BELL_MS", str(BELL_MS))

# KEYS: session hash. ARGV: the field/value pairs of a new session (JSON object).
CREATE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -5 end
local fields = cjson.decode(ARGV[1])
local flat = {}
for k, val in pairs(fields) do flat[#flat + 1] = k; flat[#flat + 1] = tostring(val) end
redis.call('HSET', KEYS[1], unpack(flat))
return 1
"""

# KEYS: session hash. ARGV: now, then field/value pairs to set.
UPDATE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'updated_at')) then
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
end
return 1
"""

# KEYS: run hash, events, document, bell, approvals to expire (ARGV[3] of them), approvals to
# retain, then the run's outbox. ARGV: expected version, now, number to expire, retention
# seconds, then the outbox tail. Deletes the run only at the version its deletion was decided
# on, expiring its pending approvals and writing its notifications in the same step.
DELETE_RUN = """
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return -1 end
if tonumber(v) ~= tonumber(ARGV[1]) then return -2 end
local nexp = tonumber(ARGV[3])
for i = 1, nexp do
  if redis.call('HGET', KEYS[4 + i], 'status') == 'pending' then
    redis.call('HSET', KEYS[4 + i], 'status', 'expired', 'updated_at', ARGV[2])
  end
end
for i = 5 + nexp, #KEYS - 1 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[4])) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
""" + OUTBOX_TAIL + """return 1
"""

# KEYS: session hash, session runs. Deleted only once no run is left in it.
DELETE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('ZCARD', KEYS[2]) > 0 then return -2 end
redis.call('DEL', KEYS[1])
return 1
"""

# -- outbox (issue 15) ---------------------------------------------------------------------

OUTBOX_CLAIM = """
local all = redis.call('HGETALL', KEYS[1])
local now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out, soonest, taken = {}, -1, 0
for i = 1, #all, 2 do
  local f = all[i]
  if string.sub(f, 1, 2) == 'n:' then
    local id = string.sub(f, 3)
    local due = tonumber(all[i + 1])
    if due <= now and taken < limit then
      redis.call('HSET', KEYS[1], f, ARGV[2])
      taken = taken + 1
      due = lease
      out[#out + 1] = id
      out[#out + 1] = redis.call('HGET', KEYS[1], 'p:' .. id)
      out[#out + 1] = redis.call('HGET', KEYS[1], 't:' .. id) or '0'
      out[#out + 1] = redis.call('HGET', KEYS[1], 'c:' .. id) or ARGV[1]
    end
    if soonest < 0 or due < soonest then soonest = due end
  end
end
table.insert(out, 1, string.format('%.6f', soonest))
return out
"""

OUTBOX_RESCHEDULE = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) ~= tonumber(ARGV[2]) then return 0 end
if tonumber(ARGV[3]) < 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
"""

# Index scripts: every key they touch lives in one index shard (one `{idx-N}` slot).

HINT = """
-- KEYS[1] run-hinted hash, KEYS[2] run-identity hash, KEYS[3..] sorted sets.
-- ARGV[1] run_id, ARGV[2] version hinted, ARGV[3] identity JSON ('' keeps it),
-- then one (score, member) pair per sorted set; a score '@N' is the member's score in
-- KEYS[N] (no entry when it has none there). A create's hint (one with an identity) adds
-- only what is missing: a duplicate create must not move the entries of the run it lost to.
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[3]) end
for i = 3, #KEYS do
  local j = i - 2
  local score, member = ARGV[2 + 2 * j], ARGV[3 + 2 * j]
  if string.sub(score, 1, 1) == '@' then
    score = redis.call('ZSCORE', KEYS[tonumber(string.sub(score, 2))], member)
  end
  if score and ARGV[3] ~= '' then redis.call('ZADD', KEYS[i], 'NX', score, member)
  elseif score then redis.call('ZADD', KEYS[i], score, member) end
end
return 1
"""

UNHINT = """
-- KEYS[1] run-hinted hash, KEYS[2..] sorted sets; ARGV[1] run_id, ARGV[2] the run version
-- the caller saw, ARGV[3] the member. Removes nothing while a newer hint may be in flight.
local hinted = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if hinted > tonumber(ARGV[2]) then return 0 end
for i = 2, #KEYS do redis.call('ZREM', KEYS[i], ARGV[3]) end
return 1
"""

# KEYS: run hash, document, events list, the stream where versions before the event list kept
# its events. Moves a run stored by such a version into the new layout; doing it twice is
# harmless (`python -m statemachine.reindex` runs it for every run).
MIGRATE_RUN = """
local moved = 0
local doc = redis.call('HGET', KEYS[1], 'doc')
if doc then
  if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], doc) end
  local name = cjson.decode(doc).agent_name
  if type(name) == 'string' then redis.call('HSETNX', KEYS[1], 'agent_name', name) end
  redis.call('HDEL', KEYS[1], 'doc')
  moved = 1
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    for _, entry in ipairs(redis.call('XRANGE', KEYS[4], '-', '+')) do
      redis.call('RPUSH', KEYS[3], entry[2][2])
    end
  end
  redis.call('DEL', KEYS[4])
  moved = 1
end
local ttl = redis.call('PTTL', KEYS[1])
if moved == 1 and ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return moved
"""
