-- Argo CD health check for kubetune.io/FineTuneJob (Lua 5.1, as Argo CD runs it).
-- Install it in the argocd-cm ConfigMap under
--   resource.customizations.health.kubetune.io_FineTuneJob
-- (docs/gitops.md shows the whole snippet). It follows the same contract as kstatus:
-- a status older than the spec (observedGeneration) is Progressing; then the Ready
-- condition decides; a failed or invalid job is Degraded; a suspended one is Suspended.
local hs = {}

local function condition(conditions, kind)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function failed(reason)
  return reason ~= nil and string.sub(reason, -string.len("Failed")) == "Failed"
end

if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the KubeTune operator to observe the job"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local conditions = obj.status.conditions
local validated = condition(conditions, "Validated")
if validated ~= nil and validated.status == "False" then
  hs.status = "Degraded"
  hs.message = validated.message or validated.reason
  return hs
end

local ready = condition(conditions, "Ready")
if ready ~= nil and ready.observedGeneration ~= nil and generation ~= nil
    and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Ready describes an older generation"
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Serving"
  return hs
end

if obj.status.phase == "Failed" or obj.status.phase == "Invalid"
    or (ready ~= nil and failed(ready.reason)) then
  hs.status = "Degraded"
  hs.message = (ready ~= nil and ready.message) or obj.status.phase
  return hs
end

if (obj.spec ~= nil and obj.spec.suspend == true) or obj.status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Training is suspended (spec.suspend)"
  return hs
end

hs.status = "Progressing"
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  hs.message = ready.message
else
  hs.message = obj.status.phase or "Reconciling"
end
return hs
