-- Run once by the postgres image when compose.yaml first creates its data
-- volume: the demo's receiver (the listen service) is plain http on the
-- compose network, which postbox.enqueue accepts only where this setting
-- is on. Production databases keep it off (https:// only).
ALTER DATABASE postbox SET postbox.allow_http = on;
