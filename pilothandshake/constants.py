"""Every default number of the specification, named once (SPEC sections 3-15).

Durations are float seconds; sizes are bytes.
"""

PORT_HANDSHAKE = 444
MAX_NODE_ID = 2**32 - 1  # node IDs are unsigned 32-bit
MAX_NETWORK = 2**16 - 1  # network IDs are unsigned 16-bit

# Section 3: the message on port 444.
MAX_MESSAGE_SIZE = 64 * 1024
READ_DEADLINE = 10.0  # total time for one message to arrive
SEND_GRACE = 2.0  # how long a sender waits for the receiver's receipt after half-closing
DIAL_TIMEOUT = 5.0  # connect + write bound for dial_and_send

# Section 5: processing an incoming message.
MAX_MESSAGE_AGE = 5 * 60.0
MAX_CLOCK_SKEW = 30.0  # how far in the future a timestamp may be
REGISTRY_CACHE_TTL = 30.0  # lookup answers cached; failures never
REGISTRY_REASK_INTERVAL = 5.0  # at most one cache-bypassing re-ask per node
MAX_REPLAY = 8192
MAX_REPLAY_PER_SOURCE = 1024
DROP_LOG_PER_SECOND = 10

# Section 6: pending requests.
MAX_PENDING = 256
MAX_PENDING_UNBOUND_PER_SOURCE = 16
MAX_PENDING_BOUND_PER_SOURCE = 64  # registry-bound direct requests from one source address
MAX_TRUST_HISTORY = 1024  # formerly trusted nodes remembered (their requests are protected)
MAX_TEXT_BYTES = 1024  # stored justification / reason

# Section 7: accept, reject, revoke.
REVOKE_COOLDOWN = 5 * 60.0
OUTGOING_TTL = 7 * 24 * 3600.0
PENDING_TTL = 7 * 24 * 3600.0  # config trust.pending_ttl: a pending request expires (section 15)
REAP_INTERVAL = 5 * 60.0
RELAY_RECENT = 60.0  # an earlier relayed request this recent may still wait in the inbox

# Section 11: registry.
MAX_REGISTRY_FRAME_CLIENT = 1024 * 1024
MAX_REGISTRY_FRAME_SERVER = 64 * 1024
REGISTRY_TIMEOUT = 5.0
REGISTRY_INBOX = 100
REGISTRY_NODE_EXPIRY = 3 * 60.0
HEARTBEAT_INTERVAL = 60.0
POLL_INTERVAL = 2.0  # the relay's fast window (section 18)
POLL_IDLE = 60.0  # the relay's idle poll period (section 18)
MAX_BACKOFF = 30.0
REGISTRY_START_GRACE = 10.0  # registry failures before the first registration are INFO this long
HEARTBEAT_FAILURES_BEFORE_REREGISTER = 3

# Section 15: bounds of the daemon.
MAX_CONNECTIONS = 256
MAX_CONNECTIONS_PER_SOURCE = 16
EVICT_AFTER = 1.0  # at the cap, a connection this old without a whole message makes room
EVENT_QUEUE = 1024
POOL_WORKERS = 8
POOL_QUEUE = 1024
STOP_TIMEOUT = 10.0  # how long stop() waits for background work
METRICS_MAX_CONNECTIONS = 16  # metrics.listen: scrapes served at once; newcomers are reset
METRICS_DEADLINE = 5.0  # metrics.listen: one scrape, request and answer, in total

# Section 10: trust.json, beside the identity file.
TRUST_FILE = "trust.json"

# Sections 12-14: config defaults, the control socket and the event stream.
DEFAULT_IDENTITY_PATH = "~/.pilot-handshake/identity.json"
DEFAULT_LISTEN = "0.0.0.0:444"
CONTROL_SOCKET_NAME = "control.sock"  # beside the identity file (section 13)
CONTROL_MAX_LINE = 64 * 1024  # one control request line
CONTROL_TIMEOUT = 10.0  # client: connect and answer of a request that does not wait
CONTROL_IDLE_TIMEOUT = 30.0  # server: a connection silent this long is closed
CONTROL_MAX_CONNECTIONS = 64  # server: connections served at once; newcomers get "busy"
WAIT_DEFAULT_TIMEOUT = 30.0  # `wait` without --timeout
WAIT_MAX_TIMEOUT = 3600.0  # `wait` longer than this is capped
EVENT_HISTORY = 100  # recent events replayed to `events` (section 14)
WEBHOOK_TIMEOUT = 5.0  # one POST
WEBHOOK_QUEUE = 256  # events waiting for the webhook; the oldest are dropped beyond
WEBHOOK_LOG_INTERVAL = 60.0  # at most one webhook-failure WARNING per interval

# Section 11: the embedded registry (pilot-registryd). Its limits are the defaults of its
# config's `limits:`, the production registry's values.
REGISTRY_IDLE_TIMEOUT = 300.0  # a connection silent this long between requests is closed
REGISTRY_REGISTER_PER_MINUTE = 10  # new keys registered per source address
REGISTRY_MAX_CONNECTIONS = 1024
REGISTRY_MAX_CONNECTIONS_PER_SOURCE = 64
REGISTRY_INBOX_TTL = 24 * 3600.0  # a relayed request or response not polled is dropped
# Round 3 (section 17): mutating requests per node and per source (/24, /64) a minute, the
# caps of the store, and how long a poll with `wait` may be held (section 18).
REGISTRY_MUTATIONS_PER_MINUTE_PER_NODE = 60
REGISTRY_MUTATIONS_PER_MINUTE_PER_SOURCE = 600
REGISTRY_MAX_NODES = 100_000
REGISTRY_MAX_VOUCHES_PER_NODE = 1024
REGISTRY_MAX_HELD_POLLS = 4096  # polls held open at once (one per node), beside max_connections
REGISTRY_MAX_POLL_WAIT = 55.0
# Responses without a tie to their recipient (section 17), per responder and per source.
REGISTRY_UNTIED_RESPONSES_PER_MINUTE_PER_NODE = 10
REGISTRY_UNTIED_RESPONSES_PER_MINUTE_PER_SOURCE = 100
DEFAULT_REGISTRY_STORE = "~/.pilot-registry/registry.json"  # without --store / --memory

# Section 12: where pilot-handshaked reads its config when --config is not given.
DEFAULT_CONFIG_PATH = "/etc/pilot-handshake/config.yaml"

# Section 13c: how often STATUS= is refreshed under systemd without a watchdog (with one, at
# every WATCHDOG=1, half of WatchdogSec=).
SYSTEMD_STATUS_INTERVAL = 30.0
