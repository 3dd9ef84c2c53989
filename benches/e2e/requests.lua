-- wrk script of `make bench-e2e` and `make bench-misses`: a form POST with a bearer token.
--
-- Environment:
--   BENCH_SECRET_FILE  file holding the caller's bearer secret (read here, never printed)
--   BENCH_KEY_FILE     instead: file holding the master key, sent as Truora-API-Key (the fake
--                      Truora called directly)
--   BENCH_PATH         request path (default /v1/tokens)
--   BENCH_KEYS         number of distinct users (default 10000)
--   BENCH_ORDER        "random": a user drawn at random from 1..BENCH_KEYS each request (hits);
--                      "cycle": users 1..BENCH_KEYS in turn, per thread (priming the caches);
--                      "unique": a user never sent before, every request (misses)
--   BENCH_TAG          part of every "unique" user id, so that runs never share a user
-- The body carries key_type=web and grant=digital-identity, which the broker accepts and Truora
-- (here nginx's upstream) requires, so every server gets the very same bytes.

local function read(path)
  local f = assert(io.open(path, "r"))
  local s = f:read("*l")
  f:close()
  return s
end

local path = os.getenv("BENCH_PATH") or "/v1/tokens"
local keys = tonumber(os.getenv("BENCH_KEYS") or "10000")
local order = os.getenv("BENCH_ORDER") or "random"
local tag = os.getenv("BENCH_TAG") or "0"
local prefix = "key_type=web&grant=digital-identity&country=CO&flow_id=IPF0a1b2c3d4e5f"
  .. "&redirect_url=https%3A%2F%2Fshop.example%2Fdone&account_id=user-"

local headers = { ["Content-Type"] = "application/x-www-form-urlencoded" }
if os.getenv("BENCH_SECRET_FILE") then
  headers["Authorization"] = "Bearer " .. read(os.getenv("BENCH_SECRET_FILE"))
end
if os.getenv("BENCH_KEY_FILE") then
  headers["Truora-API-Key"] = read(os.getenv("BENCH_KEY_FILE"))
end

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_id", threads)
end

local prepared = {}
local counter = 0
function init(args)
  math.randomseed(os.time() + (thread_id or 0) * 7919)
  if order ~= "unique" then
    for i = 1, keys do
      prepared[i] = wrk.format("POST", path, headers, prefix .. i)
    end
  end
end

function request()
  counter = counter + 1
  if order == "random" then
    return prepared[math.random(keys)]
  elseif order == "cycle" then
    return prepared[(counter - 1) % keys + 1]
  else
    return wrk.format("POST", path, headers,
      prefix .. "u" .. tag .. "-" .. (thread_id or 0) .. "-" .. counter)
  end
end
