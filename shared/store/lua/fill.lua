-- A key name from a template of shared/store/keys.py: `{name}` replaced by `value` (a function replacement, so
-- that no character of the value is read as a pattern).
local function fill(template, name, value)
  return (string.gsub(template, '{' .. name .. '}', function() return value end))
end
