"""Every limit of the engine, in one place, with its unit in its name.

Each says why it is what it is and what raising it would cost. Validation refers to these names, and
so do the error messages, so a user who hits one can find it here.
"""

# A page is one contiguous range of one arena. 1 GiB keeps every in-page offset in a u32 column of the
# Arrow schema and lets one page fill a sizeable fraction of a GPU without a single kernel launch
# touching more than 2^30 bytes of it. Larger objects are built from several pages.
page_bytes_max = 1 << 30

# Pages start at multiples of this, so the 16-byte vector path of the kernels applies whenever a
# delta's own offset is aligned. Costs up to 15 bytes of padding per page.
page_alignment_bytes = 16

# A batch is validated, logged and applied as a whole, so its size bounds the memory one request can
# pin on a shard (host staging + device copy) and the length of one fsync group. 4 Mi deltas of
# 64 bytes is 256 MiB of payload, far past the point where per-call overhead stops mattering.
batch_deltas_max = 4 << 20

# Payload plus mask bytes in one batch. Arrow's `binary` columns have int32 offsets (< 2 GiB);
# 1 GiB leaves headroom and bounds a single host-to-device copy to well under a second.
batch_bytes_max = 1 << 30

# Pages created (or freed) by one call. Bounds the page-table arrays built per call
# (~40 bytes per page of bookkeeping, so 16 Mi pages is ~640 MiB of host memory at the peak).
pages_per_call_max = 16 << 20

# A new arena starts this large and grows by `arena_growth_factor` (at least) when full, compacting
# live pages as it copies them. Growth costs one copy of the live bytes; doubling keeps the amortized
# cost per created byte constant.
arena_bytes_initial = 1 << 20
arena_growth_factor = 2

# The GPU scatter kernel tracks the last writer of every arena granule of this many bytes to keep
# last-writer-wins order inside a batch without sorting. Costs 4 bytes of device memory per granule
# (6.25% of the arena) plus a 1-byte fixup flag (1.6%).
scatter_granule_bytes = 64

# The GPU scatter kernel splits runs longer than this into pieces so that one long run does not
# serialize on one warp while the rest of the device idles.
scatter_piece_bytes_max = 4096

# Control messages (msgpack) are small by construction; anything larger is a bug or an attack.
control_message_bytes_max = 1 << 20

# The CPU backend splits a run scatter (and the validation pass) over threads, one arena range each,
# from this many runs up; below it, waking the threads costs more than it saves. Measured on this
# 2-core VM with the prefetching kernels (arena.apply of random 64-byte runs, ns per delta, threaded
# vs not): 10k 59 vs 40, 30k 46 vs 43, 64k 37 vs 50, 1M 29 vs 39. (With the first sessions' slower
# kernels the crossover was below 8 Ki.)
cpu_parallel_runs_min = 1 << 15

# Threads of a large CPU run scatter (at most; numba's pool, sized from the CPU count, may be
# smaller). Up to this many threads every thread walks the whole batch and writes its own arena
# range (scatter_runs_parallel); from cpu_bucketed_scatter_threads_min on, the batch is first filed
# by range so that each thread walks only its own runs (scatter_runs_bucketed: two more passes over
# the batch). Measured on the H100 host's 16 cores, 1 M random 64-byte runs into 256 MiB, ms
# walking / filed: 2 threads 31.6 / 46.2, 4: 19.9 / 23.1, 6: 17.7 / 17.0, 8: 16.6 / 12.3, 12:
# 15.3 / 8.2, 16: 13.1 / 6.1 (this 2-core VM, 2 threads: 13.3 / 19.3).
cpu_scatter_threads_max = 16
cpu_bucketed_scatter_threads_min = 6

# Threads of the page-table translation in batch validation (arena.validate) and of the page
# stamps after an apply, on any backend: the lookups and stores are cache misses that threads
# overlap; past ~16 the memory system, not the threads, limits.
cpu_translate_threads_max = 16

# ---- log (mmsb_dist/log.py) ---------------------------------------------------------------------

# A segment is the unit of retention and one file of the recovery scan. 64 MiB keeps the file count
# low (16 per GiB of log) and lets drop_before free space in 64 MiB steps after a checkpoint; larger
# delays reclaiming space, smaller means more files, more directory fsyncs and more rolls.
segment_bytes_max = 64 << 20

# One frame holds one batch: limits.batch_bytes_max (1 GiB) of delta bytes plus Arrow's columns
# (~20 bytes per delta, < 100 MiB at limits.batch_deltas_max). 1.5 GiB leaves room, fits the u32
# length field and stays under Linux's 0x7ffff000-byte cap on one read or write call.
frame_payload_bytes_max = 3 << 29

# The LSN count is a u32 in the header; limits.batch_deltas_max (4 Mi) is far below it.
frame_lsns_max = (1 << 32) - 1

# A leader writes at most this many bytes of queued frames as one group (one writev + one fsync);
# what is left goes to the next group. Bounds the time one group makes the callers behind it wait.
group_bytes_max = 64 << 20

# A shard applies a group of batches of at least this many encoded bytes to its arena while the log
# writes and syncs it (ShardEngine.apply_many), instead of after: the fsync (~0.5-1 ms here) hides
# behind the scatter. Below it, handing the write to the log's thread costs more than it saves.
log_overlap_bytes_min = 64 << 10

# A log write of at least twice this goes out in pieces of this size, each handed to the disk
# (writeback started) before the next is copied, so the fsync that follows waits for the last piece
# only (84 MB: 48 -> 31 ms here). Small enough to overlap, large enough for sequential writes.
log_writeback_piece_bytes = 8 << 20

# ---- checkpoints (mmsb_dist/checkpoint.py) -------------------------------------------------------

# Checkpoints submitted to a CheckpointWriter and not yet written, the one being written included.
# Each pins one host copy of the shard's arena, so this bounds the writer's memory at that many
# arenas; 2 lets the shard snapshot epoch e+1 while e is still on its way to disk, and more would
# only queue memory behind a disk that is not keeping up.
inflight_checkpoints_max = 2

# Bytes handed to one write or read call (and to one CRC32C update). Large enough that per-call
# overhead is noise next to the disk, small enough that the CRC of a piece stays in cache.
checkpoint_io_chunk_bytes = 8 << 20

# A manifest names a handful of files; anything larger is not one of ours (refused before parsing).
manifest_bytes_max = 1 << 20

# Threads recomputing page hashes where they are not fused with the read (compressed files, object
# stores). The CPU kernel hashes ~5 GB/s per core and releases the GIL, so a few threads outrun any
# disk or network; more than the cores only adds switching.
restore_hash_threads_max = 4

# Replay (recovery on open, replay to an epoch) reads, checks and decodes log frames on a helper
# thread while the replaying thread applies the ones before (the kernels release the GIL). The
# helper stops this many payload bytes ahead (always at least one frame): the memory a replay holds
# beyond the frame it applies.
replay_read_ahead_bytes = 32 << 20
# The same for a shard's open, whose frames are views of the mapped log segments (page cache that
# the kernel may drop and read again, not heap): it reads on while the arena is built from the
# checkpoint.
open_read_ahead_bytes = 256 << 20
# From this many CPUs on, a replay decodes on a thread of its own (three threads: read, decode,
# apply); below, the reading thread decodes.
replay_decode_thread_cpus_min = 4

# ---- runtime (mmsb_dist/runtime.py) ----------------------------------------------------------------

# An encoded batch up to this size travels inline in the Ray call (as bytes); a larger one goes
# through the object store (as an array). Inline skips a store round trip for the small batches
# of single writes and HTTP requests; past ~64 KiB the store's zero-copy path wins.
inline_batch_bytes_max = 64 << 10

# Up to this size an encoded batch still travels inline, cut into inline_batch_bytes_max pieces
# (separate call arguments, joined by the shard): on a 2-core machine that saves ~0.7-1 ms per call
# against the object store at 200 KB-1 MB (benchmarks/notes.md); past ~1 MB the store wins.
inline_chunked_bytes_max = 1 << 20

# Batches a client keeps in flight to one shard before it waits for the oldest (backpressure).
# Bounds the memory one client pins in the object store to this many batches per shard; 8 keeps a
# shard busy across Ray's ~1 ms round trip at any realistic batch size.
inflight_batches_max = 8

# write_many cuts each shard's deltas into batches of at most this many (one frame, one fsync each),
# so that a larger call pipelines: the client encodes and sends batch k+1 while the shard logs and
# applies batch k. Not smaller: on the H100 host a CuPy shard took 1 Mi-delta calls at 6.0 M/s as
# one batch and at 5.2 M/s cut into 128 Ki batches (per-batch fsync and device syncs).
write_batch_deltas = 1 << 20

# The coordinator logs a page-id high-water mark this far ahead of the ids it hands out, so that
# most allocations cost no log write; a restart skips at most this many ids (of 2^64).
page_ids_reserve_block = 1 << 20

# How long the coordinator waits for its shards to be placed and recovered before giving up with an
# error (instead of waiting forever for resources the cluster does not have). Recovery of a large
# shard (checkpoint + log suffix) must fit: ~1 GB/s of checkpoint and 2-4 M deltas/s of log on a
# 2-core machine.
shard_start_timeout_s = 600.0

# A shard remembers, per client, which of the last this-many batch seqs it applied (mmsb_dist/dedup.py:
# back to the oldest seq still missing, so at most 8 KiB per client); a batch further behind the
# client's newest is taken as a duplicate. A client has at most inflight_batches_max batches in
# flight per shard from one write_many, and the gateway as many as its concurrent requests: both
# far below this.
dedup_window_seqs = 1 << 16

# Threads a shard actor runs writes on (Ray's "writes" concurrency group): while one holds the
# engine, the others decode and check the batches behind it (ShardEngine.prepare). Batches of one
# client that a thread takes ahead of the one they follow wait this long for it before they are
# refused (OrderError, and the client re-sends them in order).
shard_write_threads = 4
shard_order_wait_s = 2.0

# A restarted shard retries opening its log this long while the previous process still holds the
# log's lock (it is releasing it as it dies); past this the shard fails to start.
shard_log_busy_wait_s = 30.0

# ---- events and subscriptions (mmsb_dist/events.py) ----------------------------------------------

# Rows in one event batch (one ShardEngine.events call, one batch a subscriber receives). Bounds the
# memory of one call on both sides; 64 Ki rows is ~2 MiB of columns without deltas, and far past the
# point where the per-call cost (~1 ms round trip) stops mattering. A create or free record's rows
# are never split (they share one LSN), so one such record may exceed it.
event_rows_max = 64 << 10

# Delta bytes (payload + mask) in one event batch when a subscriber asks for deltas. At least one
# row is always delivered, so a single delta larger than this (up to limits.batch_bytes_max) still
# goes through, alone.
event_bytes_max = 16 << 20

# Log bytes one events call reads at most, matching or not. Bounds the time a call holds the shard
# (a filter that matches nothing would otherwise scan the whole log in one call) at ~tens of ms.
event_scan_bytes_max = 64 << 20

# Event batches a subscription holds per shard, received but not yet taken by the caller. The
# shard's pump waits when its buffer is full (backpressure), so memory is bounded by this times
# event_rows_max / event_bytes_max per shard.
subscription_prefetch_batches_max = 4

# How often a caught-up subscription polls a shard for new frames, and the longest a caller may
# ask for. Each poll is one actor call (~1 ms of the shard's time); the bound keeps latency sane.
subscription_poll_s = 0.05
subscription_poll_s_max = 5.0

# One events call (a shard restart included: ~1-3 s here, recovery of a large shard longer), and how
# long a subscription keeps retrying a shard that fails before it raises the error to its caller.
subscription_call_timeout_s = 60.0
subscription_retry_s = 300.0

# ---- HTTP gateway (mmsb_dist/gateway.py) ---------------------------------------------------------
# The defaults of start_gateway(); each can be set per gateway (`mmsb-dist start --gateway ...`).

# One request body. The gateway holds a body whole in memory while it decodes it, so this bounds
# the memory one request pins (times the requests in flight); 16 MiB is ~250k 64-byte deltas as
# Arrow, enough that the per-request cost (~1 ms) is noise. Larger loads go through write_many.
gateway_body_bytes_max = 16 << 20

# Deltas in one batch request (msgpack or Arrow). A msgpack batch becomes Python objects per delta
# before it is packed into columns (~0.5 us each), so this also bounds the gateway's CPU per request.
gateway_batch_deltas_max = 100_000

# Pages created by one request, and their bytes (count x size): a create is cheap to ask for and
# costs the shards that much memory, so it is bounded well below pages_per_call_max.
gateway_create_pages_max = 1 << 16
gateway_create_bytes_max = 256 << 20

# The per-client token bucket: sustained requests per second and the burst above it. A client is
# one remote address. Above it a client gets 429 with Retry-After.
gateway_rate_per_s = 2_000.0
gateway_rate_burst = 4_000

# Clients the rate limiter remembers (least recently seen forgotten first): bounds its memory.
gateway_rate_clients_max = 10_000

# Requests the gateway serves at once; more wait in the listen backlog (bounded by the kernel).
# Bounds the bodies in memory to this times gateway_body_bytes_max.
gateway_requests_inflight_max = 64

# How long start_gateway waits for the gateway actor to be placed and listening.
gateway_start_timeout_s = 60.0

# The longest a request waits for the runtime (a shard restart takes ~1-3 s here; a commit waits for
# every shard's seal). Past it the client gets 503 and the outcome of a write is unknown, as with any
# HTTP timeout: a write may still be applied (retry it; per byte, last writer wins).
gateway_call_timeout_s = 120.0

# ---- dependency graph (mmsb_dist/graph.py) ---------------------------------------------------------

# A shard holds writes back while the epoch barrier recomputes derived pages from the cut; if the
# coordinator dies mid-barrier, the shard lets writes through again after this long (its seal is
# then refused, so that attempt aborts). Must exceed a barrier's real length (a recompute round per
# cross-shard hop), and bounds how long a write can stall behind a dead coordinator.
barrier_hold_s = 120.0

# Recompute errors (a user function raised or returned the wrong shape) the coordinator keeps for
# Bus.stats(): the newest ones; the page they name keeps its last good bytes.
recompute_errors_kept = 100
