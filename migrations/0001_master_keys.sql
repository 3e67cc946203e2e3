-- Master-key versions. The key material lives on the token (label keybroker-mk-v<version>);
-- this table records which version seals new blobs and how many seals each has done.
CREATE TABLE master_keys (
    version        integer     PRIMARY KEY CHECK (version > 0),
    token_label    text        NOT NULL UNIQUE,
    state          text        NOT NULL CHECK (state IN ('active', 'decrypt_only', 'retired', 'destroyed')),
    -- An upper bound on the GCM seals done under this version: brokers reserve seals in blocks
    -- before using them and hand back what they did not use, so a crash can only overcount.
    seals_reserved bigint      NOT NULL DEFAULT 0 CHECK (seals_reserved >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    activated_at   timestamptz
);

-- At most one active version, whatever several brokers do at once.
CREATE UNIQUE INDEX master_keys_one_active ON master_keys ((true)) WHERE state = 'active';
