-- Distributed delivery (`run --role reader|worker`): a reader publishes each matched delivery to
-- a JetStream work stream split in partitions; workers deliver the partitions they own.

-- A partition of consumer C is led like a consumer of its own, `C/p`: its retry queue, dead
-- letters, delivery log and fencing epoch are the single-process ones, under that id. Its
-- checkpoint row exists only for the epoch (a worker reads no change log): `partition_of` names
-- the consumer it belongs to, and retention ignores such rows.
ALTER TABLE core.observer_checkpoints ADD COLUMN IF NOT EXISTS partition_of TEXT;

-- Workers alive, per consumer: each one writes its heartbeat every second and the partitions it
-- owns; a worker whose heartbeat is older than a few seconds, or whose lock session ended, is gone.
-- Workers divide the partitions by the number of live workers they see here.
CREATE TABLE IF NOT EXISTS core.observer_workers (
    consumer_id TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    partitions INTEGER[] NOT NULL DEFAULT '{}',
    -- The worker's lock session: a worker whose session ended (killed) is gone at once.
    backend_pid INTEGER,
    PRIMARY KEY (consumer_id, worker_id)
);
