-- Argo CD health check for serving.baton.dev/DisaggregatedModel (see docs/gitops.md).
--
-- Install it under the argocd-cm key
--   resource.customizations.health.serving.baton.dev_DisaggregatedModel
-- It reads the conditions the Baton operator writes, with the precedence kstatus uses:
--   status older than the spec   -> Progressing (the operator has not seen the latest change yet)
--   Stalled=True                 -> Degraded    (the spec cannot be served as written; the message says why)
--   Reconciling=True             -> Progressing (children converging, a rollout, pods waiting for GPUs),
--                                   or Suspended when spec.rollout.paused is true
--   Ready=True                   -> Healthy
--   anything else                -> Progressing, with the Ready condition's reason and message
local hs = {}

local function describe(c)
  local reason = c.reason or c.type
  if c.message ~= nil and c.message ~= "" then
    return reason .. ": " .. c.message
  end
  return reason
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Baton operator to report status"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Baton operator to observe generation " .. tostring(generation)
  return hs
end

local ready, reconciling, stalled = nil, nil, nil
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then
      ready = c
    elseif c.type == "Reconciling" then
      reconciling = c
    elseif c.type == "Stalled" then
      stalled = c
    end
  end
end

if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end

local paused = obj.spec ~= nil and obj.spec.rollout ~= nil and obj.spec.rollout.paused == true

if reconciling ~= nil and reconciling.status == "True" then
  if paused then
    hs.status = "Suspended"
    hs.message = "Rollout paused (spec.rollout.paused); " .. describe(reconciling)
  else
    hs.status = "Progressing"
    hs.message = describe(reconciling)
  end
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = describe(ready)
else
  hs.message = "Waiting for the Baton operator to report conditions"
end
return hs
