-- The audit trail: one row per security-relevant event, chained. Each row carries the MAC of the
-- row before it and its own MAC = HMAC-SHA256, computed inside the token with the audit key,
-- over the canonical encoding of the row (see crypto::audit_mac_input). Editing, deleting,
-- inserting or reordering rows breaks the chain; `keybroker audit verify` finds where.
CREATE TABLE audit_events (
    seq        bigint PRIMARY KEY CHECK (seq > 0),
    -- Microseconds since the epoch, exactly as MAC'd.
    at_us      bigint NOT NULL,
    severity   text   NOT NULL CHECK (severity IN ('info', 'warning', 'error', 'critical')),
    event      text   NOT NULL,
    -- Client id, `officer` (CLI), `scheduler` or `anonymous`.
    actor      text   NOT NULL,
    subject    text,
    client_id  uuid,
    key_id     uuid,
    source_ip  text,
    request_id text,
    -- Canonical JSON text exactly as MAC'd (not jsonb, which would re-encode it).
    details    text   NOT NULL,
    prev_mac   bytea  NOT NULL,
    mac        bytea  NOT NULL
);
CREATE INDEX audit_events_at ON audit_events (at_us);
CREATE INDEX audit_events_client ON audit_events (client_id, at_us);
CREATE INDEX audit_events_key ON audit_events (key_id, at_us);
CREATE INDEX audit_events_event ON audit_events (event, at_us);

-- The chain's head: every append locks this one row, so concurrent writers (on any number of
-- brokers) append one after another and the chain never forks.
CREATE TABLE audit_chain_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq       bigint  NOT NULL,
    mac       bytea   NOT NULL
);
INSERT INTO audit_chain_head (seq, mac) VALUES (0, '\x0000000000000000000000000000000000000000000000000000000000000000');
