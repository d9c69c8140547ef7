-- Written by togather-tasks; static in the proxy image (proxy.engine: haproxy).
--
-- The switch and maintenance mode are files on the host (the same as the nginx engine's): the
-- slot marker state/green and the link state/maintenance. At load (start and every reload, in
-- the master, before any request) this writes what they say into /run/togather/runtime.map,
-- which site.conf's rules look up per request; then a task in the worker checks the files
-- every 20 ms and updates the map in memory when they change. Also served from here: the
-- maintenance page (page.html or page.json of the linked directory, 503 with Retry-After) and
-- the ACME HTTP-01 challenge files.

local CONF = "/etc/nginx/togather"
local STATE = CONF .. "/state"
local RUNTIME_MAP = "/run/togather/runtime.map"
local VERIFY_LIST = "/run/togather/verify.lst"
local CRT_LIST = "/run/togather/crt.list"
local SITE_PEM = CONF .. "/tls/site.pem"
local PLACEHOLDER_PEM = "/etc/haproxy/placeholder.pem"
local CHALLENGES = CONF .. "/acme/.well-known/acme-challenge/"
local POLL_MS = 20
local DEFAULT_RETRY_AFTER = "60"

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

local function exists(path)
  local f = io.open(path, "rb")
  if not f then return false end
  f:close()
  return true
end

-- What the state directory says, as nginx's `-f` and `-e` tests read it: the slot ("green"
-- when state/green is there, else "blue") and "1" when state/maintenance is there, else "0".
local function current()
  local slot = exists(STATE .. "/green") and "green" or "blue"
  local closed = exists(STATE .. "/maintenance") and "1" or "0"
  return slot, closed
end

-- Every process that loads this file writes through a temporary name of its own (its pid):
-- two loads at once (the tool's reload and the certificate watcher's, each a `haproxy -c`
-- and then the master's reload) once shared one name, and the second rename found the file
-- gone ("togather.lua:49: No such file or directory": the configuration test failed).
local PID = (read("/proc/self/stat") or ""):match("^(%d+)") or tostring(os.time())

local function write(path, text)
  local temporary = path .. ".new." .. PID
  local f = assert(io.open(temporary, "wb"))
  f:write(text)
  f:close()
  assert(os.rename(temporary, path))
end

-- At load: the map file as the state is now, the verification token as the list the
-- `verified` rule reads (the token is made once per host; a new one comes with a reload), and
-- the certificate HTTPS serves: tls/site.pem, or the image's placeholder until it exists (an
-- ACME certificate is obtained through this proxy; the reload that follows loads it).
do
  write(CRT_LIST, (exists(SITE_PEM) and SITE_PEM or PLACEHOLDER_PEM) .. "\n")
  local slot, closed = current()
  write(RUNTIME_MAP, "slot " .. slot .. "\nmaintenance " .. closed .. "\n")
  local token = (read(CONF .. "/verify.map") or ""):match('"(%x+)"')
  write(VERIFY_LIST, token and (token .. "\n") or "")
end

-- The first round sets the map whatever it holds: the files may have changed between the load
-- above (in the master) and this task's start (in the worker), a switch right after the proxy
-- (re)started.
core.register_task(function()
  local slot, closed = nil, nil
  while true do
    local now_slot, now_closed = current()
    if now_slot ~= slot then
      core.set_map(RUNTIME_MAP, "slot", now_slot)
      slot = now_slot
    end
    if now_closed ~= closed then
      core.set_map(RUNTIME_MAP, "maintenance", now_closed)
      closed = now_closed
    end
    core.msleep(POLL_MS)
  end
end)

local function wants_json(applet)
  local accept = applet.headers["accept"]
  if not accept then return false end
  for _, value in pairs(accept) do
    if value:lower():find("application/json", 1, true) then return true end
  end
  return false
end

-- 503 with the operator's page (JSON for a client that asks for it); Retry-After from the
-- page's retry_after.
core.register_service("togather_maintenance", "http", function(applet)
  local json = wants_json(applet)
  local page = read(STATE .. "/maintenance/page." .. (json and "json" or "html"))
  local about = read(STATE .. "/maintenance/page.json") or ""
  local retry = about:match('"retry_after": *(%d+)') or DEFAULT_RETRY_AFTER
  page = page or "Service unavailable\n"
  applet:set_status(503)
  applet:add_header("content-type", json and "application/json; charset=utf-8"
                                          or "text/html; charset=utf-8")
  applet:add_header("content-length", tostring(#page))
  applet:add_header("retry-after", retry)
  applet:add_header("cache-control", "no-store")
  applet:add_header("vary", "Accept")
  applet:start_response()
  applet:send(page)
end)

-- A challenge's token from its path (a token is base64url, RFC 8555 8.1: nothing else is
-- looked up, so no other path is reachable), or nil.
local function challenge_token(path)
  return path and path:match("^/%.well%-known/acme%-challenge/([A-Za-z0-9_-]+)$")
end

-- In a fleet: whether this host has the challenge's file (else its peers are asked).
core.register_fetches("togather_challenge_here", function(txn)
  local token = challenge_token(txn.f:path())
  return token ~= nil and exists(CHALLENGES .. token)
end)

-- An HTTP-01 challenge: the token file the ACME client wrote, or 404.
core.register_service("togather_acme", "http", function(applet)
  local token = challenge_token(applet.path)
  local body = token and read(CHALLENGES .. token)
  local status = body and 200 or 404
  body = body or "not found\n"
  applet:set_status(status)
  applet:add_header("content-type", "text/plain")
  applet:add_header("content-length", tostring(#body))
  applet:start_response()
  applet:send(body)
end)
